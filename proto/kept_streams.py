"""Stream calls kept from one pass to the next.

A stream call costs its client and server 0.7-1.4 ms of CPU together to set up and end
(``benchmarks/bench_call_setup.py``, on 2 cores), the CPU of 3-5 messages each way on an
open stream, and a small model's pass is one or two messages per stream. So a pass takes
its streams from a pool when it begins and gives them back once it is done with them; the
next pass sends on the same calls. Kept so: a SwarmX node's streams to its children
(``swarmx.pass_relay``) and, at the root, to MemoryX (``swarmx.pass_root``,
``swarmx.reducing_loop``), and the driver's ``RunPass`` stream to the root
(``proto.clients.SwarmXClient``). The receiving side reads one pass after another.

A stream stays in the pool only while it can carry a whole pass: it is open, its deadline
(``STREAM_LIFETIME_S`` or the pass's, whichever is longer) covers the next pass's, and it
has waited less than half the run's ``stream_idle_s`` (after which the server's idle
watchdog may end it as a pass begins). A pass that fails cancels its streams, and the next
one opens new ones; so does a rewired tree (``StreamPool.clear``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from typing import Any

from proto.loop_streams import QUEUE_DEPTH, ClientStream

#: The deadline a kept stream gets when it is opened, s, unless the pass that opens it
#: needs longer: streams are opened again about this often.
STREAM_LIFETIME_S = 600.0
#: How much shorter than a pass's deadline a kept stream's may be, s. Below the root a relay
#: knows only its parent's stream's deadline, which its own streams, opened later with the
#: same lifetime, outlive: by less than gRPC's rounding of deadlines, sometimes.
DEADLINE_SLACK_S = 1.0


class KeptStream:
    """A stream call that may carry several passes, one after another."""

    def __init__(self, call: ClientStream, timeout_s: float, wiring: int):
        self.call = call
        self.expires_at = time.monotonic() + timeout_s
        self.idle_since: float | None = None  # since when it waits in the pool
        self.wiring = wiring  # the pool's wiring it was opened for (``StreamPool.clear``)

    def usable_for(self, timeout_s: float, idle_limit_s: float, now: float) -> bool:
        """Whether it can carry a pass of ``timeout_s`` now."""
        return (
            not self.call.done()
            and self.expires_at - now >= timeout_s - DEADLINE_SLACK_S
            and (self.idle_since is None or now - self.idle_since < idle_limit_s)
        )


class OwnedStream(KeptStream):
    """A kept stream whose answers and end go to the pass that holds it (``owner``, called
    with ``tag`` first); an answer while no pass holds it means the stream is broken: it
    is cancelled."""

    def __init__(
        self,
        multicallable: Any,
        timeout_s: float,
        wiring: int = 0,
        *,
        tag: tuple = (),
        depth: float = QUEUE_DEPTH,
    ):
        self.owner: Any = None
        self._tag = tag
        call = ClientStream(multicallable, timeout_s, self._answered, self._ended, depth=depth)
        super().__init__(call, timeout_s, wiring)

    def _answered(self, message: Any) -> None:
        owner = self.owner
        if owner is None:
            self.call.cancel()
            return
        owner._answered(*self._tag, message)

    def _ended(self, error: BaseException | None) -> None:
        owner = self.owner
        if owner is not None:
            owner._ended(*self._tag, error)


class StreamPool:
    """Kept streams between passes, by key: a SwarmX node's (used on the loop; ``clear``
    comes from the thread that rewires the node), or the driver's ``RunPass`` stream."""

    def __init__(self, idle_limit_s: float):
        self._idle_limit_s = idle_limit_s
        self._lock = threading.Lock()
        self._idle: dict[Hashable, KeptStream] = {}
        self._wiring = 0  # one more each ``clear``: older streams are not kept
        self.num_opened = 0  # streams opened (a test reads it)

    def take(
        self, key: Hashable, open_stream: Callable[[float, int], KeptStream], timeout_s: float
    ) -> KeptStream:
        """The stream kept under ``key`` if it can carry a pass of ``timeout_s``, else a new
        one, ``open_stream(its timeout_s, wiring)``."""
        with self._lock:
            kept = self._idle.pop(key, None)
            wiring = self._wiring
        if kept is not None:
            if kept.usable_for(timeout_s, self._idle_limit_s, time.monotonic()):
                return kept
            kept.call.cancel()
        self.num_opened += 1
        return open_stream(max(timeout_s, STREAM_LIFETIME_S), wiring)

    def give_back(self, key: Hashable, stream: KeptStream) -> None:
        """A stream whose pass is done with it (every answer read): kept for the next."""
        stream.idle_since = time.monotonic()
        with self._lock:
            old = self._idle.pop(key, None)
            kept = stream.wiring == self._wiring and not stream.call.done()
            if kept:
                self._idle[key] = stream
        if old is not None and old is not stream:
            old.call.cancel()
        if not kept:
            stream.call.cancel()

    def clear(self) -> None:
        """End every stream in the pool, and keep none opened before (the tree changed)."""
        with self._lock:
            idle, self._idle = self._idle, {}
            self._wiring += 1
        for stream in idle.values():
            stream.call.cancel()


__all__ = ["DEADLINE_SLACK_S", "STREAM_LIFETIME_S", "KeptStream", "OwnedStream", "StreamPool"]
