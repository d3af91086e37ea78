"""A call context that counts how often a thread waiting for its turn checks it.

A thread that polls its call context at a fixed interval while it waits (for the layer
before it, for room in a pass) costs a host of many nodes CPU in proportion to how long
the steps take; one woken by the layer before it, or by its call's end, checks it a
couple of times whatever the wait's length.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

#: How long the tests keep a thread waiting, s: ten polls at the old 0.05 s interval.
WAIT_S = 0.5
#: ``is_active`` checks a woken wait may make: before and after it is woken (and slack).
MAX_CHECKS = 3


class CountingContext:
    """The parts of a ``grpc.ServicerContext`` a waiting layer uses; ``end`` cancels it."""

    def __init__(self) -> None:
        self.checks = 0
        self._active = True
        self._callbacks: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    def is_active(self) -> bool:
        with self._lock:
            self.checks += 1
            return self._active

    def add_callback(self, callback: Callable[[], None]) -> bool:
        with self._lock:
            if not self._active:
                return False
            self._callbacks.append(callback)
            return True

    def time_remaining(self) -> float:
        return 30.0

    def end(self) -> None:
        """The call ends (cancelled): its callbacks run, as gRPC runs them."""
        with self._lock:
            self._active = False
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()


def run_in_thread(target: Callable[[], object]) -> tuple[threading.Thread, list]:
    """Start ``target`` on a thread; the list gets its result or its exception."""
    outcome: list = []

    def run() -> None:
        try:
            outcome.append(target())
        except BaseException as exc:  # the test inspects it
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome
