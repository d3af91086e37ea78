"""Sparse layer streams through serde: weights as values + index, gradients as masked values."""

from __future__ import annotations

import pytest
import torch

from proto import tensor_pb2 as pb
from proto.serde import Expected, LayerAssembler, WireError, encode_layer, layout_of


def _tensors():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 40, generator=gen)
    mask = torch.rand(64, 40, generator=gen) < 0.9
    weight[mask] = 0
    return {"weight": weight, "bias": torch.randn(64, generator=gen)}, {"weight": mask}


def _assemble(messages, expected: Expected) -> LayerAssembler:
    assembler = LayerAssembler(expected)
    for message in messages:
        assembler.add(message)
    assembler.finish()
    return assembler


def test_masked_weights_travel_as_values_and_index():
    tensors, masks = _tensors()
    messages = list(encode_layer(0, 3, pb.FORWARD, tensors, masks=masks, chunk_bytes=256))
    chunks = [m.chunk for m in messages[1:]]
    assert {c.encoding for c in chunks if c.name == "weight"} == {"bitmap"}
    assembler = _assemble(
        messages, Expected(0, 3, pb.FORWARD, layout_of(tensors), "float32", sparse=True)
    )
    assert torch.equal(assembler._tensors["weight"], tensors["weight"])
    assert torch.equal(assembler.masks["weight"], masks["weight"])
    assert assembler.payload_bytes < 0.25 * 64 * 40 * 4 + 64 * 4


def test_gradients_travel_as_masked_values():
    tensors, masks = _tensors()
    messages = list(encode_layer(0, 3, pb.BACKWARD, tensors, masked_values=masks))
    kept = int((~masks["weight"]).sum())
    assert messages[0].header.total_bytes == (kept + 64) * 4
    expected = Expected(0, 3, pb.BACKWARD, layout_of(tensors), "float32", masks=masks)
    assembler = _assemble(messages, expected)
    assert torch.equal(assembler._tensors["weight"], tensors["weight"])


def test_dense_receiver_rejects_a_sparse_stream():
    tensors, masks = _tensors()
    messages = list(encode_layer(0, 3, pb.FORWARD, tensors, masks=masks))
    with pytest.raises(WireError, match="header announces"):
        _assemble(messages, Expected(0, 3, pb.FORWARD, layout_of(tensors), "float32"))


@pytest.mark.parametrize("damage", ["index_bytes", "encoding", "truncated", "unknown"])
def test_malformed_sparse_payload_is_a_wire_error(damage):
    tensors, masks = _tensors()
    messages = list(encode_layer(0, 3, pb.FORWARD, tensors, masks=masks, chunk_bytes=1 << 20))
    chunk = next(m.chunk for m in messages[1:] if m.chunk.name == "weight")
    if damage == "index_bytes":
        chunk.index_bytes += 4
    elif damage == "encoding":
        chunk.encoding = "indices"  # a bitmap's bytes read as int32 positions
    elif damage == "unknown":
        chunk.encoding = "rle"
    else:
        chunk.data = chunk.data[:-8]
    expected = Expected(0, 3, pb.FORWARD, layout_of(tensors), "float32", sparse=True)
    with pytest.raises(WireError):
        _assemble(messages, expected)
