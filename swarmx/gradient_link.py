"""One pass's gradient layers sent up on one stream: ``SwarmX.ReducePass`` or ``MemoryX.PushPass``.

A pipelined pass sends each backward layer's gradient upward (compute node -> SwarmX
parent -> ... -> root -> MemoryX). One stream per link and pass carries them all,
instead of one call per layer (a call's set-up costs several times a small layer's
messages). Each layer's answer still comes back on its own, while later layers
stream, matched by (layer, step): the optimizer is applied as each layer completes.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator

from proto import threads
from proto.frames import WireError, bundled
from swarmx.pass_link import Slot
from swarmx.pieces import END


class GradientLink:
    """One pass's gradient stream to one receiver: the layers' streams, each whole, in the
    order they are sent. A failed or cancelled stream fails every layer waiting on it."""

    def __init__(self, method: Callable[..., Iterator], pass_id: int, timeout_s: float):
        # method: the receiver stub's ReducePass or PushPass (protobuf stays in the stubs).
        self.pass_id = pass_id
        self._layers: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._waiting: dict[tuple[int, int], Slot] = {}
        self._error: BaseException | None = None
        self._closed = False
        self.call = method(self._messages(), timeout=timeout_s)
        threads.start(self._read, name="swarmx-gradient-acks")

    def _messages(self) -> Iterator:
        while (layer := self._layers.get()) is not END:
            yield from bundled(layer)

    def send(self, layer: int, step: int, messages: Iterable) -> LayerSlot:
        """Queue one layer's gradient stream (a header and its chunks); where its answer comes.

        ``messages`` is read on gRPC's thread once the layers before it are sent: it may
        block until its chunks exist (cut-through), and must end (e.g. when the sum fails).
        """
        slot = LayerSlot(self)
        with self._lock:
            error = self._error
            if error is None and self._closed:
                error = WireError(f"the gradient stream of pass {self.pass_id} is closed")
            if error is None:
                self._waiting[(layer, step)] = slot
                self._layers.put(messages)
        if error is not None:
            slot.settle(error=error)
        return slot

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def ended(self) -> bool:
        """Closed, or its call over: it takes no more layers."""
        return self._closed or self.call.done()

    def close(self) -> None:
        """No more layers in this pass: end the request stream (the answers still come)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._layers.put(END)

    def cancel(self) -> None:
        self.call.cancel()
        self.close()  # gRPC's thread stops waiting for more layers

    def _read(self) -> None:
        error: BaseException | None = None
        try:
            for message in self.call:
                with self._lock:
                    slot = self._waiting.pop((message.layer, message.step), None)
                if slot is None:
                    raise WireError(
                        f"a gradient pass stream answered layer {message.layer} step "
                        f"{message.step}, which was not sent on it"
                    )
                slot.settle(result=message)
        except BaseException as exc:
            error = exc
            self.call.cancel()
        with self._lock:
            if error is None:
                error = WireError("the receiver ended a gradient pass stream before answering")
            self._error = error
            waiting = list(self._waiting.values())
            self._waiting.clear()
        for slot in waiting:
            slot.settle(error=error)


class LayerSlot(Slot):
    """One layer's answer on a ``GradientLink``, as a per-layer call's ``grpc.Future``.

    Cancelling it fails the pass's stream (its later layers cannot complete the pass
    either), unless the layer is answered already: a call context's callbacks also run
    when it ends well.
    """

    def cancel(self) -> bool:
        if self._settled:
            return False
        self._link.cancel()
        return True


__all__ = ["GradientLink", "LayerSlot"]
