"""Chunk-wise, cut-through gradient summation inside one SwarmX node.

Every child sends the same layer in the same chunking. Chunk j is summed as
soon as every child has sent its chunk j, and the sum goes up at once. The
sum runs in fp32 and always in child order, so a run is bitwise repeatable
however the children's streams interleave.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable

import numpy as np

from proto.domain import Chunk, Header, StreamItem
from proto.frames import WireError, chunk_values, verify_shared


class ChunkReduction:
    """Sums one layer's gradient streams from ``children`` for one step."""

    def __init__(self, children: tuple[str, ...], emit: Callable[[StreamItem], None]):
        self.children = children
        self._emit = emit
        self._lock = threading.Lock()
        self._header: Header | None = None
        self._opened: set[str] = set()  # children whose header has arrived
        self._pending: dict[int, dict[str, Chunk]] = {}
        self._num_emitted = 0
        self.received_bytes = 0
        self.emitted_bytes = 0

    def add_header(self, child: str, header: Header, sender: str) -> None:
        if child not in self.children:
            raise WireError(f"gradient stream from {child!r}, which is not a child of this node")
        with self._lock:
            if child in self._opened:
                raise WireError(f"child {child!r} sent a second header for this layer and step")
            if self._header is None:
                self._header = header
                self._emit(dataclasses.replace(header, sender=sender))
            elif (header.layer, header.step, header.num_tensors, header.total_bytes) != (
                self._header.layer,
                self._header.step,
                self._header.num_tensors,
                self._header.total_bytes,
            ):
                raise WireError(
                    f"child {child!r} announces layer {header.layer} step {header.step} with "
                    f"{header.num_tensors} tensors / {header.total_bytes} bytes, but its siblings "
                    f"announced layer {self._header.layer} step {self._header.step} with "
                    f"{self._header.num_tensors} tensors / {self._header.total_bytes} bytes"
                )
            self._opened.add(child)

    def add_chunk(self, child: str, index: int, chunk: Chunk) -> None:
        if child not in self.children:
            raise WireError(f"gradient chunk from {child!r}, which is not a child of this node")
        values = chunk_values(chunk)  # validates dtype before anything is kept
        with self._lock:
            if child not in self._opened:
                raise WireError(f"child {child!r} sent chunk {index} before its header")
            assert self._header is not None
            if (chunk.layer, chunk.step) != (self._header.layer, self._header.step):
                raise WireError(
                    f"child {child!r} chunk {index} is of layer {chunk.layer} step {chunk.step}, "
                    f"but the stream is for layer {self._header.layer} step {self._header.step}"
                )
            slot = self._pending.get(index, {})
            if child in slot:
                raise WireError(f"child {child!r} sent chunk {index} twice")
            if slot:
                first = next(iter(slot.values()))
                if (
                    first.name,
                    first.offset,
                    len(first.data),
                    tuple(first.shape),
                    first.tensor_bytes,
                ) != (
                    chunk.name,
                    chunk.offset,
                    len(chunk.data),
                    tuple(chunk.shape),
                    chunk.tensor_bytes,
                ):
                    raise WireError(
                        f"child {child!r} chunk {index} is {chunk.name!r}@{chunk.offset} "
                        f"({len(chunk.data)} of {chunk.tensor_bytes} bytes, shape "
                        f"{list(chunk.shape)}), siblings sent {first.name!r}@{first.offset} "
                        f"({len(first.data)} of {first.tensor_bytes} bytes, shape "
                        f"{list(first.shape)})"
                    )
            self._pending[index] = slot
            slot[child] = chunk
            self.received_bytes += len(values) * 4
            if len(slot) < len(self.children):
                return
            del self._pending[index]
            if len(self.children) == 1:
                # A sum of one: the chunk goes up as it came (as the bytes it arrived in).
                up = slot[self.children[0]]
            else:
                # In child order, into one new buffer: the same fp32 sums as ever.
                values = [chunk_values(slot[name]) for name in self.children]
                total = np.add(values[0], values[1])
                for more in values[2:]:
                    np.add(total, more, out=total)
                # Summed from shared-memory slots (proto.shm): none may have been reused.
                for name in self.children:
                    verify_shared(slot[name])
                up = dataclasses.replace(chunk, data=memoryview(total).cast("B"))
            self.emitted_bytes += len(up.data)
            self._num_emitted += 1
            self._emit(up)

    @property
    def complete(self) -> bool:
        return not self._pending
