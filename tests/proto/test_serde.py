"""The serde boundary: tensors <-> chunked LayerMessage streams, and stream validation."""

from __future__ import annotations

import pytest
import torch

from proto import tensor_pb2 as pb
from proto.domain import Chunk, Header, Phase
from proto.loading import decode_layers
from proto.serde import (
    WIRE_DTYPES,
    Expected,
    LayerAssembler,
    WireError,
    chunk_values,
    decode_layer,
    dtype_name,
    encode_layer,
    from_wire,
    layer_items,
    layout_of,
    payload_bytes,
    to_wire,
)

LAYER, STEP = 3, 7
SHAPES = [(), (1,), (5,), (3, 4), (2, 3, 5), (0,), (4, 0, 2)]


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "0.weight": torch.randn(16, 9, generator=gen),
        "0.bias": torch.randn(16, generator=gen),
        "scale": torch.randn((), generator=gen),
    }


def _expected(tensors, dtype="float32", *, layer=LAYER, step=STEP, phase=pb.FORWARD) -> Expected:
    return Expected(layer, step, phase, layout_of(tensors), dtype)


def _encode(tensors, dtype="float32", chunk_bytes=64, **kw) -> list[pb.LayerMessage]:
    kw.setdefault("layer", LAYER)
    kw.setdefault("step", STEP)
    kw.setdefault("phase", pb.FORWARD)
    return list(
        encode_layer(
            kw["layer"],
            kw["step"],
            kw["phase"],
            tensors,
            dtype=dtype,
            chunk_bytes=chunk_bytes,
            sender="test",
        )
    )


def _assert_bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


# -- round trip ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", list(WIRE_DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_round_trip_single_tensor(dtype, shape):
    tensor = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    messages = _encode({"t": tensor}, dtype)
    out = decode_layer(messages, _expected({"t": tensor}, dtype))
    assert list(out) == ["t"]
    _assert_bitwise_equal(out["t"], tensor.to(WIRE_DTYPES[dtype]))


@pytest.mark.parametrize("dtype", list(WIRE_DTYPES))
def test_round_trip_several_tensors_keeps_order_and_values(dtype):
    tensors = _tensors()
    out = decode_layer(_encode(tensors, dtype), _expected(tensors, dtype))
    assert list(out) == list(tensors)
    for name, tensor in tensors.items():
        _assert_bitwise_equal(out[name], tensor.to(WIRE_DTYPES[dtype]))


def test_non_contiguous_tensor_travels_in_logical_order():
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    tensor = base.t()  # (4, 3), not contiguous
    assert not tensor.is_contiguous()
    out = decode_layer(_encode({"t": tensor}), _expected({"t": tensor}))
    assert torch.equal(out["t"], tensor)


def test_bf16_wire_bytes_are_the_raw_bf16_bits():
    tensor = torch.tensor([1.0, -2.5, 3.140625], dtype=torch.float32)
    messages = _encode({"t": tensor}, "bfloat16")
    raw = b"".join(m.chunk.data for m in messages[1:])
    assert raw == tensor.to(torch.bfloat16).view(torch.int16).numpy().tobytes()


@pytest.mark.parametrize("dtype", list(WIRE_DTYPES))
@pytest.mark.parametrize("chunk_bytes", [1024, 1022, 4096])
def test_large_tensor_is_split_into_chunks_that_carry_their_metadata(dtype, chunk_bytes):
    gen = torch.Generator().manual_seed(2)
    tensors = {"w": torch.randn(67, 53, generator=gen), "b": torch.randn(11, generator=gen)}
    messages = _encode(tensors, dtype, chunk_bytes=chunk_bytes, phase=pb.BACKWARD)
    header = messages[0].header
    itemsize = torch.empty((), dtype=WIRE_DTYPES[dtype]).element_size()
    sizes = {n: t.numel() * itemsize for n, t in tensors.items()}
    assert messages[0].WhichOneof("kind") == "header"
    assert (header.layer, header.step, header.phase) == (LAYER, STEP, pb.BACKWARD)
    assert header.num_tensors == 2 and header.total_bytes == sum(sizes.values())
    assert header.sender == "test"
    chunks = [m.chunk for m in messages[1:]]
    assert all(m.WhichOneof("kind") == "chunk" for m in messages[1:])
    w_chunks = [c for c in chunks if c.name == "w"]
    assert len(w_chunks) == -(-sizes["w"] // (chunk_bytes - chunk_bytes % itemsize)) > 1
    offsets = {"w": 0, "b": 0}
    for chunk in chunks:
        assert 0 < len(chunk.data) <= chunk_bytes
        # Chunks hold whole elements so that a receiver can read them as values.
        assert len(chunk.data) % itemsize == 0
        assert (chunk.layer, chunk.step, chunk.dtype) == (LAYER, STEP, dtype)
        assert tuple(chunk.shape) == tuple(tensors[chunk.name].shape)
        assert chunk.tensor_bytes == sizes[chunk.name]
        assert chunk.offset == offsets[chunk.name]
        offsets[chunk.name] += len(chunk.data)
    assert offsets == sizes
    assert [c.name for c in chunks] == sorted((c.name for c in chunks), key=["w", "b"].index)
    out = decode_layer(messages, _expected(tensors, dtype, phase=pb.BACKWARD))
    for name, tensor in tensors.items():
        _assert_bitwise_equal(out[name], tensor.to(WIRE_DTYPES[dtype]))


def test_default_chunking_keeps_small_tensor_in_one_chunk():
    messages = list(encode_layer(0, 0, pb.FORWARD, {"t": torch.ones(10)}))
    assert len(messages) == 2 and len(messages[1].chunk.data) == 40


def test_zero_size_tensor_still_sends_one_empty_chunk():
    messages = _encode({"e": torch.empty(0, 3)})
    assert len(messages) == 2
    assert messages[1].chunk.data == b"" and messages[1].chunk.tensor_bytes == 0


def test_assembler_counts_payload_bytes():
    tensors = _tensors()
    assembler = LayerAssembler(_expected(tensors))
    for message in _encode(tensors):
        assembler.add(message)
    assembler.finish()
    assert assembler.payload_bytes == sum(t.numel() * 4 for t in tensors.values())


def test_dtype_name_and_unknown_dtype():
    assert dtype_name(torch.bfloat16) == "bfloat16"
    with pytest.raises(WireError, match="float64"):
        dtype_name(torch.float64)


def test_chunk_values_reads_float32_and_rejects_others():
    messages = _encode({"t": torch.arange(6.0)})
    assert chunk_values(messages[1].chunk).tolist() == [0, 1, 2, 3, 4, 5]
    with pytest.raises(WireError, match="float32"):
        chunk_values(_encode({"t": torch.arange(6.0)}, "bfloat16")[1].chunk)
    odd = pb.TensorChunk(name="t", dtype="float32", data=b"\x00" * 6)
    with pytest.raises(WireError, match="t"):
        chunk_values(odd)


# -- rejection ----------------------------------------------------------------


def _good() -> tuple[dict[str, torch.Tensor], list[pb.LayerMessage]]:
    tensors = _tensors()
    return tensors, _encode(tensors, chunk_bytes=128)


def _feed(expected: Expected, messages) -> None:
    assembler = LayerAssembler(expected)
    for message in messages:
        assembler.add(message)
    assembler.finish()


def _with_chunk(messages, index, **changes) -> list[pb.LayerMessage]:
    out = [pb.LayerMessage() for _ in messages]
    for o, m in zip(out, messages, strict=True):
        o.CopyFrom(m)
    chunk = out[index].chunk
    for key, value in changes.items():
        if key == "shape":
            del chunk.shape[:]
            chunk.shape.extend(value)
        else:
            setattr(chunk, key, value)
    return out


def _with_header(messages, **changes) -> list[pb.LayerMessage]:
    out = [pb.LayerMessage() for _ in messages]
    for o, m in zip(out, messages, strict=True):
        o.CopyFrom(m)
    for key, value in changes.items():
        setattr(out[0].header, key, value)
    return out


def test_good_stream_is_accepted():
    tensors, messages = _good()
    _feed(_expected(tensors), messages)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"layer": LAYER + 1}, "header layer"),
        ({"step": STEP - 1}, "header step"),
        ({"phase": pb.BACKWARD}, "header phase"),
        ({"num_tensors": 2}, "tensors"),
        ({"total_bytes": 4}, "bytes"),
    ],
)
def test_rejects_wrong_header(changes, match):
    tensors, messages = _good()
    with pytest.raises(WireError, match=match):
        _feed(_expected(tensors), _with_header(messages, **changes))


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"layer": LAYER + 1}, "layer"),
        ({"step": STEP + 1}, "step"),
        ({"name": "0.bias"}, "'0.bias', expected '0.weight'"),
        ({"dtype": "bfloat16"}, "dtype"),
        ({"dtype": "float64"}, "dtype"),
        ({"shape": [9, 16]}, "shape"),
        ({"shape": [16, 9, 1]}, "shape"),
        ({"tensor_bytes": 16 * 9 * 4 + 4}, "announces"),
        ({"offset": 4}, "offset"),
    ],
)
def test_rejects_wrong_first_chunk(changes, match):
    tensors, messages = _good()
    with pytest.raises(WireError, match=match):
        _feed(_expected(tensors), _with_chunk(messages, 1, **changes))


@pytest.mark.parametrize("index", [2, 3, -1])
def test_rejects_wrong_later_chunk(index):
    tensors, messages = _good()
    bad = _with_chunk(messages, index, step=STEP + 3)
    with pytest.raises(WireError, match="step"):
        _feed(_expected(tensors), bad)


def test_rejects_wrong_tensor_order():
    tensors, messages = _good()
    swapped = dict(reversed(list(tensors.items())))
    with pytest.raises(WireError, match="expected 'scale'"):
        _feed(_expected(swapped), messages)


def test_rejects_unexpected_dtype_for_whole_stream():
    tensors = _tensors()
    fp16 = _encode(tensors, "float16")
    fp32_header = _encode(tensors, "float32")[0]
    with pytest.raises(WireError, match="dtype 'float16', expected 'float32'"):
        _feed(_expected(tensors, "float32"), [fp32_header, *fp16[1:]])


def test_rejects_out_of_order_offsets():
    tensors, messages = _good()
    assert messages[1].chunk.name == messages[2].chunk.name == "0.weight"
    swapped = [messages[0], messages[2], messages[1], *messages[3:]]
    with pytest.raises(WireError, match="offset"):
        _feed(_expected(tensors), swapped)


def test_rejects_repeated_chunk():
    tensors, messages = _good()
    with pytest.raises(WireError, match="offset"):
        _feed(_expected(tensors), [messages[0], messages[1], messages[1], *messages[2:]])


def test_rejects_overflowing_chunk():
    tensors, messages = _good()
    last_of_weight = max(i for i, m in enumerate(messages[1:], 1) if m.chunk.name == "0.weight")
    bigger = messages[last_of_weight].chunk.data + b"\x00" * 4
    with pytest.raises(WireError, match="overflows"):
        _feed(_expected(tensors), _with_chunk(messages, last_of_weight, data=bigger))


def test_rejects_chunk_after_all_tensors():
    tensors, messages = _good()
    with pytest.raises(WireError, match="after all"):
        _feed(_expected(tensors), [*messages, messages[-1]])


def test_rejects_missing_header():
    tensors, messages = _good()
    with pytest.raises(WireError, match="before the header"):
        _feed(_expected(tensors), messages[1:])


def test_rejects_empty_stream():
    tensors, _ = _good()
    with pytest.raises(WireError, match="without a header"):
        _feed(_expected(tensors), [])


def test_rejects_double_header():
    tensors, messages = _good()
    with pytest.raises(WireError, match="second header"):
        _feed(_expected(tensors), [messages[0], *messages])
    with pytest.raises(WireError, match="second header"):
        _feed(_expected(tensors), [*messages[:3], messages[0], *messages[3:]])


def test_rejects_empty_message():
    tensors, messages = _good()
    with pytest.raises(WireError, match="empty message"):
        _feed(_expected(tensors), [messages[0], pb.LayerMessage()])


@pytest.mark.parametrize("cut", [1, 2, -1])
def test_rejects_stream_that_ends_early(cut):
    tensors, messages = _good()
    with pytest.raises(WireError, match="ended early"):
        _feed(_expected(tensors), messages[:cut])


def test_rejects_stream_missing_an_empty_tensor():
    tensors = {"a": torch.ones(2), "e": torch.empty(0)}
    messages = _encode(tensors)
    _feed(_expected(tensors), messages)
    with pytest.raises(WireError, match="ended early"):
        _feed(_expected(tensors), messages[:-1])


def test_wire_error_names_layer_step_and_phase():
    tensors, messages = _good()
    with pytest.raises(WireError, match=f"layer {LAYER}, step {STEP}, phase forward"):
        _feed(_expected(tensors), _with_chunk(messages, 1, dtype="float16"))


# -- decode_layers (LoadWeights) ----------------------------------------------


def _model_stream(dtype="float32", chunk_bytes=128):
    layers = [_tensors(seed) for seed in range(3)]
    layers[1] = {
        "w": torch.randn(5, 7, generator=torch.Generator().manual_seed(9)),
        "b": torch.zeros(5),
    }
    messages = []
    for index, tensors in enumerate(layers):
        messages += list(
            encode_layer(index, 4, pb.FORWARD, tensors, dtype=dtype, chunk_bytes=chunk_bytes)
        )
    return layers, messages


@pytest.mark.parametrize("dtype", list(WIRE_DTYPES))
def test_decode_layers_infers_layouts(dtype):
    layers, messages = _model_stream(dtype)
    decoded = decode_layers(messages)
    assert len(decoded) == len(layers)
    for index, ((header, tensors), original) in enumerate(zip(decoded, layers, strict=True)):
        assert (header.layer, header.step) == (index, 4)
        assert list(tensors) == list(original)
        for name, tensor in original.items():
            _assert_bitwise_equal(tensors[name], tensor.to(WIRE_DTYPES[dtype]))


def test_decode_layers_of_nothing_is_empty():
    assert decode_layers([]) == []


def test_decode_layers_rejects_chunk_before_any_header():
    _, messages = _model_stream()
    with pytest.raises(WireError, match="before any header"):
        decode_layers(messages[1:])


def test_decode_layers_rejects_mixed_and_unknown_dtypes():
    _, messages = _model_stream()
    mixed = _with_chunk(messages, 2, dtype="float16")
    with pytest.raises(WireError, match="dtypes"):
        decode_layers(mixed)
    unknown = list(messages)
    for index, message in enumerate(messages):
        if message.WhichOneof("kind") == "chunk":
            unknown = _with_chunk(unknown, index, dtype="int8")
    with pytest.raises(WireError, match="dtypes"):
        decode_layers(unknown)


def test_decode_layers_checks_offsets_and_sizes():
    _, messages = _model_stream()
    with pytest.raises(WireError, match="offset"):
        decode_layers(_with_chunk(messages, 2, offset=0))
    with pytest.raises(WireError):
        decode_layers(_with_header(messages, total_bytes=1))
    # A layer cut short (its last tensor missing) no longer matches its header.
    first_next = next(i for i, m in enumerate(messages) if i and m.WhichOneof("kind") == "header")
    with pytest.raises(WireError, match="header announces 3 tensors, expected 2"):
        decode_layers(messages[: first_next - 1] + messages[first_next:])


def test_decode_layers_rejects_a_tensor_name_twice():
    tensors = {"a": torch.ones(2), "b": torch.ones(3), "c": torch.ones(4)}
    messages = _encode(tensors, layer=0)
    assert [m.chunk.name for m in messages[1:]] == ["a", "b", "c"]
    # Header and sizes stay consistent; only the third tensor reuses the first one's name.
    with pytest.raises(WireError, match="'a'"):
        decode_layers(_with_chunk(messages, 3, name="a"))


# -- domain items <-> LayerMessage ---------------------------------------------


def test_domain_phase_matches_the_wire_enum():
    assert [(p.name, int(p)) for p in Phase] == [
        (name, pb.Phase.Value(name)) for name in ("FORWARD", "BACKWARD", "EVAL")
    ]


@pytest.mark.parametrize("dtype", sorted(WIRE_DTYPES))
def test_encode_layer_is_layer_items_on_the_wire(dtype):
    """The wire bytes are those of the domain items, and they come back unchanged."""
    tensors = _tensors()
    items = list(
        layer_items(
            LAYER, STEP, Phase.BACKWARD, tensors, dtype=dtype, chunk_bytes=64, sender="test"
        )
    )
    messages = _encode(tensors, dtype, phase=pb.BACKWARD)
    assert [to_wire(i).SerializeToString() for i in items] == [
        m.SerializeToString() for m in messages
    ]
    assert isinstance(items[0], Header) and all(isinstance(i, Chunk) for i in items[1:])
    back = [from_wire(m) for m in messages]
    assert back[0] == items[0]
    for got, sent in zip(back[1:], items[1:], strict=True):
        assert isinstance(got.data, bytes) and got.data == bytes(sent.data)
        assert got == Chunk(**{**sent.__dict__, "data": got.data})
    assert payload_bytes(items) == items[0].total_bytes == payload_bytes(back)


def test_header_fields_survive_the_wire():
    header = Header(
        layer=2,
        step=9,
        phase=Phase.EVAL,
        num_tensors=3,
        total_bytes=100,
        sender="swarmx-0-1",
        dense_gradients=True,
    )
    assert from_wire(pb.LayerMessage.FromString(to_wire(header).SerializeToString())) == header


def test_from_wire_rejects_an_empty_message():
    with pytest.raises(WireError, match="neither header nor chunk"):
        from_wire(pb.LayerMessage())


def test_assembler_takes_domain_items_like_messages():
    tensors = _tensors()
    items = list(layer_items(LAYER, STEP, Phase.FORWARD, tensors, chunk_bytes=64))
    from_items = decode_layer(items, _expected(tensors))
    from_messages = decode_layer(_encode(tensors), _expected(tensors))
    for name in tensors:
        _assert_bitwise_equal(from_items[name], from_messages[name])
        _assert_bitwise_equal(from_items[name], tensors[name])
    [(header, decoded)] = decode_layers(items)
    assert header == items[0]
    assert decoded.keys() == tensors.keys()
