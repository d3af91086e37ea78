"""A parameter store beyond RAM: layers on disk, a RAM cache of bounded size.

Every version of every layer is one immutable safetensors file in the spill
directory (weights ``p/NAME``, masks ``m/NAME``, optimizer state
``s/NAME/KEY``). Applying step ``k`` to a layer writes the file of version
``k + 1`` and keeps version ``k``'s weights as the snapshot a re-run of step
``k`` reads (its optimizer state is freed at once: a re-run ignores gradients
already taken, so the disk holds the state plus its weights, not twice the
state). ``commit(k)`` makes the new files durable and deletes the snapshots.
A checkpoint hard-links the files, never pulling the state through RAM.

The RAM cache holds at most ``ram_budget_bytes`` of tensors: the weights (and
masks) streamed to the nodes and the optimizer state an update needs. It
prefetches in streaming order (forward 0..L-1, then backward L-1..0) and
evicts what streaming needs last. Resident bytes are counted per tensor until
the tensor is freed, so a stream that still holds an evicted layer counts.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from core.atomic import write_json_atomic
from memoryx.gradient_checks import check_grads, nonfinite_gradient
from memoryx.layer_files import (
    BackgroundSync,
    BackgroundWriter,
    DiskLayer,
    DiskVersion,
    checkpoint_file_name,
    describe_file,
    file_metadata,
    flatten,
    fsync_path,
    keep_weights_only,
    link_or_copy,
    unflatten,
    version_file_name,
)
from memoryx.optim import Optimizer
from memoryx.sparsity import Sparsity, apply_masks
from memoryx.store import (
    STATE_FORMAT_VERSION,
    ParameterStore,
    StepError,
    _Version,
    already_applied,
)
from memoryx.tier_cache import STATE, WEIGHTS, Cache, Ledger, Prefetcher, StreamOrder
from memoryx.tier_errors import NonFiniteNotUndone, commit_refused, rollback_refused

#: ``_apply``'s answer for a re-run whose gradients this layer already took.
_ALREADY_APPLIED = "already applied"


class TieredStore(ParameterStore):
    """``ParameterStore`` whose layers live on disk, with a RAM cache of ``ram_budget_bytes``.

    Same interface and the same update rule as the in-RAM store, so a run
    gives bitwise the same weights. Build it empty and ``add_layer`` one at a
    time (the whole model never has to be in RAM), then ``finish``.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        spill_dir: str | Path,
        ram_budget_bytes: int,
        step: int = 0,
        layer_offset: int = 0,
        prefetch: bool = True,
        background_writes: bool = True,
    ) -> None:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}.")
        self.optimizer = optimizer
        self.sparsity: Sparsity | None = None
        self.spill_dir = Path(spill_dir)
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        self.ram_budget_bytes = ram_budget_bytes
        self.layer_offset = layer_offset  # global index of local layer 0 (sparsity names)
        self._first_step = step
        self._failed_steps: set[int] = set()  # non-finite part-way: never committed
        self._layers: list[DiskLayer] = []  # type: ignore[assignment]
        self._ledger = Ledger()
        self._syncer = BackgroundSync()
        # Updated layers are written back off the step's path; a commit waits for them.
        self._writer = BackgroundWriter(self._write_file)
        self._background_writes = background_writes  # False: on the updating thread
        self._cache = Cache(
            ram_budget_bytes, self._ledger, self._eviction_rank, drain=self._writer.wait_one
        )
        self._io_lock = threading.Lock()
        # Held while bringing tensors from disk into RAM (after slot locks, never before).
        self._load_lock = threading.Lock()
        self._read_bytes = 0
        self._written_bytes = 0
        self._order = StreamOrder()
        # Without prefetch (tests that count bytes) every load happens on the caller's thread.
        self._prefetcher = Prefetcher(self._order, self._prefetch_one)
        if prefetch:
            self._prefetcher.start()

    # -- building ------------------------------------------------------------
    def add_layer(self, tensors: Mapping[str, Tensor], *, num_updates: int = 0) -> None:
        """Append the next layer at the store's first step with fresh optimizer state."""
        if not tensors:
            raise ValueError(
                f"layer {len(self._layers)} must hold at least one parameter, got none."
            )
        # Written to disk and dropped: fp32 and contiguous suffices, no private copy needed.
        params = {name: t.detach().to(torch.float32).contiguous() for name, t in tensors.items()}
        state = {name: self.optimizer.init_state(p) for name, p in params.items()}
        self.add_version(_Version(params, state, num_updates), self._first_step)

    def add_version(self, version: _Version, version_number: int) -> None:
        """Append the next layer as ``version`` (weights, state, masks) at ``version_number``."""
        index = len(self._layers)
        path = self._write(index, version_number, version)
        layout = [(name, tuple(p.shape)) for name, p in version.params.items()]
        weights_bytes = sum(p.nbytes for p in version.params.values()) + sum(
            m.nbytes for m in version.masks.values()
        )
        state_bytes = sum(t.nbytes for s in version.optimizer_state.values() for t in s.values())
        self._layers.append(
            DiskLayer(
                version=version_number,
                current=DiskVersion(path, version.num_updates, _num_kept(version)),
                layout=layout,
                weights_bytes=weights_bytes,
                state_bytes=state_bytes,
            )
        )
        self._order.num_layers = len(self._layers)

    def finish(self, sparsity: Sparsity | None = None, *, init_masks: bool = True) -> TieredStore:
        """Make the layers durable; with ``sparsity``, mask them as of the first step.

        ``init_masks=False`` keeps the masks the layers came with (a resumed checkpoint).
        """
        if not self._layers:
            raise ValueError("layers must hold at least one layer, got none.")
        self.sparsity = sparsity
        if sparsity is not None and init_masks:
            for index, slot in enumerate(self._layers):
                version = self._load_version(index, slot.current)
                names = {f"{self.layer_offset + index}.{n}": n for n in version.params}
                full = sparsity.init_masks(
                    {key: version.params[n] for key, n in names.items()}, self._first_step
                )
                masks = {n: full[key] for key, n in names.items() if key in full}
                if not masks:
                    continue
                apply_masks(version.params, version.optimizer_state, masks)
                version.masks = masks
                # Rewritten in place: the first version has no snapshot to keep.
                slot.current = DiskVersion(
                    self._write(index, slot.version, version),
                    version.num_updates,
                    _num_kept(version),
                )
                slot.weights_bytes += sum(m.nbytes for m in masks.values())
        self._sync()
        return self

    # -- reading -------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self._layers)

    def layout(self, layer: int) -> list[tuple[str, tuple[int, ...]]]:
        return list(self._layer(layer).layout)

    def num_params(self, layer: int | None = None) -> int:
        layers = self.layer_ids if layer is None else [layer]
        return sum(
            int(torch.Size(shape).numel()) for i in layers for _, shape in self._layer(i).layout
        )

    def num_kept(self, layer: int) -> int:
        return self._layer(layer).current.num_kept

    @property
    def state_bytes(self) -> int:
        return sum(slot.weights_bytes + slot.state_bytes for slot in self._layers)

    @property
    def resident_bytes(self) -> int:
        return self._ledger.live_bytes

    @property
    def peak_resident_bytes(self) -> int:  # type: ignore[override]
        return self._ledger.peak_bytes

    def io_bytes(self) -> tuple[int, int]:
        with self._io_lock:
            return self._read_bytes, self._written_bytes

    def weights(self, layer: int, step: int) -> dict[str, Tensor]:
        params, _ = self._weights_and_masks(layer, step, "weights")
        self._order.advance(layer - self.layer_offset)
        self._prefetcher.wake()
        return params

    def masks(self, layer: int, step: int) -> dict[str, Tensor]:
        return self._weights_and_masks(layer, step, "masks")[1]

    def _weights_and_masks(self, layer: int, step: int, what: str):
        index = self._index(layer)
        slot = self._layers[index]
        with slot.lock:
            disk = self._disk_version(slot, layer, step, what)
            entry = self._cached_part(index, step, WEIGHTS, disk, slot.weights_bytes)
        params = {name: entry[f"p/{name}"] for name, _ in slot.layout}
        masks = {name: entry[f"m/{name}"] for name, _ in slot.layout if f"m/{name}" in entry}
        return params, masks

    def _disk_version(self, slot: DiskLayer, layer: int, step: int, what: str) -> DiskVersion:
        if slot.version == step:
            return slot.current
        if step in slot.snapshots:
            return slot.snapshots[step]
        raise StepError(
            f"layer {layer} has no {what} for step {step}; "
            f"available versions: {slot.available_versions()}."
        )

    def _cached_part(
        self, index: int, version: int, part: str, disk: DiskVersion, num_bytes: int
    ) -> dict[str, Tensor]:
        key = (index, version, part)
        entry = self._cache.get(key)
        if entry is None:
            with self._load_lock:
                entry = self._cache.get(key)  # the prefetcher may have just brought it
                if entry is None:
                    self._cache.reserve(num_bytes, evict=True)
                    try:
                        entry = self._read(disk.path, ("p/", "m/") if part == WEIGHTS else ("s/",))
                        self._cache.put(key, entry)
                    finally:
                        self._cache.release(num_bytes)
        return entry

    # -- updating ------------------------------------------------------------
    def apply_gradients(self, layer: int, step: int, grads: Mapping[str, Tensor]) -> bool:
        """As ``ParameterStore.apply_gradients``; a non-finite update rolls the step back.

        The disk tier knows the ``error`` policy only (``skip`` is refused with a
        spill directory before training): nothing non-finite is ever written.
        """
        index = self._index(layer)
        slot = self._layers[index]
        check_grads(layer, slot.layout, grads)
        problem = self._apply(index, layer, step, slot, grads)
        if problem is None:
            return True
        if problem == _ALREADY_APPLIED:
            return False
        # Outside the layer's lock: rollback takes every layer's lock, in layer order.
        return self._end_nonfinite_step(layer, step, problem)

    def skip_step(self, step: int) -> None:
        raise StepError(
            "optimizer.nonfinite = 'skip' is not supported with a MemoryX disk tier; "
            "use 'error' (the config refuses it before training)."
        )

    def _apply(self, index: int, layer: int, step: int, slot, grads) -> str | None:
        """Write version ``step + 1`` of the layer; None, or why it was not written."""
        problem = nonfinite_gradient(grads)
        if problem is not None:
            return problem
        with slot.lock:
            if already_applied(layer, slot.version, step, step in slot.snapshots):
                return _ALREADY_APPLIED
            old = slot.current
            with self._load_lock:
                streamed = self._cache.get((index, step, WEIGHTS))
                state = self._cache.take((index, step, STATE))
                need = slot.weights_bytes + (0 if state is not None else slot.state_bytes)
                self._cache.reserve(need, evict=True)
                try:
                    if streamed is not None:  # a stream may still read these: update a copy
                        fresh = {k: t.clone() for k, t in streamed.items()}
                        self._ledger.track(fresh)
                    else:
                        fresh = self._read(old.path, ("p/", "m/"))
                    if state is None:
                        state = self._read(old.path, ("s/",))
                finally:
                    self._cache.release(need)
            new = unflatten(slot.layout, fresh, state, old.num_updates + 1)
            del streamed, fresh, state
            problem = self._finite_step(layer, step, new, grads)
            if problem is not None:
                return problem
            path = self._write(index, step + 1, new, background=self._background_writes)
            # Cached as they are: eviction drops them when room is needed (the next
            # forward pass wants these weights soon, the state only in the next backward).
            flat = flatten(new)
            self._cache.put(
                (index, step + 1, WEIGHTS),
                {k: t for k, t in flat.items() if not k.startswith("s/")},
            )
            self._cache.put(
                (index, step + 1, STATE), {k: t for k, t in flat.items() if k.startswith("s/")}
            )
            # Published last: a prefetcher that sees the new version finds it cached.
            slot.snapshots[step] = old
            slot.current = DiskVersion(path, new.num_updates, _num_kept(new))
            slot.version = step + 1
            self._writer.wait(old.path)  # written in full before it is trimmed
            with self._load_lock:  # a prefetch of the old state is either done or skipped
                old.weights_only = True
                keep_weights_only(old.path)
            return None

    def commit(self, step: int) -> None:
        with self._all_locks():
            if step in self._failed_steps:
                raise commit_refused(step)
            lagging = [i for i, slot in enumerate(self._layers) if slot.version < step + 1]
            if lagging:
                raise StepError(
                    f"cannot commit step {step}: layers {lagging} are not updated yet "
                    f"(versions {[self._layers[i].version for i in lagging]}, "
                    f"need {step + 1})."
                )
            self._sync()
            write_json_atomic(self.spill_dir / "manifest.json", self._manifest())
            for slot in self._layers:
                for version in [v for v in slot.snapshots if v <= step]:
                    # Never written again under this name: deleting it can wait.
                    self._syncer.unlink(slot.snapshots.pop(version).path)
            self._cache.drop(self._is_live_key)

    def _end_nonfinite_step(self, layer: int, step: int, problem: str) -> bool:
        """The ``error`` policy without a rollback: the layers the step updated keep only
        their previous weights, so the step can neither be undone nor committed."""
        with self._all_locks():
            updated = [
                self.layer_offset + i for i, s in enumerate(self._layers) if step in s.snapshots
            ]
            self._failed_steps.update([step] if updated else [])
        if not updated:
            return super()._end_nonfinite_step(layer, step, problem)  # nothing to undo
        raise NonFiniteNotUndone(layer, step, problem, updated)

    def rollback(self, step: int) -> list[int]:
        """StepError once a layer took step ``step``: it kept only its weights (keep_weights_only)."""
        with self._all_locks():
            self._check_mid_step(step, "roll back")
            updated = [
                self.layer_offset + i for i, s in enumerate(self._layers) if s.version > step
            ]
            if updated:
                raise rollback_refused(step, updated)
            return []

    def state_dict(self) -> dict:
        """Committed state as tensors, read layer by layer from disk (all of it in RAM).

        For checkpoints use ``committed_files``: it needs no RAM at all.
        """
        with self._all_locks():
            self._check_committed()
            layers = []
            for index, slot in enumerate(self._layers):
                version = self._load_version(index, slot.current)
                layers.append(
                    {
                        "version": slot.version,
                        "num_updates": version.num_updates,
                        "params": version.params,
                        "masks": version.masks,
                        "optimizer_state": version.optimizer_state,
                    }
                )
            return {"format_version": STATE_FORMAT_VERSION, "layers": layers}

    def committed_files(self) -> list[tuple[Path, int, int]]:
        """(file, version, num_updates) of every layer's committed version, in layer order.

        The files are immutable until a later commit deletes them; hard-link
        or copy them while holding no expectation beyond the next ``commit``.
        """
        with self._all_locks():
            self._check_committed()
            return [(s.current.path, s.version, s.current.num_updates) for s in self._layers]

    def export_committed(self, directory: Path) -> list[dict]:
        """Hard-link (or copy) every layer's committed file into ``directory``, without RAM.

        Returns one manifest entry per layer: model index, file name, version, updates.
        """
        with self._all_locks():
            self._check_committed()
            entries = []
            for layer, slot in zip(self.layer_ids, self._layers, strict=True):
                name = checkpoint_file_name(layer, slot.version, [n for n, _ in slot.layout])
                link_or_copy(slot.current.path, directory / name)
                entries.append(
                    {
                        "layer": layer,
                        "file": name,
                        "version": slot.version,
                        "num_updates": slot.current.num_updates,
                    }
                )
            return entries

    def adopt_file(self, source: Path, version: int, num_updates: int) -> None:
        """Append the next layer from a checkpoint's layer file (linked, never read whole)."""
        index = len(self._layers)
        path = self.spill_dir / version_file_name(index, version)
        link_or_copy(source, path)
        layout, weights_bytes, state_bytes, num_kept = describe_file(path)
        with self._io_lock:  # its masks were read to count what they prune
            self._read_bytes += weights_bytes - 4 * sum(
                int(torch.Size(shape).numel()) for _, shape in layout
            )
        self._layers.append(
            DiskLayer(
                version=version,
                current=DiskVersion(path, num_updates, num_kept),
                layout=layout,
                weights_bytes=weights_bytes,
                state_bytes=state_bytes,
            )
        )
        self._order.num_layers = len(self._layers)

    def _check_committed(self) -> None:
        pending = {i: sorted(s.snapshots) for i, s in enumerate(self._layers) if s.snapshots}
        if pending:
            raise ValueError(
                f"cannot save uncommitted state: layers {sorted(pending)} still hold snapshots "
                f"of steps {sorted({v for vs in pending.values() for v in vs})}; "
                "commit the step first."
            )

    def close(self) -> None:
        """Stop prefetching and drop the cache (the files stay)."""
        self._prefetcher.close()
        self._writer.close()
        self._syncer.close()
        self._cache.drop(lambda key: False)

    # -- disk ----------------------------------------------------------------
    def _write(self, layer: int, version: int, data: _Version, *, background=False) -> Path:
        """The file of ``data`` as ``version`` of ``layer``: written now, or queued."""
        path = self.spill_dir / version_file_name(layer, version)
        flat = flatten(data)
        metadata = file_metadata(data.num_updates, list(data.params))
        with self._io_lock:
            self._written_bytes += sum(t.nbytes for t in flat.values())
        if background:
            self._writer.put(path, flat, metadata)
        else:
            self._write_file(path, flat, metadata)
        return path

    def _write_file(self, path: Path, flat: dict[str, Tensor], metadata: dict[str, str]) -> None:
        save_file(flat, str(path), metadata=metadata)
        self._syncer.fsync(path)  # durable by the time the step commits

    def _read(self, path: Path, prefixes: tuple[str, ...]) -> dict[str, Tensor]:
        """Private RAM copies of the tensors of ``path`` whose names start with ``prefixes``."""
        self._writer.wait(path)
        out = {}
        with safe_open(str(path), framework="pt") as file:
            for key in file.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if key.startswith(prefixes):
                    # get_tensor maps the file copy-on-write; clone makes the RAM copy explicit.
                    out[key] = file.get_tensor(key).clone()
        self._ledger.track(out)
        with self._io_lock:
            self._read_bytes += sum(t.nbytes for t in out.values())
        return out

    def _load_version(self, layer: int, disk: DiskVersion) -> _Version:
        flat = self._read(disk.path, ("p/", "m/", "s/"))
        return unflatten(
            self._layers[layer].layout,
            {k: t for k, t in flat.items() if not k.startswith("s/")},
            {k: t for k, t in flat.items() if k.startswith("s/")},
            disk.num_updates,
        )

    def _sync(self) -> None:
        """Every file written so far, and the directory entries, durable."""
        self._writer.wait()
        self._syncer.wait()
        fsync_path(self.spill_dir)

    def _manifest(self) -> dict:
        return {
            "layers": [
                {
                    "file": s.current.path.name,
                    "version": s.version,
                    "num_updates": s.current.num_updates,
                }
                for s in self._layers
            ]
        }

    # -- cache policy ----------------------------------------------------------
    def _is_live_key(self, key: tuple[int, int, str]) -> bool:
        layer, version, _ = key
        slot = self._layers[layer]
        return version == slot.version or version in slot.snapshots

    def _eviction_rank(self, key: tuple[int, int, str]) -> tuple[int, int]:
        layer, version, part = key
        # Old versions only serve re-runs: evict them first; then what streaming needs last.
        stale = int(version != self._layers[layer].version)
        return stale, self._order.distance(layer, part)

    def _prefetch_one(self, layer: int, part: str) -> bool:
        slot = self._layers[layer]
        version, disk = slot.version, slot.current
        key = (layer, version, part)
        if self._cache.get(key) is not None:
            return True
        num_bytes = slot.weights_bytes if part == WEIGHTS else slot.state_bytes
        # Loads are serialised, and a loaded entry is in the cache before the lock is
        # released: the foreground can always evict what the prefetcher brought.
        with self._load_lock:
            if self._cache.get(key) is not None:
                return True
            if part == STATE and disk.weights_only:
                return True  # a snapshot's state is freed: a re-run never reads it
            if not self._cache.reserve(num_bytes, evict=False):
                return False
            try:
                entry = self._read(disk.path, ("p/", "m/") if part == WEIGHTS else ("s/",))
            except Exception:  # noqa: BLE001 (rolled back or committed away meanwhile)
                return True
            finally:
                self._cache.release(num_bytes)
            # A version that moved on meanwhile ranks stale: it is evicted first.
            self._cache.put(key, entry)
        return True


def _num_kept(version: _Version) -> int:
    pruned = sum(int(m.sum()) for m in version.masks.values())
    return sum(p.numel() for p in version.params.values()) - pruned


__all__ = ["STATE", "WEIGHTS", "TieredStore"]
