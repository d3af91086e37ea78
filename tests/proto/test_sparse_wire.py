"""Sparse wire encoding: exact round trips, index choice, byte counts, malformed input."""

from __future__ import annotations

import math

import pytest
import torch

from proto.serde import WIRE_DTYPES, WireError
from proto.sparse import (
    beats_dense,
    choose_encoding,
    decode_masked_values,
    decode_sparse,
    encode_masked_values,
    encode_sparse,
    index_nbytes,
    itemsize,
    mask_from_index,
    sparse_nbytes,
)

DTYPES = ["float32", "bfloat16", "float16"]
SPARSITIES = [0.0, 0.3, 0.9, 0.97, 0.99, 0.999, 1.0]
SHAPE = (96, 65)  # 6240 entries: not a multiple of 8, so the bitmap has padding bits


def _exact_mask(shape: tuple[int, ...], sparsity: float, seed: int) -> torch.Tensor:
    numel = math.prod(shape)
    generator = torch.Generator().manual_seed(seed)
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[torch.randperm(numel, generator=generator)[: round(sparsity * numel)]] = True
    return mask.view(shape)


def _tensor(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_round_trip_is_exact(sparsity: float, dtype: str) -> None:
    tensor = _tensor(SHAPE, seed=1)
    mask = _exact_mask(SHAPE, sparsity, seed=2)
    payload = encode_sparse(tensor, mask, dtype=dtype)
    dense, decoded_mask = decode_sparse(
        payload.to_bytes(),
        encoding=payload.encoding,
        index_bytes=payload.index_bytes,
        shape=payload.shape,
        dtype=dtype,
    )
    assert torch.equal(decoded_mask, mask)
    assert dense.dtype == WIRE_DTYPES[dtype]
    expected = tensor.masked_fill(mask, 0.0).to(WIRE_DTYPES[dtype])
    assert torch.equal(
        dense.view(torch.int16 if dtype != "float32" else torch.int32),
        expected.view(torch.int16 if dtype != "float32" else torch.int32),
    )
    num_kept = int((~mask).sum())
    assert payload.num_bytes == sparse_nbytes(mask.numel(), num_kept, dtype)


def test_kept_zeros_and_negative_zero_survive_bit_exactly() -> None:
    tensor = torch.tensor([[0.0, -0.0, 1.5], [-2.0, float("inf"), 3.0]])
    mask = torch.tensor([[False, False, True], [True, False, False]])
    payload = encode_sparse(tensor, mask)
    dense, decoded_mask = decode_sparse(
        payload.to_bytes(), encoding=payload.encoding, index_bytes=payload.index_bytes, shape=(2, 3)
    )
    assert torch.equal(decoded_mask, mask)
    assert torch.equal(dense.view(torch.int32), tensor.masked_fill(mask, 0.0).view(torch.int32))


def test_index_is_whichever_is_smaller() -> None:
    numel = 3200  # bitmap: 400 bytes; indices: 4 bytes each, so 100 survivors tie
    assert index_nbytes(numel, 99, "indices") < index_nbytes(numel, 99, "bitmap")
    assert choose_encoding(numel, 99) == "indices"
    assert choose_encoding(numel, 100) == "bitmap"  # a tie keeps the bitmap
    assert choose_encoding(numel, 101) == "bitmap"
    for sparsity, encoding in [(0.9, "bitmap"), (0.99, "indices")]:
        mask = _exact_mask(SHAPE, sparsity, seed=3)
        assert encode_sparse(_tensor(SHAPE, 4), mask).encoding == encoding


@pytest.mark.parametrize("dtype", DTYPES)
def test_bytes_shrink_with_density(dtype: str) -> None:
    tensor = _tensor(SHAPE, seed=5)
    dense_bytes = tensor.numel() * itemsize(dtype)
    sizes = [
        encode_sparse(tensor, _exact_mask(SHAPE, s, seed=6), dtype=dtype).num_bytes
        for s in SPARSITIES
    ]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)
    at_90 = sizes[SPARSITIES.index(0.9)]
    # values 10% + bitmap 1 bit per entry: 13.1% of dense fp32, 16.25% of 16-bit.
    bound = 0.25 if dtype == "float32" else 0.2
    assert at_90 < bound * dense_bytes
    assert at_90 == pytest.approx(
        dense_bytes * 0.1 + math.ceil(tensor.numel() / 8), abs=itemsize(dtype)
    )


def test_fp32_at_sparsity_09_is_below_a_quarter_of_dense() -> None:
    numel = 1 << 20
    kept = numel - round(0.9 * numel)
    assert sparse_nbytes(numel, kept, "float32") / (4 * numel) == pytest.approx(0.13125, abs=1e-4)
    assert beats_dense(numel, kept, "float32")
    # The bitmap alone is 1/32 of fp32: a mask that keeps everything is cheaper sent dense.
    assert not beats_dense(numel, numel, "float32")


@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients_travel_as_surviving_values_only(dtype: str) -> None:
    grad = _tensor(SHAPE, seed=7)
    mask = _exact_mask(SHAPE, 0.9, seed=8)
    raw = encode_masked_values(grad, mask, dtype=dtype)
    assert len(raw) == int((~mask).sum()) * itemsize(dtype)
    decoded = decode_masked_values(raw, mask, dtype=dtype)
    assert torch.equal(decoded, grad.masked_fill(mask, 0.0).to(WIRE_DTYPES[dtype]))


def test_summing_value_payloads_equals_summing_masked_gradients() -> None:
    # What SwarmX does: sum the value streams of nodes that share a mask, value by value.
    mask = _exact_mask(SHAPE, 0.75, seed=9)
    grads = [_tensor(SHAPE, seed=10 + i) for i in range(3)]
    summed = sum(decode_masked_values(encode_masked_values(g, mask), mask) for g in grads)
    assert torch.equal(summed, sum(g.masked_fill(mask, 0.0) for g in grads))


def test_empty_and_scalar_tensors() -> None:
    for shape in [(0,), (), (1,)]:
        tensor = torch.ones(shape)
        mask = torch.zeros(shape, dtype=torch.bool)
        payload = encode_sparse(tensor, mask)
        dense, decoded = decode_sparse(
            payload.to_bytes(),
            encoding=payload.encoding,
            index_bytes=payload.index_bytes,
            shape=shape,
        )
        assert dense.shape == tensor.shape and torch.equal(dense, tensor)
        assert torch.equal(decoded, mask)


def test_bad_mask_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="mask must be a bool tensor of shape"):
        encode_sparse(torch.ones(4), torch.zeros(4))
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        encode_masked_values(torch.ones(4), torch.zeros(5, dtype=torch.bool))


def test_malformed_payloads_are_wire_errors() -> None:
    tensor = _tensor((10, 10), seed=11)
    mask = _exact_mask((10, 10), 0.5, seed=12)
    payload = encode_sparse(tensor, mask)
    raw = payload.to_bytes()
    fields = dict(encoding="bitmap", index_bytes=payload.index_bytes, shape=(10, 10))
    with pytest.raises(WireError, match="value bytes"):
        decode_sparse(raw[1:], **fields)
    with pytest.raises(WireError, match="bitmap of"):
        decode_sparse(raw, encoding="bitmap", index_bytes=payload.index_bytes - 1, shape=(10, 10))
    padded = bytearray(raw)
    padded[-1] |= 0x80  # 100 entries use 4 bits of the last byte; bit 7 is padding
    with pytest.raises(WireError, match="padding bits"):
        decode_sparse(bytes(padded), **fields)
    with pytest.raises(WireError, match="does not fit"):
        decode_sparse(raw, encoding="bitmap", index_bytes=len(raw) + 1, shape=(10, 10))
    unsorted = torch.tensor([5, 3], dtype=torch.int32).numpy().tobytes()
    with pytest.raises(WireError, match="ascend strictly"):
        mask_from_index(unsorted, "indices", (10,))
    outside = torch.tensor([3, 10], dtype=torch.int32).numpy().tobytes()
    with pytest.raises(WireError, match="ascend strictly"):
        mask_from_index(outside, "indices", (10,))
    with pytest.raises(WireError, match="unknown index encoding"):
        mask_from_index(b"", "rle", (0,))


def test_an_index_seen_again_gives_the_same_mask_object() -> None:
    from proto.sparse import mask_from_index

    mask = torch.rand(4096, generator=torch.Generator().manual_seed(1)) < 0.9
    payload = encode_sparse(torch.ones(4096), mask)
    first = mask_from_index(payload.index, payload.encoding, (4096,))
    assert torch.equal(first, mask)
    # The same bytes (a node's next pass), even in another buffer: the same mask, so its
    # kept positions are found once.
    assert mask_from_index(bytearray(payload.index), payload.encoding, (4096,)) is first
    other = encode_sparse(torch.ones(4096), ~mask)
    assert mask_from_index(other.index, other.encoding, (4096,)) is not first
    assert mask_from_index(payload.index, payload.encoding, (64, 64)).shape == (64, 64)


def test_received_masks_stay_within_their_byte_budget() -> None:
    from proto.sparse import _ReceivedMasks

    received = _ReceivedMasks(max_bytes=250)
    masks = [torch.zeros(100, dtype=torch.bool) for _ in range(4)]
    for key, mask in enumerate(masks):
        received.put(("bitmap", (100,), bytes([key])), mask)
    # Least recently used first out: 2 of 100 bytes fit in 250.
    assert received.get(("bitmap", (100,), bytes([0]))) is None
    assert received.get(("bitmap", (100,), bytes([3]))) is masks[3]
    received.get(("bitmap", (100,), bytes([2])))
    received.put(("bitmap", (100,), b"\x09"), torch.zeros(100, dtype=torch.bool))
    assert received.get(("bitmap", (100,), bytes([2]))) is masks[2]
    assert received.get(("bitmap", (100,), bytes([3]))) is None
