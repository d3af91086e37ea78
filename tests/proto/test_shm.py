"""proto.shm: chunk payloads through a shared-memory ring, checked like any wire input."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from proto import shm
from proto import tensor_pb2 as pb
from proto.domain import Chunk, SharedSlot
from proto.frames import WireError, to_wire
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
        decode(_reference(segment))


def test_slot_and_length_are_checked_against_the_segment(plan):
    ring_name = decode(encode(_items()[1])).shared.segment
    with pytest.raises(WireError, match="outside segment"):
        decode(_reference(ring_name, slot=8))
    with pytest.raises(WireError, match="outside segment"):
        decode(_reference(ring_name, slot=-1))
    with pytest.raises(WireError, match="outside segment"):
        decode(_reference(ring_name, length=1025))
    with pytest.raises(WireError, match="reused"):
        decode(_reference(ring_name, slot=0, generation=3))  # odd: never complete


def test_a_name_of_this_run_that_does_not_exist_is_a_wire_error(plan):
    with pytest.raises(WireError, match="cannot be attached"):
        decode(_reference(plan.prefix + "0" * 16))


def test_bytes_and_a_slot_together_are_refused(plan):
    ring_name = decode(encode(_items()[1])).shared.segment
    message = pb.LayerMessage.FromString(_reference(ring_name))
    message.chunk.data = b"\0" * 8
    with pytest.raises(WireError, match="both"):
        decode(message.SerializeToString())


def test_with_shared_memory_off_a_reference_is_refused(monkeypatch):
    monkeypatch.setattr(shm, "_state", shm._Process())
    with pytest.raises(WireError, match="as bytes"):
        decode(_reference("wafer-000000000000-0000000000000000"))
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
    assert plan.ring_bytes == 2 << 20  # two slots; a process's ring is MIN_RING_BYTES
    with pytest.raises(ValueError, match="prefix"):
        shm.SharedMemoryPlan(prefix="../x", slot_bytes=1, ring_bytes=1)


def test_generations_are_a_seqlock():
    """Odd while a slot is written, even after; the reference carries the even value."""
    plan = shm.SharedMemoryPlan.generate(slot_bytes=16, ring_bytes=0)
    ring = shm.Ring(plan.prefix + "cd" * 8, slot_bytes=16, num_slots=2)
    try:
        refs = [ring.write(np.arange(4, dtype=np.float32).tobytes()) for _ in range(3)]
        assert [r.generation for r in refs] == [2, 2, 4]
        assert [r.slot for r in refs] == [0, 1, 0]
        assert isinstance(refs[0], SharedSlot) and ring.write(b"\0" * 17) is None
    finally:
        ring.close()
