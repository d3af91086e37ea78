"""proto.wire: the layer-stream codec reads and writes exactly LayerMessage protobuf."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from proto import tensor_pb2 as pb
from proto.domain import Chunk, Header
from proto.frames import Bundle, expand
from proto.serde import WireError, from_wire, from_wire_stream, layer_items, to_wire
from proto.wire import SMALL_CHUNK_BYTES, _varint, decode, encode


def _items() -> list:
    tensors = {"weight": torch.randn(40, 30), "bias": torch.randn(30), "empty": torch.zeros(0)}
    return list(layer_items(3, 5, 2, tensors, chunk_bytes=1024, sender="node-1"))


def test_encode_is_the_protobuf_message():
    for item in _items():
        assert pb.LayerMessage.FromString(encode(item)) == to_wire(item)


def test_decode_gives_what_protobuf_gives_and_views_the_received_bytes():
    for item in _items():
        raw = to_wire(item).SerializeToString()
        got = decode(raw)
        assert got == item  # Chunk equality compares data bytes with the original's
        if isinstance(got, Chunk):
            if len(raw) > SMALL_CHUNK_BYTES:
                assert got.data.obj is raw  # not copied
            assert got.wire is raw  # a relay forwards these very bytes
            assert encode(got) is raw


def test_small_and_large_chunks_both_decode_and_only_small_ones_are_copied():
    items = [i for i in _items() if isinstance(i, Chunk)]
    raws = [to_wire(i).SerializeToString() for i in items]
    assert any(len(r) <= SMALL_CHUNK_BYTES for r in raws)
    assert any(len(r) > SMALL_CHUNK_BYTES for r in raws)
    for item, raw in zip(items, raws, strict=True):
        got = decode(raw)
        assert got == item and got.wire is raw
        assert isinstance(got.data, memoryview) == (len(raw) > SMALL_CHUNK_BYTES)


def test_a_changed_chunk_drops_the_bytes_it_came_in():
    chunk = next(i for i in map(decode, map(encode, _items())) if isinstance(i, Chunk))
    changed = dataclasses.replace(chunk, data=b"\0" * len(chunk.data))
    assert changed.wire is None
    assert bytes(from_wire(pb.LayerMessage.FromString(encode(changed))).data) == bytes(changed.data)


def _unusual(chunk: Chunk) -> dict[str, bytes]:
    """The same chunk written as other protobuf writers may write it."""
    fields = pb.TensorChunk(
        layer=chunk.layer, step=chunk.step, name=chunk.name, dtype=chunk.dtype, offset=4
    )
    data = pb.TensorChunk(data=bytes(chunk.data)).SerializeToString()
    unknown = b"\xf8\x01\x07"  # field 31, varint 7: unknown fields are skipped
    return {
        "data first": data + fields.SerializeToString(),
        "data twice, the last counts": pb.TensorChunk(data=b"xyzw").SerializeToString()
        + fields.SerializeToString()
        + data,
        "unknown field": fields.SerializeToString() + unknown + data,
        "no data": fields.SerializeToString(),
    }


@pytest.mark.parametrize(
    "case", ["data first", "data twice, the last counts", "unknown field", "no data"]
)
@pytest.mark.parametrize("num_values", [4, 1024], ids=["small", "large"])
def test_unusual_chunk_messages_decode_as_protobuf_decodes_them(case, num_values):
    values = torch.arange(num_values, dtype=torch.float32).numpy().tobytes()
    chunk = Chunk(1, 2, "w", "float32", (num_values,), 0, len(values), values)
    variants = _unusual(chunk)
    inner = variants[case]
    raw = b"\x12" + _varint(len(inner)) + inner  # (a varint: a large one's size takes two bytes)
    want = from_wire(pb.LayerMessage.FromString(raw))
    got = decode(raw)
    assert got == want
    assert bytes(got.data) == bytes(want.data)


def test_headers_and_empty_messages_go_through_protobuf():
    header = Header(layer=1, step=2, phase=1, num_tensors=3, total_bytes=4, pass_id=9)
    assert decode(encode(header)) == header
    empty = decode(b"")
    assert isinstance(empty, pb.LayerMessage)  # the servicer names the error (from_wire)
    with pytest.raises(Exception):  # noqa: B017 - protobuf's DecodeError
        decode(b"\x12\x05ab")


# -- bundles: a small layer as one message ---------------------------------------------


def test_a_bundle_is_the_protobuf_message_and_decodes_to_views_of_its_own_items():
    items = _items()
    bundle = Bundle(tuple(items))
    raw = encode(bundle)
    assert pb.LayerMessage.FromString(raw) == to_wire(bundle)
    got = decode(raw)
    assert isinstance(got, Bundle) and expand(got) == tuple(items)
    for part in got.items:
        if isinstance(part, Chunk):
            # Each chunk keeps the bytes of the message it is on its own: a relay forwards
            # it (alone or in a bundle of its own) without encoding it again.
            assert part.wire == encode(dataclasses.replace(part))  # (a copy has no wire)
            if len(part.wire) > SMALL_CHUNK_BYTES:
                assert part.data.obj is part.wire
    # Protobuf's reading of the same bytes gives the same items.
    assert expand(pb.LayerMessage.FromString(raw)) == tuple(items)


def test_a_relayed_bundle_is_the_same_bytes():
    raw = encode(Bundle(tuple(_items())))
    assert encode(Bundle(expand(decode(raw)))) == raw


def test_a_bundle_of_several_layers_reads_as_their_items_in_order():
    # A pass stream may carry a run of small layers in one bundle (swarmx.pass_relay).
    first, second = _items(), [dataclasses.replace(i, layer=5) for i in _items()]
    raw = encode(Bundle((*first, *second)))
    assert list(from_wire_stream([decode(raw)])) == [*first, *second]
    assert expand(pb.LayerMessage.FromString(raw)) == (*first, *second)


def _bundle_of(*messages: pb.LayerMessage) -> bytes:
    return pb.LayerMessage(bundle=pb.LayerBundle(items=list(messages))).SerializeToString()


@pytest.mark.parametrize(
    "case, error",
    [
        ("empty", "must start with its layer's header"),
        ("chunk first", "must start with its layer's header"),
        ("nested", "holds another bundle"),
    ],
)
def test_a_bad_bundle_is_refused_where_it_is_read_with_its_reason(case, error):
    header, *chunks = (to_wire(i) for i in _items())
    raw = {
        "empty": _bundle_of(),
        "chunk first": _bundle_of(chunks[0], header),
        "nested": _bundle_of(header, pb.LayerMessage(bundle=pb.LayerBundle(items=[header]))),
    }[case]
    got = decode(raw)  # never raises: gRPC would hide the reason
    with pytest.raises(WireError, match=error):
        list(from_wire_stream([got]))
    with pytest.raises(WireError, match="read it with expand"):
        from_wire(pb.LayerMessage.FromString(raw))
