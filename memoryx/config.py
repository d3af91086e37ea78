"""Where MemoryX keeps the state: how many servers, and RAM plus disk per server."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from core.config import doc
from memoryx.layer_files import layer_state_bytes, min_budget_bytes
from memoryx.optim import Optimizer
from memoryx.shard_plan import Shard, plan_shards
from memoryx.shard_plan import whole_layer_ranges as partition
from memoryx.sparsity import Sparsity
from memoryx.store import ParameterStore
from memoryx.tiers import TieredStore


@dataclass(kw_only=True)
class MemoryXConfig:
    num_servers: int = doc(
        "MemoryX servers the layers are partitioned over (contiguous, balanced by bytes; a "
        "layer is split over servers when whole layers leave one 10% off its share, except "
        "with sparsity), servers",
        default=1,
    )
    ram_budget_bytes: int | None = doc(
        "tensor bytes each server keeps in RAM, the rest on disk in spill_dir; "
        "None: the whole state in RAM, bytes",
        default=None,
    )
    spill_dir: str | None = doc(
        "directory of the disk tier (one subdirectory per server and run), path", default=None
    )

    def __post_init__(self) -> None:
        if self.num_servers < 1:
            raise ValueError(f"num_servers = {self.num_servers} must be at least 1.")
        if self.ram_budget_bytes is not None and self.ram_budget_bytes < 1:
            raise ValueError(
                f"ram_budget_bytes = {self.ram_budget_bytes} must be positive (or unset: all in RAM)."
            )
        if (self.ram_budget_bytes is None) != (self.spill_dir is None):
            raise ValueError(
                f"ram_budget_bytes = {self.ram_budget_bytes} and spill_dir = {self.spill_dir!r}: "
                "set both to keep the state on disk with a RAM cache, or neither to keep it in RAM."
            )

    @property
    def tiered(self) -> bool:
        return self.ram_budget_bytes is not None

    @property
    def directory_checkpoints(self) -> bool:
        """Checkpoints as a directory of layer files and a manifest (else one torch file)."""
        return self.tiered or self.num_servers > 1

    def plan(
        self, layers: Sequence[Mapping[str, tuple[int, ...]]], *, sparse: bool = False
    ) -> list[Shard]:
        """What each server holds of a model of ``layers`` (param shapes); no pieces when
        ``sparse`` (masks and their updates work on whole tensors)."""
        return plan_shards(layers, self.num_servers, split=not sparse)

    def check(
        self,
        layers: Sequence[Mapping[str, tuple[int, ...]]],
        optimizer: Optimizer.Config,
        masked: Iterable[str] = (),
    ) -> None:
        """ValueError, with the numbers, if the state cannot be held as configured.

        ``layers`` are the param shapes of each model layer, ``masked`` the params
        (``"{layer}.{name}"``) with a sparsity mask. Checks that every
        server's budget holds the layer in flight and that the spill directory
        is writable with room for the state plus one step's snapshots (weights).
        """
        masked = set(masked)
        shards = self.plan(layers, sparse=bool(masked))
        if not self.tiered:
            return
        built = optimizer.build()
        # What each server holds of each layer: one entry per (server, layer).
        held = [
            (i, {p.key: p.stored_shape for p in s.pieces[i]} if i in s.pieces else layers[i])
            for s in shards
            for i in s.layers
        ]
        sizes = [
            layer_state_bytes(shapes, built, [n for n in shapes if f"{i}.{n}" in masked])
            for i, shapes in held
        ]
        need = max(min_budget_bytes(w, s) for w, s in sizes)
        biggest_entry = max(range(len(sizes)), key=lambda i: min_budget_bytes(*sizes[i]))
        biggest = held[biggest_entry][0]
        assert self.ram_budget_bytes is not None and self.spill_dir is not None
        if self.ram_budget_bytes < need:
            weights, state = sizes[biggest_entry]
            raise ValueError(
                f"memoryx.ram_budget_bytes = {self.ram_budget_bytes} is smaller than the layers "
                f"that must be in RAM at once: updating layer {biggest} needs its streamed "
                f"weights ({weights} bytes), their updated copy ({weights} bytes) and its "
                f"{optimizer.name} state ({state} bytes), {need} bytes in all. Raise "
                f"ram_budget_bytes to at least {need}, or raise num_servers: a layer "
                "larger than a server's share is split over servers."
            )
        spill = Path(self.spill_dir)
        try:
            spill.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=spill, prefix=".probe-"):
                pass
        except OSError as exc:
            raise ValueError(
                f"memoryx.spill_dir = {self.spill_dir!r} is not a writable directory ({exc}); "
                "point it at a directory this user can create files in."
            ) from None
        state_bytes = sum(w + s for w, s in sizes)
        # Current versions plus the snapshots of one uncommitted step: their weights and
        # masks only (a re-run reads no optimizer state; memoryx.layer_files.keep_weights_only).
        snapshot_bytes = sum(w for w, _ in sizes)
        disk_need = state_bytes + snapshot_bytes
        free = shutil.disk_usage(spill).free
        if free < disk_need:
            raise ValueError(
                f"memoryx.spill_dir = {self.spill_dir!r} has {free} bytes free, but the disk "
                f"tier needs {disk_need} bytes: the state ({state_bytes} bytes) and the "
                f"weights of one step in flight ({snapshot_bytes} bytes, kept for a re-run). "
                "Free space there or choose another spill_dir."
            )


class StoreBuilder:
    """Builds a server's store one layer at a time, in RAM or tiered as configured."""

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        sparsity: Sparsity.Config | None,
        memoryx: MemoryXConfig,
        layer_offset: int,
        spill_dir: Path | None,
    ) -> None:
        self.optimizer = optimizer
        self.sparsity = sparsity
        self.memoryx = memoryx
        self.layer_offset = layer_offset
        self.spill_dir = spill_dir
        self._layers: list[dict[str, Tensor]] = []
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._tiered: TieredStore | None = None
        self._num_layers = 0
        self.step: int | None = None

    def add(self, step: int, tensors: Mapping[str, Tensor]) -> None:
        if self.step is None:
            self.step = step
        index = self.layer_offset + self._num_layers
        self._num_layers += 1
        self._shapes.update({f"{index}.{n}": tuple(t.shape) for n, t in tensors.items()})
        if self.memoryx.tiered:
            if self._tiered is None:
                assert self.spill_dir is not None and self.memoryx.ram_budget_bytes is not None
                self._tiered = TieredStore(
                    self.optimizer,
                    spill_dir=self.spill_dir,
                    ram_budget_bytes=self.memoryx.ram_budget_bytes,
                    step=step,
                    layer_offset=self.layer_offset,
                )
            self._tiered.add_layer(tensors)
        else:
            self._layers.append(dict(tensors))

    def finish(self) -> ParameterStore:
        if not self._num_layers:
            raise ValueError("layers must hold at least one layer, got none.")
        sparsity = None if self.sparsity is None else self.sparsity.build(self._shapes)
        if self._tiered is not None:
            return self._tiered.finish(sparsity)
        return ParameterStore(
            self._layers,
            self.optimizer,
            step=self.step or 0,
            sparsity=sparsity,
            layer_offset=self.layer_offset,
        )


def new_spill_dir(root: str, server: int) -> Path:
    """A fresh directory of ``root`` for one server of one run."""
    Path(root).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=root, prefix=f"memoryx-{server}-{os.getpid()}-"))


__all__ = ["MemoryXConfig", "StoreBuilder", "new_spill_dir", "partition"]
