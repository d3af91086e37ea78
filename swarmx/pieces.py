"""A layer split over several MemoryX servers, as the SwarmX root sees it.

Each owner holds some of the layer's tensors whole and flat element ranges
(pieces) of others, in the layer's order. Down, the root joins the owners'
weight streams into the one stream of the whole layer: a piece's chunks are
renamed to the tensor and moved to its offset in it. Up, the root cuts each
summed gradient chunk at the pieces' bounds and sends every part to the owner
of those elements, as that owner's own layer stream. Chunks hold whole values
and the sums are elementwise, so the result is bitwise the one of an unsplit
layer.
"""

from __future__ import annotations

import dataclasses
import math
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import grpc

from proto.domain import Chunk, Header, LayerAck, Phase, StreamItem
from proto.frames import (
    WIRE_ITEMSIZES,
    WireError,
    from_wire,
    from_wire_stream,
    to_wire,
    verify_shared,
)
from proto.messages import ack_from_wire, ack_to_wire

#: Ends a queued stream (the SwarmX node's outboxes use the same).
END = object()


@dataclass(frozen=True)
class HeldPiece:
    """Elements ``start..stop`` of tensor ``name`` (full ``shape``), held as ``key``."""

    key: str
    name: str
    shape: tuple[int, ...]
    start: int
    stop: int

    @property
    def full_numel(self) -> int:
        return math.prod(self.shape)

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.stop == self.full_numel


@dataclass(frozen=True)
class SplitLayer:
    """The owners of one split layer, in element order: (owner index, pieces it holds)."""

    owners: tuple[tuple[int, tuple[HeldPiece, ...]], ...]

    @classmethod
    def from_plain(cls, owners: Sequence[tuple[int, Sequence[Sequence]]]) -> SplitLayer:
        """From ``[(owner, [(key, name, shape, start, stop), ...]), ...]`` (what Ray carries)."""
        return cls(
            tuple(
                (owner, tuple(HeldPiece(k, n, tuple(s), a, b) for k, n, s, a, b in pieces))
                for owner, pieces in owners
            )
        )

    @property
    def num_tensors(self) -> int:
        return len({p.name for _, pieces in self.owners for p in pieces})


def _itemsize(dtype: str) -> int:
    if dtype not in WIRE_ITEMSIZES:
        raise WireError(f"chunk dtype {dtype!r} is not one of {', '.join(WIRE_ITEMSIZES)}")
    return WIRE_ITEMSIZES[dtype]


def joined_weights(
    split: SplitLayer, sources: Sequence[Iterator[StreamItem]]
) -> Iterator[StreamItem]:
    """The whole layer's weight stream from the owners' streams (``sources``, owner order)."""
    headers = []
    sources = [from_wire_stream(source) for source in sources]  # a small piece: one bundle
    for source in sources:
        header = next(source)
        if not isinstance(header, Header):
            raise WireError("a MemoryX weight stream must start with a header")
        headers.append(header)
    first = headers[0]
    yield to_wire(
        dataclasses.replace(
            first,
            num_tensors=split.num_tensors,
            total_bytes=sum(h.total_bytes for h in headers),
            dense_gradients=any(h.dense_gradients for h in headers),
        )
    )
    for (_, pieces), source in zip(split.owners, sources, strict=True):
        by_key = {p.key: p for p in pieces if not p.whole}
        for item in source:
            piece = by_key.get(item.name) if isinstance(item, Chunk) else None
            if piece is None:
                yield item
                continue
            if item.encoding:
                raise WireError(f"piece {item.name!r} of a split layer must travel dense")
            size = _itemsize(item.dtype)
            yield to_wire(
                dataclasses.replace(
                    item,
                    name=piece.name,
                    shape=piece.shape,
                    offset=piece.start * size + item.offset,
                    tensor_bytes=piece.full_numel * size,
                )
            )


class SplitPush:
    """One layer's summed gradient stream (put into ``outbox``) pushed to the layer's owners.

    Quacks like the ``grpc.Future`` of a single PushGradients call: ``done``,
    ``cancel`` and ``result`` (the owners' acks joined; the first failure raised).
    """

    def __init__(
        self,
        split: SplitLayer,
        push: Callable[[int], Callable[..., grpc.Future]],
        outbox: queue.Queue,
        timeout_s: float | None,
    ) -> None:
        self.split = split
        self._queues = [queue.Queue() for _ in split.owners]
        self._calls = [
            push(owner).future(_drain(q), timeout=timeout_s)
            for (owner, _), q in zip(split.owners, self._queues, strict=True)
        ]
        self._header: Header | None = None
        # Where each tensor's elements go: (queue, piece) in element order.
        self._routes: dict[str, list[tuple[queue.Queue, HeldPiece]]] = {}
        for (_, pieces), q in zip(split.owners, self._queues, strict=True):
            for piece in pieces:
                self._routes.setdefault(piece.name, []).append((q, piece))
        self._thread = threading.Thread(target=self._route, args=(outbox,), daemon=True)
        self._thread.start()

    def _route(self, outbox: queue.Queue) -> None:
        try:
            for message in _drain(outbox):
                item = from_wire(message)
                if isinstance(item, Header):
                    self._send_headers(item)
                else:
                    self._send_chunk(item)
        except WireError:
            self.cancel()
        finally:
            for q in self._queues:
                q.put(END)

    def _send_headers(self, header: Header) -> None:
        self._header = header
        for (_, pieces), q in zip(self.split.owners, self._queues, strict=True):
            total = sum((p.stop - p.start) * 4 for p in pieces)
            q.put(to_wire(dataclasses.replace(header, num_tensors=len(pieces), total_bytes=total)))

    def _send_chunk(self, chunk: Chunk) -> None:
        routes = self._routes.get(chunk.name)
        if routes is None:
            raise WireError(f"gradient of {chunk.name!r} is not a tensor of this layer")
        if len(routes) == 1 and routes[0][1].whole:
            routes[0][0].put(to_wire(chunk))
            return
        if chunk.dtype != "float32" or chunk.offset % 4 or len(chunk.data) % 4:
            raise WireError(f"gradient chunk of {chunk.name!r} is not whole float32 values")
        first = chunk.offset // 4
        last = first + len(chunk.data) // 4
        data = memoryview(chunk.data)
        for q, piece in routes:
            lo, hi = max(first, piece.start), min(last, piece.stop)
            if lo >= hi:
                continue
            q.put(
                to_wire(
                    dataclasses.replace(
                        chunk,
                        name=piece.key,
                        shape=(piece.stop - piece.start,),
                        offset=(lo - piece.start) * 4,
                        tensor_bytes=(piece.stop - piece.start) * 4,
                        data=data[(lo - first) * 4 : (hi - first) * 4],
                    )
                )
            )
        # to_wire copied the pieces; the slot they came from must not have been reused.
        verify_shared(chunk)

    def done(self) -> bool:
        return any(call.done() for call in self._calls)

    def cancel(self) -> bool:
        for call in self._calls:
            call.cancel()
        return True

    def result(self):  # the wire LayerAck, as a PushGradients future's result
        try:
            acks = [ack_from_wire(call.result()) for call in self._calls]
        except BaseException:
            self.cancel()
            raise
        header = self._header
        assert header is not None
        return ack_to_wire(
            LayerAck.total(acks, layer=header.layer, step=header.step, phase=Phase.BACKWARD)
        )


def _drain(q: queue.Queue) -> Iterable[StreamItem]:
    while (item := q.get()) is not END:
        yield item


__all__ = ["END", "HeldPiece", "SplitLayer", "SplitPush", "joined_weights"]
