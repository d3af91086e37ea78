"""Waiting in a test for something another thread makes true, with a deadline."""

from __future__ import annotations

import time
from collections.abc import Callable


def until(predicate: Callable[[], bool], timeout_s: float, *, interval_s: float = 0.005) -> bool:
    """Whether ``predicate()`` became true within ``timeout_s``, checked every ``interval_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval_s)
    return True
