"""The tiered store's RAM side: a ledger of live tensor bytes and a bounded cache."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Mapping

from torch import Tensor

CacheKey = tuple[int, int, str]  # (layer index in the store, version, part)


class Ledger:
    """Bytes of the tensors the store created that are still alive, and their peak."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.live_bytes = 0
        self.peak_bytes = 0

    def track(self, tensors: Mapping[str, Tensor]) -> None:
        for tensor in tensors.values():
            self._add(tensor.nbytes)
            weakref.finalize(tensor, self._add, -tensor.nbytes)

    def _add(self, num_bytes: int) -> None:
        with self._lock:
            self.live_bytes += num_bytes
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)


class Cache:
    """At most ``budget_bytes`` of tensors by (layer, version, part); evicts by ``rank``."""

    def __init__(
        self, budget_bytes: int, ledger: Ledger, rank: Callable[[CacheKey], object]
    ) -> None:
        self.budget_bytes = budget_bytes
        self.ledger = ledger
        self._rank = rank  # key -> eviction rank; higher is evicted first
        self.lock = threading.Condition()
        self._entries: dict[tuple[int, int, str], dict[str, Tensor]] = {}
        self._reserved = 0

    def get(self, key) -> dict[str, Tensor] | None:
        with self.lock:
            entry = self._entries.get(key)
            return None if entry is None else dict(entry)

    def take(self, key) -> dict[str, Tensor] | None:
        with self.lock:
            return self._entries.pop(key, None)

    def put(self, key, tensors: dict[str, Tensor]) -> None:
        with self.lock:
            self._entries[key] = tensors

    def drop(self, keep) -> None:
        """Forget every entry whose key ``keep(key)`` rejects."""
        with self.lock:
            for key in [k for k in self._entries if not keep(k)]:
                del self._entries[key]

    def free_bytes(self) -> int:
        with self.lock:
            return self.budget_bytes - self.ledger.live_bytes - self._reserved

    def reserve(self, num_bytes: int, *, evict: bool) -> bool:
        """Set ``num_bytes`` aside for tensors about to be made; evict for room if ``evict``.

        Without ``evict`` (prefetch) nothing is evicted and False means no room.
        With it the reservation always succeeds: tensors still held by a reader
        cannot be evicted, and the run goes on rather than fail.
        """
        with self.lock:
            if evict:
                while self.ledger.live_bytes + self._reserved + num_bytes > self.budget_bytes:
                    if not self._entries:
                        break
                    victim = max(self._entries, key=self._rank)
                    del self._entries[victim]
            elif self.ledger.live_bytes + self._reserved + num_bytes > self.budget_bytes:
                return False
            self._reserved += num_bytes
            return True

    def release(self, num_bytes: int) -> None:
        with self.lock:
            self._reserved -= num_bytes


__all__ = ["Cache", "CacheKey", "Ledger"]
