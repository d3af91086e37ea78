"""A SwarmX node's streams to its children, kept from one pass to the next
(``proto.kept_streams``): a child reads one pass after another on its stream
(``nodes.service``, ``swarmx.pass_relay.relay_pass``), and each pass's relay takes the
streams while it runs."""

from __future__ import annotations

from typing import Any

from proto.kept_streams import KeptStream
from proto.loop_streams import ClientStream


class ChildLink(KeptStream):
    """One child's ``DeliverPass`` stream: its answers go to the relay that holds it."""

    def __init__(self, stub: Any, index: int, timeout_s: float, wiring: int):
        self.index = index
        self.owner: Any = None  # the relay whose pass runs on it (None: in the pool)
        call = ClientStream(stub.DeliverPass, timeout_s, self._answered, self._ended)
        super().__init__(call, timeout_s, wiring)

    def _answered(self, message: Any) -> None:
        owner = self.owner
        if owner is None:  # no pass runs on it: nothing is due, so the stream is broken
            self.call.cancel()
            return
        owner._answered(self.index, message)

    def _ended(self, error: BaseException | None) -> None:
        owner = self.owner
        if owner is not None:
            owner._ended(self.index, error)


__all__ = ["ChildLink"]
