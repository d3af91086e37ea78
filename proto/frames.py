"""Layer-stream items on the wire without torch: ``Header`` / ``Chunk`` <-> ``LayerMessage``.

What a SwarmX node does to a stream (route, split, sum float32 gradients with numpy,
frame and parse messages) needs neither torch nor tensors, so this part of the serde
boundary (``proto.serde``, which re-exports all of it) imports neither: a process that
hosts only SwarmX nodes then never imports torch, which costs seconds of CPU at its
start and a hundred MB of memory. ``tests/proto/test_frames.py`` checks that.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Sequence

import numpy as np

from core.precision import PRECISIONS
from proto import tensor_pb2 as pb
from proto.domain import Chunk, Header, Phase, SharedSlot, StreamItem

DEFAULT_CHUNK_BYTES = 1 << 20

#: Bytes per element of each dtype tensors travel in, by wire name (``proto.serde``'s
#: ``WIRE_DTYPES`` has their torch dtypes).
WIRE_ITEMSIZES: dict[str, int] = {
    fmt.wire_name: fmt.bytes_per_element for fmt in PRECISIONS.values() if fmt.wire_name is not None
}

DENSE = ("", "dense")  # encodings of a plain tensor (proto3 default "")
SPARSE_WEIGHTS = ("bitmap", "indices")
MASKED_VALUES = "masked_values"

assert all(pb.Phase.Value(p.name) == p for p in Phase), "proto.domain.Phase matches tensor.proto"
PHASES = {"forward": Phase.FORWARD, "backward": Phase.BACKWARD, "eval": Phase.EVAL}
PHASE_NAMES = {v: k for k, v in PHASES.items()}


class WireError(ValueError):
    """A message that does not match what the receiver expects."""


def wider_dtype(dtypes: Sequence[str]) -> str:
    """The one wire dtype from which every dtype in ``dtypes`` is one rounding away."""
    unique = set(dtypes)
    return unique.pop() if len(unique) == 1 else "float32"


def recast_header(header: Header, source: str, target: str) -> Header:
    """``header`` of a dense stream in ``source`` dtype, for the same stream in ``target``."""
    ratio_num, ratio_den = WIRE_ITEMSIZES[target], WIRE_ITEMSIZES[source]
    return dataclasses.replace(header, total_bytes=header.total_bytes * ratio_num // ratio_den)


def recast_chunk(chunk: Chunk, target: str) -> Chunk:
    """A dense chunk's values rounded to ``target`` (a heterogeneous cluster's narrower node).

    Rounding fp32 once to ``target`` is what MemoryX would have sent that node itself, so
    the node sees the same bytes as in a cluster of its own kind.
    """
    if chunk.dtype == target:
        return chunk
    if chunk.encoding not in DENSE:
        raise WireError(
            f"a {chunk.encoding} chunk of {chunk.name!r} cannot be recast to {target}; "
            "sparse streams travel in one dtype"
        )
    source_size, target_size = WIRE_ITEMSIZES[chunk.dtype], WIRE_ITEMSIZES[target]
    # torch rounds (bfloat16 as well): imported only where a mixed tree recasts.
    from proto.serde import recast_bytes

    data = recast_bytes(chunk.data, chunk.dtype, target)
    verify_shared(chunk)
    return dataclasses.replace(
        chunk,
        dtype=target,
        offset=chunk.offset * target_size // source_size,
        tensor_bytes=chunk.tensor_bytes * target_size // source_size,
        data=data,
    )


def _shm():
    """``proto.shm``, which imports this module: imported on first use, then kept (an
    import statement in a function costs a microsecond or two on every chunk)."""
    global _SHM_MODULE
    if _SHM_MODULE is None:
        from proto import shm

        _SHM_MODULE = shm
    return _SHM_MODULE


_SHM_MODULE = None


def verify_shared(chunk: Chunk) -> None:
    """After a copy of a chunk's data: WireError if it viewed a reused shared-memory slot."""
    if chunk.shared is not None:
        _shm().verify(chunk.shared)


def layer_header(
    layer: int,
    step: int,
    phase: int,
    *,
    num_tensors: int,
    total_bytes: int,
    sender: str,
    dense_gradients: bool = False,
) -> Header:
    return Header(
        layer=layer,
        step=step,
        phase=phase,
        num_tensors=num_tensors,
        total_bytes=total_bytes,
        sender=sender,
        dense_gradients=dense_gradients,
    )


def chunk_fields(item: Chunk, data: bytes = b"") -> pb.TensorChunk:
    """A chunk's protobuf message; ``data`` empty for an encoder that appends the values itself."""
    return pb.TensorChunk(
        layer=item.layer,
        step=item.step,
        name=item.name,
        dtype=item.dtype,
        shape=item.shape,
        offset=item.offset,
        tensor_bytes=item.tensor_bytes,
        data=data,
        encoding=item.encoding,
        index_bytes=item.index_bytes,
    )


#: A layer of at most this many payload bytes travels as one ``LayerBundle`` message
#: (``bundled``): a message costs a thread hand-off in every process it crosses, more than
#: a small layer's bytes; a larger layer streams chunk by chunk (cut-through).
BUNDLE_MAX_BYTES = DEFAULT_CHUNK_BYTES


@dataclasses.dataclass(frozen=True)
class Bundle:
    """A small layer whole, its header and then its chunks, sent as one ``LayerBundle``."""

    items: tuple[StreamItem, ...]


def _completes_tensor(chunk: Chunk) -> bool:
    # A tensor is complete when a chunk reaches its tensor_bytes (a zero-size one: one
    # empty chunk), as ``next_layer`` reads it.
    return chunk.offset + len(chunk.data) >= chunk.tensor_bytes


class Bundler:
    """``bundled`` for a stream that is pushed item by item (``add``) rather than read.

    ``add`` returns what may go on now: nothing while a small layer is being gathered, its
    ``Bundle`` once it is whole, and the items as they came when something else interrupts
    it (that item may start a bundle of its own). ``flush`` gives what is gathered.
    """

    def __init__(self, max_bytes: int = BUNDLE_MAX_BYTES):
        self._max_bytes = max_bytes
        self._gathered: list[StreamItem] = []
        self._remaining = 0  # tensors of the gathered layer still incomplete
        self._size = 0

    def add(self, item: object) -> list:
        gathered = self._gathered
        if gathered:
            header = gathered[0]
            if isinstance(item, Chunk) and self._size + len(item.data) <= header.total_bytes:
                gathered.append(item)
                self._size += len(item.data)
                if _completes_tensor(item):
                    self._remaining -= 1
                if self._remaining:
                    return []
                self._gathered = []
                return [Bundle(tuple(gathered))]
            return self.flush() + self.add(item)
        if (
            isinstance(item, Header)
            and item.num_tensors > 0
            and item.total_bytes <= self._max_bytes
        ):
            self._gathered, self._remaining, self._size = [item], item.num_tensors, 0
            return []
        return [item]

    def flush(self) -> list:
        gathered, self._gathered = self._gathered, []
        return gathered


def bundled(items: Iterable, max_bytes: int = BUNDLE_MAX_BYTES) -> Iterator:
    """``items`` (a layer stream, or a pass's layers one after another) with each layer of
    at most ``max_bytes`` payload gathered into one ``Bundle``.

    Reads no further than a layer's last chunk, so it may stand between a queue that is
    still filling and gRPC. A layer that is not whole when something else comes (the
    stream ends, or its chunks exceed its header's size) goes on item by item, as it came.
    """
    bundler = Bundler(max_bytes)
    for item in items:
        yield from bundler.add(item)
    yield from bundler.flush()


class HeldLayers:
    """Whole small layers (each a ``Bundle``) held back to go on together as one
    ``Bundle`` of at most ``max_bytes`` payload: the root's run to its children, the sums
    that go up at once, MemoryX's answer to a run asked for in one message."""

    __slots__ = ("items", "size", "max_bytes")

    def __init__(self, max_bytes: int = BUNDLE_MAX_BYTES):
        self.items: list[StreamItem] = []
        self.size = 0  # payload bytes held
        self.max_bytes = max_bytes

    def __bool__(self) -> bool:
        return bool(self.items)

    def fits(self, size: int) -> bool:
        """Whether a layer of ``size`` payload bytes may join what is held."""
        return not self.items or self.size + size <= self.max_bytes

    def add(self, bundle: Bundle, size: int) -> None:
        self.items.extend(bundle.items)
        self.size += size

    def take(self) -> Bundle:
        """What is held, as one ``Bundle``; nothing is held after."""
        bundle = Bundle(tuple(self.items))
        self.items, self.size = [], 0
        return bundle


def to_wire(item: StreamItem | Bundle) -> pb.LayerMessage:
    """One element of a layer stream (or a ``Bundle`` of them) as the protobuf message
    that carries it."""
    if isinstance(item, Bundle):
        return pb.LayerMessage(bundle=pb.LayerBundle(items=[to_wire(i) for i in item.items]))
    if isinstance(item, Chunk):
        # protobuf takes bytes, not a memoryview; bytes(bytes) is no copy.
        message = pb.LayerMessage(chunk=chunk_fields(item, bytes(item.data)))
        verify_shared(item)
        return message
    return pb.LayerMessage(
        header=pb.LayerHeader(
            layer=item.layer,
            step=item.step,
            phase=item.phase,
            num_tensors=item.num_tensors,
            total_bytes=item.total_bytes,
            sender=item.sender,
            dense_gradients=item.dense_gradients,
            pass_id=item.pass_id,
            pass_position=item.pass_position,
            pass_length=item.pass_length,
            gradient_in_answer=item.gradient_in_answer,
        )
    )


def chunk_from_pb(c: pb.TensorChunk, data: bytes | memoryview) -> Chunk:
    """The ``Chunk`` of a ``TensorChunk``, its payload ``data`` (the wire codec passes a view).

    A chunk whose payload lies in shared memory (``proto.shm``) views its slot instead."""
    shared = None
    if c.HasField("shared"):
        if len(data):
            raise WireError(f"chunk of {c.name!r} carries both bytes and a shared-memory slot")
        shared = SharedSlot(
            c.shared.segment, c.shared.slot, c.shared.length, c.shared.generation, c.shared.offset
        )
        data = _shm().view(shared)
    chunk = Chunk(
        layer=c.layer,
        step=c.step,
        name=c.name,
        dtype=c.dtype,
        shape=tuple(c.shape),
        offset=c.offset,
        tensor_bytes=c.tensor_bytes,
        data=data,
        encoding=c.encoding,
        index_bytes=c.index_bytes,
    )
    if shared is not None:
        object.__setattr__(chunk, "shared", shared)
    return chunk


def from_wire(message: pb.LayerMessage | StreamItem) -> StreamItem:
    """The ``Header`` or ``Chunk`` a ``LayerMessage`` carries; WireError if it carries neither.

    An item decoded already (``proto.wire.decode`` gives them) is returned as it is."""
    if isinstance(message, Chunk | Header):
        return message
    kind = message.WhichOneof("kind")
    if kind == "chunk":
        return chunk_from_pb(message.chunk, message.chunk.data)
    if kind == "bundle":
        raise WireError("a layer bundle carries several items: read it with expand")
    if kind == "header":
        h = message.header
        return Header(
            layer=h.layer,
            step=h.step,
            phase=h.phase,
            num_tensors=h.num_tensors,
            total_bytes=h.total_bytes,
            sender=h.sender,
            dense_gradients=h.dense_gradients,
            pass_id=h.pass_id,
            pass_position=h.pass_position,
            pass_length=h.pass_length,
            gradient_in_answer=h.gradient_in_answer,
        )
    raise WireError("empty layer message (neither header nor chunk)")


def expand(message: pb.LayerMessage | StreamItem | Bundle) -> tuple[StreamItem, ...]:
    """The items one received message carries: its one item, or a bundle's (a header and
    its chunks, or on a pass stream several such layers one after another); WireError if
    any is not valid."""
    if isinstance(message, Bundle):
        parts: Sequence = message.items
    elif isinstance(message, pb.LayerMessage) and message.WhichOneof("kind") == "bundle":
        parts = message.bundle.items
    else:
        return (from_wire(message),)
    if any(
        isinstance(p, Bundle) or (isinstance(p, pb.LayerMessage) and p.HasField("bundle"))
        for p in parts
    ):
        raise WireError("a layer bundle holds another bundle; it holds a header and chunks")
    items = tuple(from_wire(p) for p in parts)
    if not items or not isinstance(items[0], Header):
        raise WireError("a layer bundle must start with its layer's header")
    return items


def from_wire_stream(messages: Iterable[pb.LayerMessage]) -> Iterator[StreamItem]:
    """The items of a stream of messages (``expand``), lazily (the stream may still be
    arriving)."""
    for message in messages:
        yield from expand(message)


async def from_wire_stream_async(
    messages: AsyncIterable[pb.LayerMessage],
) -> AsyncIterator[StreamItem]:
    """``from_wire_stream`` for a stream that arrives on an event loop."""
    async for message in messages:
        for item in expand(message):
            yield item


class PassItems:
    """``from_wire_stream_async`` that can tell whether the message last received still
    holds items not read (``buffered``): a relay that got a run of small layers in one
    message sends them on as one too (``swarmx.pass_relay``)."""

    def __init__(self, messages: AsyncIterable[pb.LayerMessage]):
        self._messages = aiter(messages)
        self._items: collections.deque[StreamItem] = collections.deque()

    def __aiter__(self) -> PassItems:
        return self

    async def __anext__(self) -> StreamItem:
        while not self._items:
            self._items.extend(expand(await anext(self._messages)))
        return self._items.popleft()

    def buffered(self) -> bool:
        return bool(self._items)


class StreamItems:
    """``from_wire_stream`` that can tell whether the message last received still holds
    items not read (``buffered``), as ``PassItems`` on a loop: MemoryX answers the
    gradient layers that came in one message in one message too."""

    def __init__(self, messages: Iterable[pb.LayerMessage]):
        self._messages = iter(messages)
        self._items: collections.deque[StreamItem] = collections.deque()

    def __iter__(self) -> StreamItems:
        return self

    def __next__(self) -> StreamItem:
        while not self._items:
            self._items.extend(expand(next(self._messages)))
        return self._items.popleft()

    def buffered(self) -> bool:
        return bool(self._items)


def next_layer(items: Iterator[StreamItem]) -> Iterator[StreamItem]:
    """The next layer of a stream of several (``MemoryX.StreamPass``): its header and chunks.

    Stops right after the chunk that completes the header's ``num_tensors``-th tensor
    (a tensor is complete when a chunk reaches its ``tensor_bytes``; a zero-size one
    sends one empty chunk), without reading on: the next layer may not be sent yet.
    """
    header = next(items, None)
    if not isinstance(header, Header):
        raise WireError("each layer of a pass stream starts with a header")
    yield header
    remaining = header.num_tensors
    while remaining > 0:
        chunk = next(items, None)
        if not isinstance(chunk, Chunk):
            raise WireError(
                f"layer {header.layer} of a pass stream ended with {remaining} of "
                f"{header.num_tensors} tensors still to come"
            )
        yield chunk
        if chunk.offset + len(chunk.data) >= chunk.tensor_bytes:
            remaining -= 1


def to_wire_stream(items: Iterable[StreamItem]) -> Iterator[pb.LayerMessage]:
    """``to_wire`` over a stream, lazily: chunks are built as the transport asks for them."""
    for item in items:
        yield to_wire(item)


def payload_bytes(items: Iterable[StreamItem | Bundle]) -> int:
    """Payload bytes of the chunks among ``items`` (and in their bundles)."""
    return sum(
        payload_bytes(item.items) if isinstance(item, Bundle) else len(item.data)
        for item in items
        if isinstance(item, Chunk | Bundle)
    )


def chunk_values(chunk: Chunk) -> np.ndarray:
    """A float32 view of a float32 chunk's data (for summing in SwarmX)."""
    if chunk.dtype != "float32":
        raise WireError(
            f"gradient chunk for {chunk.name!r} is {chunk.dtype}; gradients travel as float32"
        )
    if len(chunk.data) % 4:
        raise WireError(
            f"gradient chunk for {chunk.name!r} holds {len(chunk.data)} bytes, "
            "not a whole number of float32 values"
        )
    return np.frombuffer(chunk.data, dtype=np.float32)
