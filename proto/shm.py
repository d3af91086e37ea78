"""Co-located fast path: chunk payloads through shared memory instead of gRPC bytes.

When every component of a run shares one host (``runtime.shared_memory``), each
process that writes layer streams (MemoryX serving weights, compute nodes sending
gradients, SwarmX sending sums) owns a ring in POSIX shared memory
(``multiprocessing.shared_memory``, mode 0600, named ``<run prefix><random token>``).
``proto.wire.encode`` copies a chunk's payload into the ring's next free bytes (the one
copy a gRPC send makes into its message) and sends a ``SharedSlot`` reference (entry,
offset, length, generation) instead of the bytes; a relay forwards the reference
untouched; the reader views the bytes and copies them once into its preallocated tensor
(``proto.serde.LayerAssembler``). The traffic counters and the emulated clock count the
payload as having crossed the fabric, since ``len(chunk.data)`` is the same either way.

Reuse is a seqlock per entry: the writer makes an entry's generation odd before it
writes and even (one more) after; the reference carries the even value; a later write
that takes the payload's bytes or its entry makes it odd again. A reader checks the
generation before it views the payload and again after its copy (``verify``); a payload
reused meanwhile raises ``WireError``, as a corrupt stream does, so the step runs
again: never silently wrong bytes. A ring holds what its process writes in a step and
two layers more (``ring_bytes_for``), so this does not happen in a normal run; a chunk
larger than the chunk size goes inline.

No path comes from the wire: a segment name must match this run's prefix and a strict
pattern, and belong to this user, before this process attaches it; entry, offset and
length are checked against the segment's header and size.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import secrets
import struct
import threading
from dataclasses import dataclass
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

import numpy as np

from proto.domain import Chunk, SharedSlot
from proto.frames import WireError

#: Magic, entry count and data bytes at the start of every ring.
_HEADER = struct.Struct("<8sQQ")
_MAGIC = b"wafershm"
_ALIGN = 64
#: Entries (payloads a ring can hold at once) per data byte, and at least.
_BYTES_PER_ENTRY = 4096
_MIN_ENTRIES = 4096
#: A run's prefix: "wafer-" and 12 hex digits of its own; a ring adds 16 more.
_PREFIX_PATTERN = re.compile(r"wafer-[0-9a-f]{12}-")
_TOKEN_HEX = 16
#: Where Linux keeps POSIX shared memory (the driver removes a run's leftovers there).
SHM_DIR = Path("/dev/shm")
#: The least ring of a process, bytes: a few chunks' room for a tiny model. A ring is
#: resident from its start (its pages are touched at creation), so no more than needed.
MIN_RING_BYTES = 4 << 20


def ring_bytes_for(layer_bytes: list[int]) -> int:
    """Ring bytes per server that no reader of a training run falls behind, bytes.

    A message naming a slot is ~100 bytes, so gRPC's flow control no longer holds a writer
    back: a node may send a whole backward pass of gradients before MemoryX has read the
    first. A step ends only when every update is applied, so no writer runs further ahead
    than one step's bytes (the model, once) and the two layers in flight of the next.
    """
    return sum(layer_bytes) + 2 * max(layer_bytes, default=0)


@dataclass(frozen=True)
class SharedMemoryPlan:
    """What the processes of one single-host run share about shared memory."""

    prefix: str  # every segment name of the run starts with it
    slot_bytes: int  # the largest payload a ring takes (the chunk size), bytes
    #: A ring's payload bytes per server its process hosts (a process's ring has at least
    #: MIN_RING_BYTES), bytes.
    ring_bytes: int

    def __post_init__(self) -> None:
        if not _PREFIX_PATTERN.fullmatch(self.prefix):
            raise ValueError(f"SharedMemoryPlan.prefix = {self.prefix!r} is not a run prefix")
        if self.slot_bytes < 1 or self.ring_bytes < self.slot_bytes:
            raise ValueError(
                f"SharedMemoryPlan: slot_bytes = {self.slot_bytes} must be positive and at "
                f"most ring_bytes = {self.ring_bytes}"
            )

    @classmethod
    def generate(cls, *, slot_bytes: int, ring_bytes: int) -> SharedMemoryPlan:
        """A fresh run prefix, with rings of ``ring_bytes`` per server, and room for the
        bytes a wrap leaves unused (up to a chunk) and payloads' 64-byte alignment."""
        ring = ring_bytes + 2 * slot_bytes
        return cls(prefix=f"wafer-{secrets.token_hex(6)}-", slot_bytes=slot_bytes, ring_bytes=ring)

    def name_pattern(self) -> re.Pattern:
        return re.compile(re.escape(self.prefix) + f"[0-9a-f]{{{_TOKEN_HEX}}}")


class _Segment:
    """A ring's mapping: the generation of each entry, and the data bytes."""

    def __init__(self, memory: SharedMemory, *, create: tuple[int, int] | None = None):
        self.memory = memory
        if create is not None:
            _HEADER.pack_into(memory.buf, 0, _MAGIC, *create)
        magic, self.num_entries, self.data_bytes = _HEADER.unpack_from(memory.buf, 0)
        self.data_start = _data_start(self.num_entries)
        if (
            magic != _MAGIC
            or self.num_entries < 1
            or self.data_bytes < 1
            or self.data_start + self.data_bytes > memory.size
        ):
            raise WireError(f"shared-memory segment {memory.name!r} is not a ring of this run")
        self.generations = np.ndarray(
            (self.num_entries,), dtype="<u8", buffer=memory.buf, offset=_HEADER.size
        )


def _data_start(num_entries: int) -> int:
    end = _HEADER.size + 8 * num_entries
    return -(-end // _ALIGN) * _ALIGN


class Ring:
    """This process's ring: each payload takes its own bytes (64-byte aligned) and an entry.

    Bytes are handed out in order and wrap at the end; entries round-robin. A write that
    takes bytes or an entry an older payload still holds first makes that payload's
    generation odd, so its readers see it was reused.
    """

    def __init__(self, name: str, *, data_bytes: int, max_chunk_bytes: int):
        num_entries = max(_MIN_ENTRIES, data_bytes // _BYTES_PER_ENTRY)
        size = _data_start(num_entries) + data_bytes
        # Mode 0600 (the default): only this user's processes can map it.
        memory = SharedMemory(name=name, create=True, size=size)
        self.segment = seg = _Segment(memory, create=(num_entries, data_bytes))
        # Touch every page now: a ring is written through within a step or two anyway, and
        # a first lap through fresh tmpfs pages costs a page fault per 4 KiB mid-stream.
        zeros = bytes(1 << 20)
        for at in range(seg.data_start, size, len(zeros)):
            memory.buf[at : min(at + len(zeros), size)] = zeros[: min(len(zeros), size - at)]
        self.name = name
        self.max_chunk_bytes = min(max_chunk_bytes, data_bytes)
        self._head = 0  # next free data byte
        self._next_entry = 0
        self._live: collections.deque[tuple[int, int, int]] = collections.deque()  # entry, [a, b)
        self._lock = threading.Lock()

    def _retire_oldest(self) -> None:
        entry, _, _ = self._live.popleft()
        generations = self.segment.generations
        generations[entry] = int(generations[entry]) | 1  # odd: not what a reference names

    def write(self, data: bytes | memoryview) -> SharedSlot | None:
        """Copy ``data`` into the ring; its reference, or None when it is too large."""
        length = data.nbytes if isinstance(data, memoryview) else len(data)
        if length > self.max_chunk_bytes:
            return None
        seg = self.segment
        size = max(_ALIGN, -(-length // _ALIGN) * _ALIGN)
        with self._lock:
            live = self._live
            if self._head + size > seg.data_bytes:
                # Wrap: the payloads left in the tail are the oldest; they go first.
                while live and live[0][1] >= self._head:
                    self._retire_oldest()
                self._head = 0
            start, stop = self._head, self._head + size
            while live and live[0][1] < stop and live[0][2] > start:
                self._retire_oldest()
            entry = self._next_entry
            self._next_entry = (entry + 1) % seg.num_entries
            if len(live) == seg.num_entries:
                self._retire_oldest()  # the entry this write takes
            generation = int(seg.generations[entry])
            generation += 1 if generation % 2 == 0 else 2  # odd: being written
            seg.generations[entry] = generation
            at = seg.data_start + start
            seg.memory.buf[at : at + length] = data
            seg.generations[entry] = generation + 1
            live.append((entry, start, stop))
            self._head = stop
        return SharedSlot(self.name, entry, length, generation + 1, start)

    def close(self) -> None:
        _close(self.segment.memory)
        with contextlib.suppress(FileNotFoundError):  # the driver removed it already
            self.segment.memory.unlink()


def _close(memory: SharedMemory) -> None:
    try:
        memory.close()
    except BufferError:
        # A chunk still views it: the mapping lives until the last view goes (and
        # SharedMemory's own finalizer must not try again and complain).
        memory._mmap = None  # type: ignore[attr-defined]


@dataclass
class Counters:
    """Chunks this process moved through shared memory since it started, count."""

    written: int = 0  # payloads written into this process's ring
    read: int = 0  # payloads copied out of a ring and verified unchanged
    inline: int = 0  # payloads too large for a slot, sent as gRPC bytes


class _Process:
    """This process's shared-memory state: its plan, its ring, the rings it attached."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.plan: SharedMemoryPlan | None = None
        self.pattern: re.Pattern | None = None
        self.servers = 0
        self.writes = False
        self.ring: Ring | None = None
        self.attached: dict[str, _Segment] = {}
        self.counters = Counters()


_state = _Process()


def activate(plan: SharedMemoryPlan | None, *, writes: bool = True) -> None:
    """A server of this process starts with ``plan`` (None: shared memory is off); with
    ``writes`` False (the driver), this process only reads the run's rings.

    A process serves one run; one that starts several in turn (a driver, a test) moves on
    to the newest run's plan and drops the rings of the one before."""
    if plan is None:
        return
    if _state.plan is not None and _state.plan != plan:
        close()
    with _state.lock:
        if _state.plan != plan:
            _state.plan, _state.pattern, _state.servers = plan, plan.name_pattern(), 0
            _state.writes = False
        if writes:
            _state.servers += 1
            _state.writes = True


def active() -> bool:
    """True when this process writes its chunks into its ring."""
    return _state.writes


def counters() -> Counters:
    return _state.counters


def _ring() -> Ring | None:
    plan = _state.plan
    if plan is None or not _state.writes:
        return None
    if _state.ring is None:
        with _state.lock:
            if _state.ring is None:
                # Made at the first write, when every server of this process has started:
                # a host of several nodes gets a ring for each.
                ring_bytes = max(MIN_RING_BYTES, plan.ring_bytes * max(1, _state.servers))
                name = plan.prefix + secrets.token_hex(_TOKEN_HEX // 2)
                _state.ring = Ring(name, data_bytes=ring_bytes, max_chunk_bytes=plan.slot_bytes)
    return _state.ring


def write(data: bytes | memoryview) -> SharedSlot | None:
    """``data`` in this process's ring; None when shared memory is off or it does not fit."""
    ring = _ring()
    if ring is None:
        return None
    ref = ring.write(data)
    if ref is None:
        _state.counters.inline += 1
    else:
        _state.counters.written += 1
    return ref


def _segment(name: str) -> _Segment:
    pattern = _state.pattern
    if pattern is None:
        raise WireError("a chunk in shared memory, but this run moves chunks as bytes")
    if not pattern.fullmatch(name):
        raise WireError(f"shared-memory segment {name!r} is not a segment of this run")
    ring = _state.ring
    if ring is not None and ring.name == name:
        return ring.segment
    segment = _state.attached.get(name)
    if segment is None:
        with _state.lock:
            segment = _state.attached.get(name)
            if segment is None:
                segment = _attach(name)
                _state.attached[name] = segment
    return segment


def _attach(name: str) -> _Segment:
    try:
        memory = SharedMemory(name=name)
    except (FileNotFoundError, PermissionError, OSError) as exc:
        raise WireError(f"shared-memory segment {name!r} cannot be attached: {exc}") from None
    # Python < 3.13 registers an attached segment with the resource tracker, which would
    # unlink the writer's ring when this reader exits (and warn): it is not ours.
    resource_tracker.unregister(memory._name, "shared_memory")  # type: ignore[attr-defined]
    try:
        # /dev/shm is every user's: a segment of this name that another user made (the
        # prefix leaked) is not one of this run's rings.
        if os.fstat(memory._fd).st_uid != os.getuid():  # type: ignore[attr-defined]
            raise WireError(f"shared-memory segment {name!r} belongs to another user")
        return _Segment(memory)
    except WireError:
        _close(memory)
        raise


def view(ref: SharedSlot) -> memoryview:
    """The payload ``ref`` names, viewed in place (no copy); ``verify`` after copying it."""
    segment = _segment(ref.segment)
    if (
        not 0 <= ref.slot < segment.num_entries
        or ref.offset < 0
        or ref.length < 0
        or ref.offset + ref.length > segment.data_bytes
    ):
        raise WireError(
            f"shared-memory entry {ref.slot} ({ref.length} bytes at {ref.offset}) is outside "
            f"segment {ref.segment!r} ({segment.num_entries} entries, {segment.data_bytes} bytes)"
        )
    if ref.generation % 2 or int(segment.generations[ref.slot]) != ref.generation:
        raise _overwritten(ref)
    start = segment.data_start + ref.offset
    return segment.memory.buf[start : start + ref.length]


def verify(ref: SharedSlot) -> None:
    """WireError if the slot ``ref`` names was reused since it was written."""
    segment = _segment(ref.segment)
    if int(segment.generations[ref.slot]) != ref.generation:
        raise _overwritten(ref)
    _state.counters.read += 1


def verify_chunk(chunk: Chunk) -> None:
    """``verify`` a chunk whose payload viewed shared memory (a no-op for inline bytes)."""
    if chunk.shared is not None:
        verify(chunk.shared)


def _overwritten(ref: SharedSlot) -> WireError:
    return WireError(
        f"shared-memory entry {ref.slot} of {ref.segment!r} was reused before it was read "
        "(the writer ran more than a ring ahead); the step runs again"
    )


def close() -> None:
    """Unlink this process's ring and drop the rings it attached (a stopping process)."""
    with _state.lock:
        if _state.ring is not None:
            _state.ring.close()
            _state.ring = None
        for segment in _state.attached.values():
            _close(segment.memory)
        _state.attached.clear()


def reset() -> None:
    """``close``, and forget the run: this process moves chunks as bytes again (a driver
    after its run, a test)."""
    close()
    with _state.lock:
        _state.plan = _state.pattern = None
        _state.servers, _state.writes = 0, False


def remove_run_segments(plan: SharedMemoryPlan, directory: Path = SHM_DIR) -> list[str]:
    """Unlink every ring of ``plan``'s run left in ``directory`` (processes killed by a fault
    never unlink theirs); the names removed."""
    pattern = plan.name_pattern()
    removed = []
    for path in directory.glob(plan.prefix + "*"):
        if pattern.fullmatch(path.name) and not path.is_symlink():
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed
