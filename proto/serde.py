"""The serde boundary: torch tensors <-> chunked layer streams <-> LayerMessage.

Protobuf types stop here (and in ``proto.messages``, ``proto.clients`` and
the thin servicers). Everything else in the project sees tensors, layouts and
the plain dataclasses of ``proto.domain``. A layer stream is one ``Header``
followed by each tensor of the layer, in layout order, as ``Chunk`` s of raw
bytes of at most ``chunk_bytes``; ``to_wire`` / ``from_wire`` turn each of
them into a ``LayerMessage`` and back.

``LayerAssembler`` checks an incoming stream against what the receiver
expects (layer, step, phase, names, shapes, dtype, offsets, sizes) and raises
``WireError`` on the first mismatch, before any state changes; services map
that to gRPC ``INVALID_ARGUMENT``.

Masked tensors (weight sparsity) travel in the encodings of ``proto.sparse``:
weights as surviving values plus an index (``bitmap`` / ``indices``) when
that is smaller than the dense tensor, gradients as ``masked_values`` (the
receiver holds the mask). ``tensor_bytes`` is then the payload size.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from core.mask_positions import kept_positions
from core.precision import PRECISIONS
from proto import tensor_pb2 as pb
from proto.domain import Chunk, Header, StreamItem

# The torch-free part of the boundary (stream items <-> messages), re-exported here.
from proto.frames import (  # noqa: F401
    DEFAULT_CHUNK_BYTES,
    DENSE,
    MASKED_VALUES,
    PHASE_NAMES,
    PHASES,
    SPARSE_WEIGHTS,
    WIRE_ITEMSIZES,
    WireError,
    chunk_fields,
    chunk_values,
    from_wire,
    from_wire_stream,
    layer_header,
    payload_bytes,
    recast_chunk,
    recast_header,
    to_wire,
    to_wire_stream,
    verify_shared,
    wider_dtype,
)

assert sys.byteorder == "little", "raw tensor bytes on the wire are little-endian"

#: The dtypes tensors travel in, by wire name: the precisions of ``core.precision`` that
#: torch has (one vocabulary; cbfloat16 exists only in the cost model).
WIRE_DTYPES: dict[str, torch.dtype] = {
    fmt.wire_name: fmt.torch_dtype for fmt in PRECISIONS.values() if fmt.wire_name is not None
}

Layout = Sequence[tuple[str, tuple[int, ...]]]


def layout_of(tensors: Mapping[str, torch.Tensor]) -> list[tuple[str, tuple[int, ...]]]:
    return [(name, tuple(t.shape)) for name, t in tensors.items()]


def dtype_name(dtype: torch.dtype) -> str:
    for name, dt in WIRE_DTYPES.items():
        if dt == dtype:
            return name
    raise WireError(f"dtype {dtype} cannot travel on the wire; use one of {', '.join(WIRE_DTYPES)}")


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.dtype == torch.bfloat16:
        # numpy has no bfloat16; the bytes are the same through an int16 view.
        flat = flat.view(torch.int16)
    return memoryview(flat.numpy()).cast("B")


def _from_raw(data: bytes | memoryview, dtype: str) -> torch.Tensor:
    wire = WIRE_DTYPES[dtype]
    if wire == torch.bfloat16:
        return torch.frombuffer(bytearray(data), dtype=torch.int16).view(torch.bfloat16)
    return torch.frombuffer(bytearray(data), dtype=wire)


def recast_bytes(data: bytes | memoryview, source: str, target: str) -> bytes:
    """Raw ``source``-dtype values rounded to ``target`` (``proto.frames.recast_chunk``)."""
    return bytes(_raw_bytes(_from_raw(data, source).to(WIRE_DTYPES[target])))


def _num_kept(mask: torch.Tensor) -> int:
    """Entries a mask (True = pruned) keeps: its positions, found once per mask."""
    return int(kept_positions(mask).size)


def sends_sparse(mask: torch.Tensor, dtype: str) -> bool:
    """True when ``encode_layer`` sends a weight with ``mask`` as values + index."""
    from proto.sparse import beats_dense  # proto.sparse imports this module

    return beats_dense(mask.numel(), _num_kept(mask), dtype)


def _payload(
    tensor: torch.Tensor,
    dtype: str,
    sparse_mask: torch.Tensor | None,
    values_mask: torch.Tensor | None,
) -> tuple[memoryview | bytes, str, int]:
    """Raw bytes, encoding and index size of one tensor on the wire."""
    from proto.sparse import encode_masked_values, encode_sparse

    if values_mask is not None:
        return encode_masked_values(tensor, values_mask, dtype=dtype), MASKED_VALUES, 0
    if sparse_mask is not None and sends_sparse(sparse_mask, dtype):
        payload = encode_sparse(tensor, sparse_mask, dtype=dtype)
        return payload.to_bytes(), payload.encoding, payload.index_bytes
    return _raw_bytes(tensor.detach().to(WIRE_DTYPES[dtype])), "", 0


def layer_items(
    layer: int,
    step: int,
    phase: int,
    tensors: Mapping[str, torch.Tensor],
    *,
    dtype: str = "float32",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    sender: str = "",
    masks: Mapping[str, torch.Tensor] | None = None,
    masked_values: Mapping[str, torch.Tensor] | None = None,
    dense_gradients: bool = False,
) -> Iterator[StreamItem]:
    """Yield the ``Header``, then every tensor (cast to ``dtype``) as raw-byte ``Chunk`` s.

    Tensors with a mask in ``masks`` (True = pruned) travel as values + index
    where that is smaller (``sends_sparse``); those in ``masked_values`` as
    their surviving values only. Without either, the stream is the dense one.
    """
    wire_dtype = WIRE_DTYPES[dtype]
    masks = masks or {}
    masked_values = masked_values or {}
    if not masks and not masked_values:
        cast = {name: t.detach().to(wire_dtype) for name, t in tensors.items()}
        payloads = {name: (_raw_bytes(t), "", 0) for name, t in cast.items()}
    else:
        payloads = {
            name: _payload(t, dtype, masks.get(name), masked_values.get(name))
            for name, t in tensors.items()
        }
    total = sum(len(raw) for raw, _, _ in payloads.values())
    # Chunks hold whole values, so that a receiver (SwarmX) can read each one as values.
    itemsize = WIRE_ITEMSIZES[dtype]
    chunk_bytes = max(itemsize, chunk_bytes - chunk_bytes % itemsize)
    yield layer_header(
        layer,
        step,
        phase,
        num_tensors=len(payloads),
        total_bytes=total,
        sender=sender,
        dense_gradients=dense_gradients,
    )
    for name, (raw, encoding, index_bytes) in payloads.items():
        shape = tuple(tensors[name].shape)
        size = len(raw)
        # A zero-size tensor still sends one empty chunk so the receiver sees it.
        for offset in range(0, max(size, 1), chunk_bytes):
            yield Chunk(
                layer=layer,
                step=step,
                name=name,
                dtype=dtype,
                shape=shape,
                offset=offset,
                tensor_bytes=size,
                data=raw[offset : offset + chunk_bytes],
                encoding=encoding,
                index_bytes=index_bytes,
            )


def encode_layer(
    layer: int,
    step: int,
    phase: int,
    tensors: Mapping[str, torch.Tensor],
    **options,
) -> Iterator[pb.LayerMessage]:
    """``layer_items`` as the ``LayerMessage`` s that carry them (same keyword options)."""
    return to_wire_stream(layer_items(layer, step, phase, tensors, **options))


def _normal(encoding: str) -> str:
    return "" if encoding == "dense" else encoding


@dataclass(frozen=True)
class Expected:
    """What a receiver accepts for one layer stream.

    ``sparse``: any tensor may come as values + index (weights of a sparse
    model); ``masks``: these tensors must come as ``masked_values`` under
    their mask (True = pruned), the others dense.
    """

    layer: int
    step: int
    phase: int
    layout: Layout
    dtype: str
    sparse: bool = False
    masks: Mapping[str, torch.Tensor] | None = None

    def __post_init__(self) -> None:
        assert self.dtype in WIRE_DTYPES


class LayerAssembler:
    """Validates one incoming layer stream and rebuilds its tensors."""

    def __init__(self, expected: Expected):
        self.expected = expected
        self.header: Header | None = None
        self._tensors: dict[str, torch.Tensor] = {}
        self._index = 0  # position in the layout of the tensor being received
        self._received = 0  # bytes of the current tensor received so far
        self.payload_bytes = 0
        #: Masks (True = pruned) of the tensors that arrived as values + index.
        self.masks: dict[str, torch.Tensor] = {}
        self._itemsize = WIRE_ITEMSIZES[expected.dtype]
        masks = expected.masks or {}
        self._sizes = [
            (
                _num_kept(masks[name]) * self._itemsize
                if name in masks
                else math.prod(shape) * self._itemsize
            )
            for name, shape in expected.layout
        ]
        self._encoding = ""  # encoding of the tensor being received
        self._index_bytes = 0
        self._buffer: bytearray | None = None  # payload of a non-dense tensor

    def _fail(self, what: str) -> None:
        e = self.expected
        raise WireError(
            f"rejected layer stream for layer {e.layer}, step {e.step}, "
            f"phase {PHASE_NAMES.get(e.phase, e.phase)}: {what}"
        )

    def add(self, item: StreamItem | pb.LayerMessage) -> None:
        """Take the next element of the stream, as a domain item or as the message carrying it."""
        if isinstance(item, pb.LayerMessage):
            if item.WhichOneof("kind") is None:
                self._fail("empty message (neither header nor chunk)")
            item = from_wire(item)
        if isinstance(item, Header):
            self._add_header(item)
        else:
            self._add_chunk(item)

    def _add_header(self, header: Header) -> None:
        e = self.expected
        if self.header is not None:
            self._fail("a second header in the same stream")
        if header.layer != e.layer:
            self._fail(f"header layer {header.layer}, expected {e.layer}")
        if header.step != e.step:
            self._fail(f"header step {header.step}, expected {e.step}")
        if header.phase != e.phase:
            self._fail(
                f"header phase {PHASE_NAMES.get(header.phase, header.phase)}, "
                f"expected {PHASE_NAMES.get(e.phase, e.phase)}"
            )
        if header.num_tensors != len(e.layout):
            self._fail(f"header announces {header.num_tensors} tensors, expected {len(e.layout)}")
        # A sparse stream's size depends on masks the receiver does not know yet: see finish.
        if not e.sparse and header.total_bytes != sum(self._sizes):
            self._fail(f"header announces {header.total_bytes} bytes, expected {sum(self._sizes)}")
        self.header = header

    def _add_chunk(self, chunk: Chunk) -> None:
        e = self.expected
        if self.header is None:
            self._fail("a chunk arrived before the header")
        if self._index >= len(e.layout):
            self._fail(f"chunk for {chunk.name!r} after all {len(e.layout)} tensors were complete")
        name, shape = e.layout[self._index]
        size = self._sizes[self._index]
        if chunk.layer != e.layer or chunk.step != e.step:
            self._fail(f"chunk of layer {chunk.layer} step {chunk.step} inside this stream")
        if chunk.name != name:
            self._fail(f"chunk for tensor {chunk.name!r}, expected {name!r}")
        if chunk.dtype != e.dtype:
            self._fail(f"tensor {name!r} has dtype {chunk.dtype!r}, expected {e.dtype!r}")
        if tuple(chunk.shape) != tuple(shape):
            self._fail(f"tensor {name!r} has shape {list(chunk.shape)}, expected {list(shape)}")
        if self._received == 0:
            size = self._start_tensor(name, shape, chunk)
        elif (_normal(chunk.encoding), chunk.index_bytes) != (self._encoding, self._index_bytes):
            self._fail(f"tensor {name!r} changes its encoding mid-tensor")
        if chunk.tensor_bytes != size:
            self._fail(f"tensor {name!r} announces {chunk.tensor_bytes} bytes, expected {size}")
        if chunk.offset != self._received:
            self._fail(f"tensor {name!r} chunk at offset {chunk.offset}, expected {self._received}")
        if self._received + len(chunk.data) > size:
            self._fail(
                f"tensor {name!r} overflows: {self._received + len(chunk.data)} bytes of {size}"
            )
        if self._buffer is not None:
            self._buffer += chunk.data
            verify_shared(chunk)
            self._received += len(chunk.data)
            self.payload_bytes += len(chunk.data)
            if self._received == size:
                self._decode(name, shape)
            return
        if name not in self._tensors:
            self._tensors[name] = torch.empty(shape, dtype=WIRE_DTYPES[e.dtype])
        target = self._tensors[name].view(-1)
        if target.dtype == torch.bfloat16:
            target = target.view(torch.int16)
        np_bytes = target.numpy().view(np.uint8)
        np_bytes[self._received : self._received + len(chunk.data)] = np.frombuffer(
            chunk.data, dtype=np.uint8
        )
        # The slot may have been reused during the copy (proto.shm): then the step re-runs.
        verify_shared(chunk)
        self._received += len(chunk.data)
        self.payload_bytes += len(chunk.data)
        if self._received == size:
            self._index += 1
            self._received = 0

    def _start_tensor(self, name: str, shape: tuple[int, ...], chunk: Chunk) -> int:
        """Check the first chunk's encoding; returns the tensor's payload size."""
        from proto.sparse import index_nbytes

        e = self.expected
        masked = e.masks is not None and name in e.masks
        encoding = _normal(chunk.encoding)
        allowed = [MASKED_VALUES] if masked else ["", *(SPARSE_WEIGHTS if e.sparse else ())]
        if encoding not in allowed:
            self._fail(
                f"tensor {name!r} has encoding {chunk.encoding!r}, expected one of "
                f"{[a or 'dense' for a in allowed]}"
            )
        self._encoding, self._index_bytes = encoding, chunk.index_bytes
        size = self._sizes[self._index]
        if encoding in SPARSE_WEIGHTS:
            numel = math.prod(shape)
            value_bytes = chunk.tensor_bytes - chunk.index_bytes
            num_kept, rest = divmod(value_bytes, self._itemsize)
            if chunk.index_bytes < 0 or rest or not 0 <= num_kept <= numel:
                self._fail(
                    f"tensor {name!r} announces {chunk.tensor_bytes} bytes with a "
                    f"{chunk.index_bytes}-byte index: not whole values of at most {numel} entries"
                )
            if chunk.index_bytes != index_nbytes(numel, num_kept, encoding):
                self._fail(
                    f"tensor {name!r} has a {chunk.index_bytes}-byte {encoding} index for "
                    f"{num_kept} of {numel} entries, expected "
                    f"{index_nbytes(numel, num_kept, encoding)}"
                )
            size = chunk.tensor_bytes
        elif chunk.index_bytes:
            self._fail(f"tensor {name!r} is {encoding or 'dense'} but has an index")
        self._sizes[self._index] = size
        self._buffer = bytearray() if encoding else None
        return size

    def _decode(self, name: str, shape: tuple[int, ...]) -> None:
        from proto.sparse import decode_masked_values, decode_sparse

        e = self.expected
        try:
            if self._encoding == MASKED_VALUES:
                assert e.masks is not None
                self._tensors[name] = decode_masked_values(
                    bytes(self._buffer), e.masks[name], dtype=e.dtype
                )
            else:
                tensor, mask = decode_sparse(
                    bytes(self._buffer),
                    encoding=self._encoding,
                    index_bytes=self._index_bytes,
                    shape=tuple(shape),
                    dtype=e.dtype,
                )
                self._tensors[name], self.masks[name] = tensor, mask
        except WireError as exc:
            self._fail(f"tensor {name!r} does not decode: {exc}")
        self._buffer = None
        self._index += 1
        self._received = 0

    @property
    def complete(self) -> bool:
        """The header and every tensor of the layout have arrived (a stream of several layers
        goes on with the next layer's header)."""
        return self.header is not None and self._index >= len(self.expected.layout)

    def finish(self) -> dict[str, torch.Tensor]:
        """The complete tensors; raises WireError if the stream ended early."""
        if self.header is None:
            self._fail("the stream ended without a header")
        if self._index < len(self.expected.layout):
            name, _ = self.expected.layout[self._index]
            self._fail(
                f"the stream ended early, in tensor {name!r} "
                f"({self._index} of {len(self.expected.layout)} tensors complete)"
            )
        if self.header.total_bytes != self.payload_bytes:
            self._fail(
                f"header announced {self.header.total_bytes} bytes, "
                f"the tensors held {self.payload_bytes}"
            )
        return self._tensors


def decode_layer(
    messages: Iterable[StreamItem | pb.LayerMessage], expected: Expected
) -> dict[str, torch.Tensor]:
    assembler = LayerAssembler(expected)
    for message in messages:
        assembler.add(message)
    return assembler.finish()
