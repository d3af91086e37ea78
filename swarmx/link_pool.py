"""A SwarmX node's streams to its children, kept from one pass to the next.

A stream call costs its client and server 0.7-1.4 ms of CPU together to set up and end
(``benchmarks/bench_call_setup.py``, on 2 cores), the CPU of 3-5 messages each way on an
open stream, and a small model's pass is one or two messages per child. So a relay
(``swarmx.pass_relay``) takes its children's streams from this pool when its pass begins
and gives them back when every layer is answered; the next pass sends its layers on the
same calls (a child reads one pass after another on a stream: ``nodes.service``,
``swarmx.pass_relay.relay_pass``).

A stream stays in the pool only while it can carry a whole pass: it is open, its deadline
(``LINK_LIFETIME_S`` or the pass's, whichever is longer) covers the next pass's, and it has
waited less than half the run's ``stream_idle_s`` (after which the child's idle watchdog
may end it as a pass begins). A pass that fails cancels its streams, as before, and the
next one opens new ones; so does a rewired tree (``clear``).
"""

from __future__ import annotations

import threading
import time
from typing import Any

from proto.loop_streams import ClientStream

#: The deadline a pooled stream gets when it is opened, s, unless the pass that opens it
#: needs longer: streams are opened again about this often.
LINK_LIFETIME_S = 600.0
#: How much shorter than a pass's deadline a kept stream's may be, s. Below the root a relay
#: knows only its parent's stream's deadline, which its own streams, opened later with the
#: same lifetime, outlive: by less than gRPC's rounding of deadlines, sometimes.
DEADLINE_SLACK_S = 1.0


class ChildLink:
    """One child's ``DeliverPass`` stream: its answers go to the relay that holds it."""

    __slots__ = ("call", "index", "owner", "expires_at", "idle_since", "wiring")

    def __init__(self, stub: Any, index: int, timeout_s: float, wiring: int):
        self.index = index
        self.wiring = wiring  # the pool's wiring it was opened for (``LinkPool.clear``)
        self.owner: Any = None  # the relay whose pass runs on it (None: in the pool)
        self.expires_at = time.monotonic() + timeout_s
        self.idle_since: float | None = None
        self.call = ClientStream(stub.DeliverPass, timeout_s, self._answered, self._ended)

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

    def usable_for(self, timeout_s: float, idle_limit_s: float, now: float) -> bool:
        """Whether it can carry a pass of ``timeout_s`` now."""
        return (
            not self.call.done()
            and self.expires_at - now >= timeout_s - DEADLINE_SLACK_S
            and (self.idle_since is None or now - self.idle_since < idle_limit_s)
        )


class LinkPool:
    """The streams to a SwarmX node's children between passes (used on the loop; ``clear``
    comes from the thread that rewires the node)."""

    def __init__(self, idle_limit_s: float):
        self._idle_limit_s = idle_limit_s
        self._lock = threading.Lock()
        self._idle: dict[int, ChildLink] = {}  # by child index
        self._wiring = 0  # one more each ``clear``: older streams are not kept
        self.num_opened = 0  # streams opened (a test reads it)

    def take(self, owner: Any, stubs: list[Any], timeout_s: float) -> list[ChildLink]:
        """A stream to every child (of ``stubs``) for ``owner``'s pass of ``timeout_s``:
        the pool's where it can carry it, new ones elsewhere."""
        now = time.monotonic()
        links = []
        for index, stub in enumerate(stubs):
            with self._lock:
                link = self._idle.pop(index, None)
                wiring = self._wiring
            if link is not None and not link.usable_for(timeout_s, self._idle_limit_s, now):
                link.call.cancel()
                link = None
            if link is None:
                link = ChildLink(stub, index, max(timeout_s, LINK_LIFETIME_S), wiring)
                self.num_opened += 1
            link.owner = owner
            links.append(link)
        return links

    def give_back(self, links: list[ChildLink]) -> None:
        """The streams of a pass whose every layer is answered: kept for the next pass."""
        now = time.monotonic()
        for link in links:
            link.owner = None
            link.idle_since = now
            with self._lock:
                old = self._idle.pop(link.index, None)
                kept = link.wiring == self._wiring and not link.call.done()
                if kept:
                    self._idle[link.index] = link
            if old is not None and old is not link:
                old.call.cancel()
            if not kept:
                link.call.cancel()

    def clear(self) -> None:
        """End every stream in the pool, and keep none opened before (the children changed)."""
        with self._lock:
            idle, self._idle = self._idle, {}
            self._wiring += 1
        for link in idle.values():
            link.call.cancel()


__all__ = ["LINK_LIFETIME_S", "ChildLink", "LinkPool"]
