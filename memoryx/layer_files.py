"""The disk tier's files: one safetensors file per layer version, and their sizes.

A file holds weights ``p/NAME``, masks ``m/NAME`` and optimizer state
``s/NAME/KEY``; its metadata holds the update count and the params in layer
order (safetensors stores tensors sorted by name).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import struct
import threading
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from memoryx.optim import Optimizer
from memoryx.shard_plan import parse_piece_key
from memoryx.store import _Version


@dataclass
class DiskVersion:
    """One version of a layer on disk: its file, update count and kept entries."""

    path: Path
    num_updates: int
    num_kept: int
    weights_only: bool = False  # a snapshot: its optimizer state is freed (keep_weights_only)


@dataclass
class DiskLayer:
    """A layer of the disk tier: its current version, the snapshots a re-run reads, sizes."""

    version: int
    current: DiskVersion
    layout: list[tuple[str, tuple[int, ...]]]
    weights_bytes: int  # params + masks
    state_bytes: int  # optimizer state
    snapshots: dict[int, DiskVersion] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def available_versions(self) -> list[int]:
        return sorted(self.snapshots) + [self.version]


def version_file_name(layer: int, version: int) -> str:
    return f"layer-{layer:05d}-v{version:08d}.safetensors"


def checkpoint_file_name(layer: int, version: int, names: Iterable[str]) -> str:
    """A layer file's name in a checkpoint: a layer split over servers has one file per
    server, named after the first element it holds."""
    for name in names:
        piece = parse_piece_key(name)
        if piece is not None:
            return f"layer-{layer:05d}-v{version:08d}-at{piece.start:012d}.safetensors"
    return version_file_name(layer, version)


def layer_state_bytes(
    shapes: Mapping[str, tuple[int, ...]], optimizer: Optimizer, masked: Iterable[str] = ()
) -> tuple[int, int]:
    """(weights + masks bytes, optimizer state bytes) of one layer with these param shapes."""
    masked = set(masked)
    weights = state = 0
    for name, shape in shapes.items():
        numel = int(torch.Size(shape).numel())
        weights += numel * 4 + (numel if name in masked else 0)
        state += numel * 4 * len(optimizer.init_state(torch.empty(0)))
    return weights, state


def min_budget_bytes(weights_bytes: int, state_bytes: int) -> int:
    """RAM an update of one layer needs: the streamed weights, their updated copy, the state."""
    return 2 * weights_bytes + state_bytes


def file_metadata(num_updates: int, names: list[str]) -> dict[str, str]:
    """A layer file's text metadata: its update count and its params in layer order."""
    return {"num_updates": str(num_updates), "params": json.dumps(names)}


def param_names(metadata: Mapping[str, str] | None) -> list[str]:
    """The params of a layer file in layer order (its tensors are stored sorted by name)."""
    if not metadata or "params" not in metadata:
        raise ValueError("layer file has no 'params' metadata: it was not written by MemoryX.")
    return json.loads(metadata["params"])


def describe_file(path: Path) -> tuple[list[tuple[str, tuple[int, ...]]], int, int, int]:
    """(layout, weights + masks bytes, optimizer state bytes, unpruned entries) of a layer file.

    Reads only its masks (to count what they prune); the rest from the header.
    """
    weights_bytes = state_bytes = pruned = 0
    with safe_open(str(path), framework="pt") as file:
        keys = list(file.keys())  # noqa: SIM118 (safe_open is not a mapping)
        shapes = {k: tuple(file.get_slice(k).get_shape()) for k in keys}
        names = param_names(file.metadata())
        for key, shape in shapes.items():
            numel = int(torch.Size(shape).numel())
            if key.startswith("p/"):
                weights_bytes += 4 * numel
            elif key.startswith("m/"):
                weights_bytes += numel
                pruned += int(file.get_tensor(key).sum())
            else:
                state_bytes += 4 * numel
    layout = [(name, shapes[f"p/{name}"]) for name in names]
    num_params = sum(int(torch.Size(s).numel()) for _, s in layout)
    return layout, weights_bytes, state_bytes, num_params - pruned


def link_or_copy(source: Path, target: Path) -> None:
    """Put ``source``'s content at ``target`` atomically: a hard link, else a copy (no RAM)."""
    temp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    temp.unlink(missing_ok=True)
    try:
        os.link(source, temp)
    except OSError:  # another file system, or links not supported
        shutil.copyfile(source, temp)
        fd = os.open(temp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    os.replace(temp, target)


def flatten(version: _Version) -> dict[str, Tensor]:
    flat = {f"p/{n}": t for n, t in version.params.items()}
    flat.update({f"m/{n}": t for n, t in version.masks.items()})
    for name, state in version.optimizer_state.items():
        flat.update({f"s/{name}/{key}": t for key, t in state.items()})
    return flat


def unflatten(
    layout: list[tuple[str, tuple[int, ...]]] | None,
    weights: Mapping[str, Tensor],
    state: Mapping[str, Tensor],
    num_updates: int,
) -> _Version:
    """A version from flat file tensors, params and masks in ``layout`` order."""
    names = (
        [n for n, _ in layout] if layout is not None else [k[2:] for k in weights if k[:2] == "p/"]
    )
    params = {name: weights[f"p/{name}"] for name in names}
    masks = {name: weights[f"m/{name}"] for name in names if f"m/{name}" in weights}
    optimizer_state: dict[str, dict[str, Tensor]] = {name: {} for name in params}
    for key, tensor in state.items():
        name, _, part = key[2:].rpartition("/")
        optimizer_state[name][part] = tensor
    return _Version(params, optimizer_state, num_updates, masks)


class BackgroundSync:
    """fsyncs new files and deletes old ones on a thread: a step's I/O overlaps its compute."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: deque[tuple[str, Path]] = deque()
        self._busy = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def fsync(self, path: Path) -> None:
        self._put("fsync", path)

    def unlink(self, path: Path) -> None:
        self._put("unlink", path)

    def wait(self) -> None:
        """Return once everything queued so far is done."""
        with self._cond:
            while self._queue or self._busy:
                self._cond.wait()

    def close(self) -> None:
        self.wait()
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=10)

    def _put(self, what: str, path: Path) -> None:
        with self._cond:
            self._queue.append((what, path))
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                what, path = self._queue.popleft()
                self._busy = True
            try:
                if what == "fsync":
                    fsync_path(path)
                else:
                    path.unlink(missing_ok=True)
            except FileNotFoundError:  # rolled back meanwhile: nothing left to make durable
                pass
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()


class BackgroundWriter:
    """Writes layer files on a thread, in the order given: the step goes on meanwhile.

    ``write(path, tensors, metadata)`` does the writing. Until a file is written its
    tensors stay referenced here (so they count as resident); ``wait(path)`` before
    reading a file, ``wait()`` before a commit. A failed write is raised by the next
    ``wait``; nothing queued after it is written.
    """

    def __init__(self, write: Callable[[Path, dict[str, Tensor], dict[str, str]], None]) -> None:
        self._write = write
        self._cond = threading.Condition()
        self._queue: deque[tuple[Path, dict[str, Tensor], dict[str, str]]] = deque()
        self._pending: list[Path] = []  # queued or being written, in order
        self._num_done = 0
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def put(self, path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
        with self._cond:
            self._raise()
            self._queue.append((path, tensors, metadata))
            self._pending.append(path)
            self._cond.notify_all()

    def wait(self, path: Path | None = None) -> None:
        """Return once ``path`` (None: everything queued so far) is written."""
        with self._cond:
            while (path in self._pending if path is not None else self._pending) and not (
                self._error
            ):
                self._cond.wait()
            self._raise()

    def wait_one(self) -> bool:
        """Wait until one more queued file is written (its tensors freed); False if none is."""
        with self._cond:
            if not self._pending or self._error:
                return False
            done = self._num_done
            while self._num_done == done and not self._error:
                self._cond.wait()
            return True

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=60)

    def _raise(self) -> None:
        if self._error is not None:
            raise OSError(f"a MemoryX layer file could not be written: {self._error}")

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                path, tensors, metadata = self._queue.popleft()
            try:
                self._write(path, tensors, metadata)
            except BaseException as exc:  # noqa: BLE001 (raised to the store by wait)
                with self._cond:
                    self._error = exc
                    self._cond.notify_all()
                return
            del tensors  # freed now, unless the cache still holds them
            with self._cond:
                self._pending.remove(path)
                self._num_done += 1
                self._cond.notify_all()


def state_byte_ranges(path: Path) -> list[tuple[int, int]]:
    """[start, stop) file offsets of the optimizer state (``s/``) of layer file ``path``,
    adjacent tensors merged (safetensors stores them by name, so they are one range)."""
    with open(path, "rb") as file:
        (header_len,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(header_len))
    base = 8 + header_len
    spans = sorted(
        (base + entry["data_offsets"][0], base + entry["data_offsets"][1])
        for key, entry in header.items()
        if key.startswith("s/")
    )
    merged: list[tuple[int, int]] = []
    for start, stop in spans:
        if merged and merged[-1][1] == start:
            merged[-1] = (merged[-1][0], stop)
        elif stop > start:
            merged.append((start, stop))
    return merged


_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


def punch_hole(fd: int, start: int, length: int) -> None:
    """Free ``length`` bytes of the open file ``fd`` from ``start`` (they read as zeros
    after; size and other offsets unchanged). OSError where the system cannot."""
    fallocate = getattr(ctypes.CDLL(None, use_errno=True), "fallocate", None)
    if fallocate is None:
        raise OSError(errno.EOPNOTSUPP, "fallocate is not available on this system")
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    mode = _FALLOC_FL_KEEP_SIZE | _FALLOC_FL_PUNCH_HOLE
    if fallocate(fd, mode, start, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def keep_weights_only(path: Path) -> None:
    """Free the optimizer state of layer file ``path`` on disk; its weights and masks stay.

    A snapshot of version ``k`` serves re-runs of step ``k``, which read its weights
    only (the layer ignores the repeated gradient), so its optimizer state, two thirds
    of a layer under AdamW, need not stay on disk until the commit. The state's bytes
    are punched out in place (nothing written; the weights keep their offsets); where
    the file system cannot, the file is replaced by a weights-only copy. A file with
    other links (a checkpoint's) is left whole: the checkpoint holds its blocks anyway,
    and punching would change the checkpoint.
    """
    if os.stat(path).st_nlink > 1:
        return
    ranges = state_byte_ranges(path)
    fd = os.open(path, os.O_WRONLY)
    try:
        for start, stop in ranges:
            punch_hole(fd, start, stop - start)
        return
    except OSError:
        pass  # no hole punching here: rewrite below
    finally:
        os.close(fd)
    temp = path.with_name(f".{path.name}.weights")
    with safe_open(str(path), framework="pt") as file:
        kept = {k: file.get_tensor(k) for k in file.keys() if not k.startswith("s/")}  # noqa: SIM118
        save_file(kept, str(temp), metadata=file.metadata())
    os.replace(temp, path)


def fsync_path(path: Path) -> None:
    """fsync a file, or a directory (so that its new entries are durable)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = [
    "BackgroundSync",
    "BackgroundWriter",
    "DiskLayer",
    "DiskVersion",
    "checkpoint_file_name",
    "describe_file",
    "fsync_path",
    "keep_weights_only",
    "file_metadata",
    "flatten",
    "layer_state_bytes",
    "link_or_copy",
    "min_budget_bytes",
    "param_names",
    "punch_hole",
    "state_byte_ranges",
    "unflatten",
    "version_file_name",
]
