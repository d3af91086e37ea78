"""The serde boundary: torch tensors <-> chunked LayerMessage streams.

Protobuf types stop here. Everything else in the project sees tensors,
layouts and plain Python values. A layer stream is one ``LayerHeader``
followed by each tensor of the layer, in layout order, as chunks of raw
bytes of at most ``chunk_bytes``.

``LayerAssembler`` checks an incoming stream against what the receiver
expects (layer, step, phase, names, shapes, dtype, offsets, sizes) and raises
``WireError`` on the first mismatch, before any state changes; services map
that to gRPC ``INVALID_ARGUMENT``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from proto import tensor_pb2 as pb

assert sys.byteorder == "little", "raw tensor bytes on the wire are little-endian"

DEFAULT_CHUNK_BYTES = 1 << 20

WIRE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

PHASES = {"forward": pb.FORWARD, "backward": pb.BACKWARD, "eval": pb.EVAL}
PHASE_NAMES = {v: k for k, v in PHASES.items()}


class WireError(ValueError):
    """A message that does not match what the receiver expects."""


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


def layer_header(
    layer: int, step: int, phase: int, *, num_tensors: int, total_bytes: int, sender: str
) -> pb.LayerMessage:
    return pb.LayerMessage(
        header=pb.LayerHeader(
            layer=layer,
            step=step,
            phase=phase,
            num_tensors=num_tensors,
            total_bytes=total_bytes,
            sender=sender,
        )
    )


def encode_layer(
    layer: int,
    step: int,
    phase: int,
    tensors: Mapping[str, torch.Tensor],
    *,
    dtype: str = "float32",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    sender: str = "",
) -> Iterator[pb.LayerMessage]:
    """Yield the header, then every tensor (cast to ``dtype``) as raw-byte chunks."""
    wire_dtype = WIRE_DTYPES[dtype]
    cast = {name: t.detach().to(wire_dtype) for name, t in tensors.items()}
    total = sum(t.numel() * t.element_size() for t in cast.values())
    # Chunks hold whole values, so that a receiver (SwarmX) can read each one as values.
    itemsize = torch.empty((), dtype=wire_dtype).element_size()
    chunk_bytes = max(itemsize, chunk_bytes - chunk_bytes % itemsize)
    yield layer_header(layer, step, phase, num_tensors=len(cast), total_bytes=total, sender=sender)
    for name, tensor in cast.items():
        raw = _raw_bytes(tensor)
        shape = list(tensor.shape)
        size = len(raw)
        # A zero-size tensor still sends one empty chunk so the receiver sees it.
        for offset in range(0, max(size, 1), chunk_bytes):
            yield pb.LayerMessage(
                chunk=pb.TensorChunk(
                    layer=layer,
                    step=step,
                    name=name,
                    dtype=dtype,
                    shape=shape,
                    offset=offset,
                    tensor_bytes=size,
                    data=bytes(raw[offset : offset + chunk_bytes]),
                )
            )


@dataclass(frozen=True)
class Expected:
    """What a receiver accepts for one layer stream."""

    layer: int
    step: int
    phase: int
    layout: Layout
    dtype: str

    def __post_init__(self) -> None:
        assert self.dtype in WIRE_DTYPES


class LayerAssembler:
    """Validates one incoming layer stream and rebuilds its tensors."""

    def __init__(self, expected: Expected):
        self.expected = expected
        self.header: pb.LayerHeader | None = None
        self._tensors: dict[str, torch.Tensor] = {}
        self._index = 0  # position in the layout of the tensor being received
        self._received = 0  # bytes of the current tensor received so far
        self.payload_bytes = 0
        itemsize = torch.empty((), dtype=WIRE_DTYPES[expected.dtype]).element_size()
        self._sizes = [
            int(np.prod(shape, dtype=np.int64)) * itemsize for _, shape in expected.layout
        ]

    def _fail(self, what: str) -> None:
        e = self.expected
        raise WireError(
            f"rejected layer stream for layer {e.layer}, step {e.step}, "
            f"phase {PHASE_NAMES.get(e.phase, e.phase)}: {what}"
        )

    def add(self, message: pb.LayerMessage) -> None:
        kind = message.WhichOneof("kind")
        if kind == "header":
            self._add_header(message.header)
        elif kind == "chunk":
            self._add_chunk(message.chunk)
        else:
            self._fail("empty message (neither header nor chunk)")

    def _add_header(self, header: pb.LayerHeader) -> None:
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
        if header.total_bytes != sum(self._sizes):
            self._fail(f"header announces {header.total_bytes} bytes, expected {sum(self._sizes)}")
        self.header = header

    def _add_chunk(self, chunk: pb.TensorChunk) -> None:
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
        if chunk.tensor_bytes != size:
            self._fail(f"tensor {name!r} announces {chunk.tensor_bytes} bytes, expected {size}")
        if chunk.offset != self._received:
            self._fail(f"tensor {name!r} chunk at offset {chunk.offset}, expected {self._received}")
        if self._received + len(chunk.data) > size:
            self._fail(
                f"tensor {name!r} overflows: {self._received + len(chunk.data)} bytes of {size}"
            )
        if name not in self._tensors:
            self._tensors[name] = torch.empty(shape, dtype=WIRE_DTYPES[e.dtype])
        target = self._tensors[name].view(-1)
        if target.dtype == torch.bfloat16:
            target = target.view(torch.int16)
        np_bytes = target.numpy().view(np.uint8)
        np_bytes[self._received : self._received + len(chunk.data)] = np.frombuffer(
            chunk.data, dtype=np.uint8
        )
        self._received += len(chunk.data)
        self.payload_bytes += len(chunk.data)
        if self._received == size:
            self._index += 1
            self._received = 0

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
        return self._tensors


def decode_layer(
    messages: Iterable[pb.LayerMessage], expected: Expected
) -> dict[str, torch.Tensor]:
    assembler = LayerAssembler(expected)
    for message in messages:
        assembler.add(message)
    return assembler.finish()


def chunk_values(chunk: pb.TensorChunk) -> np.ndarray:
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


def decode_layers(
    messages: Iterable[pb.LayerMessage],
) -> list[tuple[pb.LayerHeader, dict[str, torch.Tensor]]]:
    """Decode consecutive layer streams whose layout the receiver does not know yet.

    Used only to load a model's initial weights: shapes and dtypes are taken
    from the chunks themselves, and offsets and sizes are still checked.
    """
    groups: list[list[pb.LayerMessage]] = []
    for message in messages:
        if message.WhichOneof("kind") == "header":
            groups.append([message])
        elif not groups:
            raise WireError("a chunk arrived before any header")
        else:
            groups[-1].append(message)
    layers = []
    for group in groups:
        header = group[0].header
        layout: list[tuple[str, tuple[int, ...]]] = []
        dtypes = set()
        for message in group[1:]:
            chunk = message.chunk
            dtypes.add(chunk.dtype)
            if not layout or layout[-1][0] != chunk.name:
                if any(name == chunk.name for name, _ in layout):
                    raise WireError(f"layer {header.layer} sends tensor {chunk.name!r} twice")
                layout.append((chunk.name, tuple(chunk.shape)))
        if len(dtypes) > 1 or (dtypes and next(iter(dtypes)) not in WIRE_DTYPES):
            raise WireError(f"layer {header.layer} mixes or uses unknown dtypes {sorted(dtypes)}")
        dtype = next(iter(dtypes), "float32")
        expected = Expected(header.layer, header.step, header.phase, layout, dtype)
        layers.append((header, decode_layer(group, expected)))
    return layers
