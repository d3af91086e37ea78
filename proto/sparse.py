"""Sparse wire encoding of masked tensors: surviving values plus a compact index.

A masked weight tensor travels as one byte payload, values first::

    [ surviving values, wire dtype, row-major order ][ index ]

The index says where the values go, in whichever form is smaller:

- ``bitmap``: one bit per entry, 1 = surviving, least significant bit first,
  ``ceil(numel / 8)`` bytes, padding bits zero;
- ``indices``: the flat positions of the surviving entries as little-endian
  int32, ascending, 4 bytes each; smaller than the bitmap when fewer than
  1 in 32 entries survive.

Values come first so that a payload cut into value-aligned chunks (as
``proto.serde`` cuts dense tensors) keeps whole values in every chunk.

Gradients of masked weights are not sent at all: sender and receiver both
hold the mask, so a gradient travels as its surviving values only, with no
index (``encode_masked_values``); SwarmX can sum such payloads value by value,
since every node of a step streams with the same mask.

Functions here take and return raw bytes and plain tensors; protobuf types
stay in ``proto.serde``.
"""

from __future__ import annotations

import math
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from core.mask_positions import kept_positions
from proto.serde import WIRE_DTYPES, WIRE_ITEMSIZES, WireError

assert sys.byteorder == "little", "raw tensor bytes on the wire are little-endian"

IndexEncoding = Literal["bitmap", "indices"]
INDEX_ENCODINGS: tuple[IndexEncoding, ...] = ("bitmap", "indices")
INDEX_ITEMSIZE = 4  # int32 positions
_BITS_PER_BYTE = 8
# numpy has no bfloat16: its bytes are read as int16 and viewed back in torch.
_NUMPY_STORAGE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.int16}


def itemsize(dtype: str) -> int:
    """Bytes of one value in wire dtype ``dtype``."""
    return WIRE_ITEMSIZES[dtype]


def index_nbytes(numel: int, num_kept: int, encoding: IndexEncoding) -> int:
    if encoding == "bitmap":
        return math.ceil(numel / _BITS_PER_BYTE)
    return num_kept * INDEX_ITEMSIZE


def choose_encoding(numel: int, num_kept: int) -> IndexEncoding:
    """The smaller index for ``num_kept`` survivors of ``numel`` (the bitmap on a tie)."""
    if index_nbytes(numel, num_kept, "indices") < index_nbytes(numel, num_kept, "bitmap"):
        return "indices"
    return "bitmap"


def sparse_nbytes(numel: int, num_kept: int, dtype: str = "float32") -> int:
    """Bytes on the wire of a masked tensor: values plus the smaller index (cost models)."""
    encoding = choose_encoding(numel, num_kept)
    return num_kept * itemsize(dtype) + index_nbytes(numel, num_kept, encoding)


def beats_dense(numel: int, num_kept: int, dtype: str = "float32") -> bool:
    """True when the sparse encoding is smaller than the dense tensor.

    Near-dense masks are cheaper sent dense: the bitmap alone costs 1/32 of
    a float32 tensor (1/16 of a 16-bit one).
    """
    return sparse_nbytes(numel, num_kept, dtype) < numel * itemsize(dtype)


@dataclass(frozen=True)
class SparsePayload:
    """One encoded tensor: what a chunked stream carries, plus the fields to decode it."""

    encoding: IndexEncoding
    shape: tuple[int, ...]
    dtype: str
    values: bytes
    index: bytes

    @property
    def num_bytes(self) -> int:
        return len(self.values) + len(self.index)

    @property
    def index_bytes(self) -> int:
        return len(self.index)

    def to_bytes(self) -> bytes:
        return self.values + self.index


class _ReceivedMasks:
    """The masks decoded from recent indexes: the same index bytes give the same mask
    object (so ``kept_positions`` finds its positions once), up to ``max_bytes`` of masks."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._masks: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple) -> torch.Tensor | None:
        with self._lock:
            mask = self._masks.get(key)
            if mask is not None:
                self._masks.move_to_end(key)
            return mask

    def put(self, key: tuple, mask: torch.Tensor) -> None:
        with self._lock:
            if key in self._masks:
                return
            self._masks[key] = mask
            self._bytes += mask.numel()
            while self._bytes > self.max_bytes and len(self._masks) > 1:
                _, dropped = self._masks.popitem(last=False)
                self._bytes -= dropped.numel()


# A node's masks of a step's layers, decoded once (gpt-10m's fill 10 MB).
_RECEIVED = _ReceivedMasks(max_bytes=256 * 2**20)


def _storage(tensor: torch.Tensor) -> np.ndarray:
    """A flat numpy view of ``tensor``'s values (bfloat16 as int16: the same bits)."""
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.dtype == torch.bfloat16:
        flat = flat.view(torch.int16)
    return flat.numpy()


def _cast(values: np.ndarray, source: torch.dtype, dtype: str) -> torch.Tensor:
    """Gathered ``values`` (numpy storage of ``source``) as a tensor in wire ``dtype``."""
    tensor = torch.from_numpy(values)
    if source == torch.bfloat16:
        tensor = tensor.view(torch.bfloat16)
    return tensor.to(WIRE_DTYPES[dtype])


def _raw(tensor: torch.Tensor) -> bytes:
    flat = tensor.contiguous().reshape(-1)
    if flat.dtype == torch.bfloat16:
        # numpy has no bfloat16; the bytes are the same through an int16 view.
        flat = flat.view(torch.int16)
    return flat.numpy().tobytes()


def _check_mask(tensor: torch.Tensor, mask: torch.Tensor) -> None:
    if mask.dtype != torch.bool or mask.shape != tensor.shape:
        raise ValueError(
            f"mask must be a bool tensor of shape {tuple(tensor.shape)}, "
            f"got {mask.dtype} of shape {tuple(mask.shape)}."
        )


def encode_sparse(
    tensor: torch.Tensor, mask: torch.Tensor, *, dtype: str = "float32"
) -> SparsePayload:
    """Encode the entries of ``tensor`` that ``mask`` (True = pruned) keeps, cast to ``dtype``."""
    _check_mask(tensor, mask)
    positions = kept_positions(mask)
    # Gathered, then rounded: the same values as rounding first, on fewer entries.
    values = _cast(np.take(_storage(tensor), positions), tensor.dtype, dtype)
    numel, num_kept = mask.numel(), positions.size
    encoding = choose_encoding(numel, num_kept)
    if encoding == "bitmap":
        index = np.packbits(~mask.detach().reshape(-1).numpy(), bitorder="little").tobytes()
    else:
        index = positions.astype("<i4").tobytes()
    return SparsePayload(
        encoding=encoding,
        shape=tuple(tensor.shape),
        dtype=dtype,
        values=_raw(values),
        index=index,
    )


def mask_from_index(
    index: bytes | memoryview, encoding: IndexEncoding, shape: tuple[int, ...]
) -> torch.Tensor:
    """The mask (True = pruned) an index describes; raises WireError if it is malformed.

    An index seen lately (the same bytes) gives the same mask object: shared, so never
    written in place (no mask is, ``core.mask_positions``)."""
    key = (encoding, tuple(shape), bytes(index))
    known = _RECEIVED.get(key)
    if known is not None:
        return known
    mask = _mask_from_index(index, encoding, shape)
    _RECEIVED.put(key, mask)
    return mask


def _mask_from_index(
    index: bytes | memoryview, encoding: IndexEncoding, shape: tuple[int, ...]
) -> torch.Tensor:
    numel = math.prod(shape)
    if encoding == "bitmap":
        if len(index) != math.ceil(numel / _BITS_PER_BYTE):
            raise WireError(
                f"bitmap of {len(index)} bytes for {numel} entries, "
                f"expected {math.ceil(numel / _BITS_PER_BYTE)}"
            )
        bits = np.unpackbits(np.frombuffer(index, dtype=np.uint8), bitorder="little")
        if bits[numel:].any():
            raise WireError("bitmap sets padding bits past the last entry")
        kept = bits[:numel].view(np.bool_)  # unpacked bits are 0 or 1
    elif encoding == "indices":
        if len(index) % INDEX_ITEMSIZE:
            raise WireError(f"index of {len(index)} bytes is not a whole number of int32 positions")
        positions = np.frombuffer(index, dtype="<i4").astype(np.int64)
        if positions.size and (
            positions[0] < 0 or positions[-1] >= numel or np.any(np.diff(positions) <= 0)
        ):
            raise WireError(f"index positions must ascend strictly within [0, {numel})")
        kept = np.zeros(numel, dtype=np.bool_)
        kept[positions] = True
    else:
        raise WireError(f"unknown index encoding {encoding!r}; expected one of {INDEX_ENCODINGS}")
    return torch.from_numpy(~kept).view(shape)


def decode_sparse(
    payload: bytes | memoryview,
    *,
    encoding: IndexEncoding,
    index_bytes: int,
    shape: tuple[int, ...],
    dtype: str = "float32",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense tensor (zeros where pruned, in ``dtype``) and mask from ``to_bytes()`` output."""
    if not 0 <= index_bytes <= len(payload):
        raise WireError(f"index of {index_bytes} bytes does not fit a {len(payload)}-byte payload")
    split = len(payload) - index_bytes
    mask = mask_from_index(memoryview(payload)[split:], encoding, shape)
    dense = decode_masked_values(memoryview(payload)[:split], mask, dtype=dtype)
    return dense, mask


def encode_masked_values(
    tensor: torch.Tensor, mask: torch.Tensor, *, dtype: str = "float32"
) -> bytes:
    """The entries ``mask`` keeps, in row-major order, as raw ``dtype`` bytes (no index)."""
    _check_mask(tensor, mask)
    return _raw(_cast(np.take(_storage(tensor), kept_positions(mask)), tensor.dtype, dtype))


def decode_masked_values(
    raw: bytes | memoryview, mask: torch.Tensor, *, dtype: str = "float32"
) -> torch.Tensor:
    """Dense tensor of ``mask``'s shape: ``raw``'s values where kept, zero where pruned."""
    positions = kept_positions(mask)
    size = itemsize(dtype)
    count = positions.size
    if len(raw) != count * size:
        raise WireError(
            f"masked tensor: {len(raw)} value bytes, expected {count} x {size} ({dtype})"
        )
    dense = np.zeros(mask.numel(), dtype=_NUMPY_STORAGE[dtype])
    dense[positions] = np.frombuffer(raw, dtype=_NUMPY_STORAGE[dtype])
    return torch.from_numpy(dense).view(WIRE_DTYPES[dtype]).view(mask.shape)


__all__ = [
    "INDEX_ENCODINGS",
    "IndexEncoding",
    "SparsePayload",
    "beats_dense",
    "choose_encoding",
    "decode_masked_values",
    "decode_sparse",
    "encode_masked_values",
    "encode_sparse",
    "index_nbytes",
    "itemsize",
    "mask_from_index",
    "sparse_nbytes",
]
