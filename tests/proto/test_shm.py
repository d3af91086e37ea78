"""proto.shm: chunk payloads through a shared-memory ring, checked like any wire input."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from proto import shm
from proto import tensor_pb2 as pb
from proto.domain import Chunk
from proto.frames import WireError, from_wire, to_wire
from proto.serde import Expected, LayerAssembler, layer_items
from proto.wire import decode, encode


@pytest.fixture
def plan(monkeypatch) -> shm.SharedMemoryPlan:
    """A fresh process state with shared memory on (small slots); its ring unlinked after."""
    monkeypatch.setattr(shm, "_state", shm._Process())
    monkeypatch.setattr(shm, "MIN_RING_BYTES", 0)  # 8 slots: a test can lap the ring
    plan = shm.SharedMemoryPlan.generate(slot_bytes=1024, ring_bytes=0)
    plan = shm.SharedMemoryPlan(prefix=plan.prefix, slot_bytes=1024, ring_bytes=8 * 1024)
    shm.activate(plan)
    yield plan
    shm.close()
    shm.remove_run_segments(plan)


def _lap() -> None:
    """Write a whole ring's worth (8 slots) of chunks: every slot is reused once."""
    for _ in range(8):
        encode(_items()[1])


def _items(chunk_bytes: int = 1024) -> list:
    tensors = {"weight": torch.randn(40, 30), "bias": torch.randn(30)}
    return list(layer_items(3, 5, 2, tensors, chunk_bytes=chunk_bytes, sender="node-1"))


def test_a_chunk_travels_as_a_reference_and_reads_back_the_same(plan):
    for item in _items():
        raw = encode(item)
        got = decode(raw)
        assert got == item  # data compared byte for byte
        if isinstance(got, Chunk):
            message = pb.LayerMessage.FromString(raw)
            assert message.chunk.data == b"" and message.chunk.HasField("shared")
            assert message.chunk.shared.segment.startswith(plan.prefix)
            assert got.shared is not None
            assert encode(got) is raw  # a relay forwards the reference, not the bytes
    assert shm.counters().written == sum(isinstance(i, Chunk) for i in _items())


def test_the_assembler_copies_out_and_verifies_each_slot(plan):
    tensors = {"weight": torch.randn(40, 30), "bias": torch.randn(30)}
    items = [decode(encode(i)) for i in layer_items(3, 5, 2, tensors, chunk_bytes=1024)]
    assembler = LayerAssembler(
        Expected(3, 5, 2, [("weight", (40, 30)), ("bias", (30,))], "float32")
    )
    for item in items:
        assembler.add(item)
    out = assembler.finish()
    assert all(torch.equal(out[n], tensors[n]) for n in tensors)
    assert shm.counters().read == sum(isinstance(i, Chunk) for i in items)


def test_an_overwritten_slot_is_a_wire_error_never_wrong_bytes(plan):
    first = decode(encode(_items()[1]))
    _lap()
    with pytest.raises(WireError, match="reused"):
        shm.verify_chunk(first)
    with pytest.raises(WireError, match="reused"):
        shm.view(first.shared)


def test_the_assembler_refuses_a_slot_reused_before_its_copy_ended(plan):
    header, first = _items()[:2]
    chunk = decode(encode(first))
    assembler = LayerAssembler(
        Expected(3, 5, 2, [("weight", (40, 30)), ("bias", (30,))], "float32")
    )
    assembler.add(header)
    # The writer comes round while the chunk waits (or while it is copied): the assembler
    # copies the (now wrong) bytes, then its check after the copy fails the stream.
    _lap()
    with pytest.raises(WireError, match="reused"):
        assembler.add(chunk)


def _read(raw: bytes):
    """``raw`` as a servicer or caller reads it: decoded by gRPC's deserializer (which must
    not raise: gRPC would report only "Exception deserializing ...", without the text),
    then ``from_wire``, which names what is wrong."""
    try:
        message = decode(raw)
    except WireError as exc:
        pytest.fail(f"decode raised {exc!r}; gRPC would hide its text")
    assert isinstance(message, pb.LayerMessage)
    return from_wire(message)


def _reference(segment: str, slot: int = 0, length: int = 8, generation: int = 2) -> bytes:
    fields = pb.TensorChunk(layer=0, step=0, name="w", dtype="float32", shape=[2])
    fields.shared.segment, fields.shared.slot = segment, slot
    fields.shared.length, fields.shared.generation = length, generation
    return pb.LayerMessage(chunk=fields).SerializeToString()


@pytest.mark.parametrize(
    "segment",
    [
        "../../etc/passwd",
        "/dev/shm/wafer-000000000000-0000000000000000",
        "wafer-000000000000-0000000000000000",  # another run's prefix
        "",
    ],
)
def test_segment_names_of_other_runs_or_paths_are_refused(plan, segment):
    with pytest.raises(WireError, match="not a segment of this run"):
        _read(_reference(segment))


def _reference_at(segment: str, **fields) -> bytes:
    message = pb.LayerMessage.FromString(_reference(segment))
    for name, value in fields.items():
        setattr(message.chunk.shared, name, value)
    return message.SerializeToString()


def test_entry_offset_and_length_are_checked_against_the_segment(plan):
    ring_name = decode(encode(_items()[1])).shared.segment
    segment = shm._state.ring.segment
    for fields in [
        {"slot": segment.num_entries},
        {"slot": -1},
        {"offset": -64},
        {"offset": segment.data_bytes - 4, "length": 8},
        {"length": -1},
    ]:
        with pytest.raises(WireError, match="outside segment"):
            _read(_reference_at(ring_name, **fields))
    with pytest.raises(WireError, match="reused"):
        _read(_reference_at(ring_name, generation=3))  # odd: never complete
    with pytest.raises(WireError, match="reused"):
        _read(_reference_at(ring_name, slot=1))  # an entry not written yet


def test_a_name_of_this_run_that_does_not_exist_is_a_wire_error(plan):
    with pytest.raises(WireError, match="cannot be attached"):
        _read(_reference(plan.prefix + "0" * 16))


def test_bytes_and_a_slot_together_are_refused(plan):
    ring_name = decode(encode(_items()[1])).shared.segment
    message = pb.LayerMessage.FromString(_reference(ring_name))
    message.chunk.data = b"\0" * 8
    with pytest.raises(WireError, match="both"):
        _read(message.SerializeToString())


def test_with_shared_memory_off_a_reference_is_refused(monkeypatch):
    monkeypatch.setattr(shm, "_state", shm._Process())
    with pytest.raises(WireError, match="as bytes"):
        _read(_reference("wafer-000000000000-0000000000000000"))
    chunk = _items()[1]
    assert pb.LayerMessage.FromString(encode(chunk)).chunk.data == bytes(chunk.data)


def test_a_chunk_larger_than_a_slot_goes_inline(plan):
    big = _items(chunk_bytes=4096)[1]
    assert len(big.data) > plan.slot_bytes
    message = pb.LayerMessage.FromString(encode(big))
    assert not message.chunk.HasField("shared") and message.chunk.data == bytes(big.data)
    assert shm.counters().inline == 1


def test_to_wire_copies_the_bytes_and_verifies(plan):
    chunk = decode(encode(_items()[1]))
    assert to_wire(chunk).chunk.data == bytes(chunk.data)
    assert shm.counters().read == 1


def test_the_ring_is_private_and_unlinked_on_close(plan):
    encode(_items()[1])
    name = shm._state.ring.name
    path = shm.SHM_DIR / name
    assert path.stat().st_mode & 0o777 == 0o600
    shm.close()
    assert not path.exists()


def test_the_driver_removes_a_killed_process_s_ring(plan, tmp_path):
    ours = tmp_path / (plan.prefix + "ab" * 8)
    keep = [tmp_path / "unrelated", tmp_path / (plan.prefix + "ab"), tmp_path / "wafer-0"]
    for path in [ours, *keep]:
        path.write_bytes(b"")
    assert shm.remove_run_segments(plan, tmp_path) == [ours.name]
    assert not ours.exists() and all(path.exists() for path in keep)


def test_a_reader_leaves_the_writer_s_ring_when_it_exits(plan):
    """Python < 3.13's resource tracker would unlink an attached segment at the reader's
    exit (and warn): the reader unregisters it."""
    sent = _items()[1]
    ref = decode(encode(sent)).shared
    reader = textwrap.dedent(
        f"""
        from proto import shm
        from proto.domain import SharedSlot
        shm.activate(shm.SharedMemoryPlan(prefix={plan.prefix!r}, slot_bytes=1024,
                                          ring_bytes=4096))
        ref = SharedSlot({ref.segment!r}, {ref.slot}, {ref.length}, {ref.generation})
        data = bytes(shm.view(ref))
        shm.verify(ref)
        print(len(data))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", reader],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(ref.length)
    assert "leaked" not in done.stderr
    assert (shm.SHM_DIR / ref.segment).exists()
    assert bytes(shm.view(ref)) == bytes(sent.data)  # still the writer's ring


def test_rings_hold_a_step_of_writes_and_two_layers_more():
    assert shm.ring_bytes_for([10, 30, 20]) == 60 + 2 * 30
    plan = shm.SharedMemoryPlan.generate(slot_bytes=1 << 20, ring_bytes=1)
    assert plan.ring_bytes == 1 + (2 << 20)  # room for a wrap's unused tail
    with pytest.raises(ValueError, match="prefix"):
        shm.SharedMemoryPlan(prefix="../x", slot_bytes=1, ring_bytes=1)


def _ring(data_bytes: int, **kw) -> shm.Ring:
    plan = shm.SharedMemoryPlan.generate(slot_bytes=16, ring_bytes=0)
    return shm.Ring(plan.prefix + "cd" * 8, data_bytes=data_bytes, max_chunk_bytes=256, **kw)


def _current(ring: shm.Ring, ref) -> bool:
    return int(ring.segment.generations[ref.slot]) == ref.generation


def test_a_write_retires_the_payloads_whose_bytes_it_takes():
    """Generations are a seqlock: odd while written or retired, even (one more) after."""
    ring = _ring(256)
    try:
        a, b, c = (ring.write(bytes(64)) for _ in range(3))
        assert [r.offset for r in (a, b, c)] == [0, 64, 128]
        assert [r.generation for r in (a, b, c)] == [2, 2, 2]
        d = ring.write(bytes(100))  # 128 bytes from 192 do not fit: wraps to 0, takes a, b
        assert d.offset == 0 and not _current(ring, a) and not _current(ring, b)
        assert _current(ring, c) and _current(ring, d)
        e = ring.write(bytes(64))  # 128..192: c's bytes
        assert e.offset == 128 and not _current(ring, c) and _current(ring, d)
        f = ring.write(bytes(10))  # the tail 192..256 is free
        assert f.offset == 192 and _current(ring, d) and _current(ring, e)
        assert ring.write(bytes(257)) is None  # larger than max_chunk_bytes: inline
        again = ring.write(bytes(64))  # wraps: d's bytes; a's entry taken anew
        assert again.slot == 6 and not _current(ring, d) and again.generation == 2
    finally:
        ring.close()


def test_a_reused_entry_retires_its_payload(monkeypatch):
    monkeypatch.setattr(shm, "_MIN_ENTRIES", 2)
    ring = _ring(1 << 20)  # 256 entries
    try:
        refs = [ring.write(bytes(8)) for _ in range(ring.segment.num_entries + 1)]
        # 2 when first written, 3 retired, 5 while written again, 6 after.
        assert refs[-1].slot == refs[0].slot and refs[-1].generation == 6
        assert not _current(ring, refs[0]) and _current(ring, refs[1])
    finally:
        ring.close()


def test_a_caller_reads_what_is_wrong_with_a_reference_not_a_deserializing_error(plan):
    """Over real gRPC (loopback): a response stream carrying a reference of another run
    reaches the caller as the WireError naming it, where gRPC's deserializer used to fail
    the call with "Exception deserializing response"."""
    from concurrent import futures

    import grpc

    from proto.frames import from_wire_stream
    from proto.wire import fast_channel

    bad = _reference("wafer-000000000000-0000000000000000")

    def respond(request, context):
        yield encode(_items()[0])  # a valid header first
        yield bad

    handler = grpc.method_handlers_generic_handler(
        "test.Refs", {"Send": grpc.unary_stream_rpc_method_handler(respond)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = fast_channel(channel).unary_stream(
                "/test.Refs/Send",
                request_serializer=None,
                response_deserializer=pb.LayerMessage.FromString,
            )(b"", timeout=10)
            items = from_wire_stream(call)
            assert next(items).layer == 3  # the header
            with pytest.raises(WireError, match="not a segment of this run"):
                next(items)
    finally:
        server.stop(None)
