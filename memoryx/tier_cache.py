"""The tiered store's RAM side: a ledger of live tensor bytes, a bounded cache, and the
streaming order that decides what to prefetch and what to evict."""

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
        self,
        budget_bytes: int,
        ledger: Ledger,
        rank: Callable[[CacheKey], object],
        drain: Callable[[], bool] = lambda: False,
    ) -> None:
        self.budget_bytes = budget_bytes
        self.ledger = ledger
        self._rank = rank  # key -> eviction rank; higher is evicted first
        # Frees tensors held elsewhere (files still being written); False when it cannot.
        self._drain = drain
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
                    if self._entries:
                        del self._entries[max(self._entries, key=self._rank)]
                    elif not self._drain():
                        break
            elif self.ledger.live_bytes + self._reserved + num_bytes > self.budget_bytes:
                return False
            self._reserved += num_bytes
            return True

    def release(self, num_bytes: int) -> None:
        with self.lock:
            self._reserved -= num_bytes


WEIGHTS = "weights"  # cache part: params and masks, what a stream needs
STATE = "state"  # cache part: optimizer state, what an update needs


class StreamOrder:
    """Where streaming is: forward 0..L-1, then backward L-1..0, over ``num_layers`` layers.

    A pass needs the ``WEIGHTS`` of each layer; the backward pass also needs its
    ``STATE`` (the update). Plain policy, no I/O: the store moves the cursor as
    layers are streamed and asks what comes next.
    """

    def __init__(self, num_layers: int = 0) -> None:
        self.num_layers = num_layers
        self.cursor = (0, 1)  # (layer last streamed, direction +1 forward / -1 backward)

    def advance(self, layer: int) -> None:
        """``layer`` (store index) was just streamed."""
        last, direction = self.cursor
        if layer > last:
            direction = 1
        elif layer < last:
            direction = -1
        elif layer == self.num_layers - 1:
            direction = -1  # the forward pass ended: the backward pass starts here
        elif layer == 0:
            direction = 1
        self.cursor = (layer, direction)

    def distance(self, layer: int, part: str) -> int:
        """Passes until the stream next needs ``part`` of ``layer`` (0: now)."""
        num = 2 * self.num_layers
        current, direction = self.cursor
        here = current if direction > 0 else num - 1 - current
        uses = [num - 1 - layer] if part == STATE else [layer, num - 1 - layer]
        return min((use - here) % num for use in uses)

    def upcoming(self) -> list[tuple[int, str]]:
        """(layer, part) in the order streaming will need them, after the cursor."""
        num_layers = self.num_layers
        layer, direction = self.cursor
        order = []
        for _ in range(2 * num_layers):
            if direction > 0:
                if layer == num_layers - 1:
                    direction = -1
                else:
                    layer += 1
            elif layer == 0:
                direction = 1
            else:
                layer -= 1
            if direction < 0:
                order.append((layer, STATE))
            order.append((layer, WEIGHTS))
        return order


class Prefetcher:
    """A thread that loads ``order.upcoming()`` with ``load(layer, part)`` whenever woken.

    ``load`` returns False when there is no room: the prefetcher then stops
    rather than skip ahead, so what it holds is always what streaming needs next.
    """

    def __init__(self, order: StreamOrder, load: Callable[[int, str], bool]) -> None:
        self._order = order
        self._load = load
        self._wanted = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wanted.set()

    def close(self) -> None:
        self._closed = True
        self._wanted.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            if self._closed:
                return
            for layer, part in self._order.upcoming():
                if self._wanted.is_set() or self._closed:
                    break  # the stream moved on: plan again from the new cursor
                if not self._load(layer, part):
                    break  # no room: keep streaming order, do not skip ahead


__all__ = ["STATE", "WEIGHTS", "Cache", "CacheKey", "Ledger", "Prefetcher", "StreamOrder"]
