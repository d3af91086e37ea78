"""A call context that counts how often a thread waiting for its turn checks it.

A thread that polls its call context at a fixed interval while it waits (for the layer
before it, for room in a pass) costs a host of many nodes CPU in proportion to how long
the steps take; one woken by the layer before it, or by its call's end, checks it a
couple of times whatever the wait's length.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from proto.rpc import StepConflict

#: How long the tests keep a thread waiting, s: ten polls at the old 0.05 s interval.
WAIT_S = 0.5
#: ``is_active`` checks a woken wait may make: before and after it is woken (and slack).
MAX_CHECKS = 3
#: How long a woken thread may take to end, s.
TIMEOUT_S = 30


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


def assert_woken_when_the_call_ends(wait: Callable[[CountingContext], object]) -> None:
    """``wait(context)`` still waits after WAIT_S, then ends with ``StepConflict`` soon after
    its call ends, having checked its context at most MAX_CHECKS times."""
    context = CountingContext()
    thread, outcome = run_in_thread(lambda: wait(context))
    time.sleep(WAIT_S)
    assert not outcome
    context.end()
    thread.join(TIMEOUT_S)
    assert len(outcome) == 1 and isinstance(outcome[0], StepConflict)
    assert context.checks <= MAX_CHECKS
