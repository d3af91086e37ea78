"""Versioned per-layer parameter store: fp32 master weights plus optimizer state.

Version ``k`` of a layer is its weights after ``k`` updates, i.e. the input of
step ``k``. Updates are copy-on-write: applying step ``k`` publishes new tensors
for version ``k + 1`` and keeps the old ones, untouched, as the snapshot of
version ``k`` until ``commit(k)``. That gives three properties at once:

- a step that failed half-way can be re-run from its start: layers already
  updated serve their version-``k`` snapshot and ignore the repeated gradient;
- tensors handed out by ``weights`` are never written again, so a reader that
  is still serialising them cannot see a half-applied update;
- ``rollback`` can restore weights and optimizer state of an uncommitted step.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor

from core.mask_positions import kept_positions
from memoryx.gradient_checks import all_finite, check_grads, nonfinite_gradient, nonfinite_names
from memoryx.optim import Optimizer
from memoryx.sparsity import Sparsity, apply_masks

# Bumped when the layout of ``state_dict`` changes (2: per-layer sparsity masks).
STATE_FORMAT_VERSION = 2


class StepError(Exception):
    """A request for a step version that is not available (FAILED_PRECONDITION over gRPC)."""


class NonFiniteUpdate(Exception):
    """A gradient or update holding NaN/Inf reached a layer; the store applied none of the step."""

    def __init__(self, layer: int, step: int, problem: str) -> None:
        self.layer, self.step = layer, step
        super().__init__(
            f"step {step}, layer {layer}: {problem}. MemoryX applied none of it and rolled the "
            "step back in every layer. Lower optimizer.lr (or check the model and data), or set "
            "optimizer.nonfinite: skip to skip such steps as torch.amp's GradScaler does."
        )


@dataclass
class _Version:
    """One immutable version of a layer: its weights and the optimizer state that goes with them."""

    params: dict[str, Tensor]
    optimizer_state: dict[str, dict[str, Tensor]]
    num_updates: int  # updates applied to reach this version; drives Adam bias correction
    # Pruning masks (True = pruned) of the masked params, valid for this version's weights:
    # the entries they prune are zero in ``params`` and in every ``optimizer_state`` tensor.
    masks: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class _Layer:
    version: int
    current: _Version
    snapshots: dict[int, _Version] = field(default_factory=dict)  # uncommitted, by version
    lock: threading.Lock = field(default_factory=threading.Lock)

    def available_versions(self) -> list[int]:
        return sorted(self.snapshots) + [self.version]


class ParameterStore:
    """Master weights and optimizer state of every layer, with per-layer versions.

    Calls for different layers run concurrently; calls for the same layer are
    serialised by that layer's lock. ``commit``, ``rollback`` and ``state_dict``
    take every layer's lock, always in layer order.
    """

    #: Steps whose update was skipped for non-finite values (optimizer.nonfinite = skip).
    num_skipped_steps: int = 0

    def __init__(
        self,
        layers: Sequence[Mapping[str, Tensor]],
        optimizer: Optimizer,
        *,
        step: int = 0,
        sparsity: Sparsity | None = None,
        layer_offset: int = 0,
    ) -> None:
        """Copy ``layers`` to contiguous fp32; ``step`` is the first step to run.

        With ``sparsity``, parameters are named ``"{layer}.{name}"`` for it, and
        the selected ones start masked (pruned entries zeroed) as of ``step``.
        ``layer_offset`` is the model's index of ``layers[0]`` (a MemoryX shard
        holds a slice of the model): every method takes and names model indices.
        """
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}.")
        if not layers:
            raise ValueError("layers must hold at least one layer, got none.")
        for index, layer in enumerate(layers):
            if not layer:
                raise ValueError(f"layer {index} must hold at least one parameter, got none.")
        self.optimizer = optimizer
        self.sparsity = sparsity
        self.layer_offset = layer_offset
        self._layers: list[_Layer] = []
        for index, layer in enumerate(layers):
            params = {name: _to_master(t) for name, t in layer.items()}
            state = {name: optimizer.init_state(p) for name, p in params.items()}
            masks = self._init_masks(layer_offset + index, params, step)
            apply_masks(params, state, masks)
            self._layers.append(_Layer(version=step, current=_Version(params, state, 0, masks)))
        self._resident_lock = threading.Lock()
        self._resident_bytes = sum(_version_bytes(slot.current) for slot in self._layers)
        self.peak_resident_bytes = self._resident_bytes

    def _init_masks(self, layer: int, params: Mapping[str, Tensor], step: int) -> dict:
        if self.sparsity is None:
            return {}
        full = self.sparsity.init_masks({f"{layer}.{n}": p for n, p in params.items()}, step)
        return {name: full[f"{layer}.{name}"] for name in params if f"{layer}.{name}" in full}

    @property
    def num_layers(self) -> int:
        return len(self._layers)

    @property
    def layer_ids(self) -> range:
        """Model indices of the layers this store holds."""
        return range(self.layer_offset, self.layer_offset + len(self._layers))

    def layout(self, layer: int) -> list[tuple[str, tuple[int, ...]]]:
        """Ordered (param name, shape) of ``layer``."""
        params = self._layer(layer).current.params
        return [(name, tuple(p.shape)) for name, p in params.items()]

    def num_params(self, layer: int | None = None) -> int:
        """Scalar parameter count of ``layer``, or of every layer when None."""
        layers = self.layer_ids if layer is None else [layer]
        return sum(sum(p.numel() for p in self._layer(i).current.params.values()) for i in layers)

    @property
    def state_bytes(self) -> int:
        """Bytes of the current version of every layer: weights, optimizer state, masks."""
        return sum(_version_bytes(slot.current) for slot in self._layers)

    @property
    def resident_bytes(self) -> int:
        """Tensor bytes this store holds in RAM now (current versions and snapshots)."""
        return self._resident_bytes

    def io_bytes(self) -> tuple[int, int]:
        """Disk bytes (read, written) since the store started: none for a store in RAM."""
        return 0, 0

    def _add_resident(self, num_bytes: int) -> None:
        with self._resident_lock:
            self._resident_bytes += num_bytes
            self.peak_resident_bytes = max(self.peak_resident_bytes, self._resident_bytes)

    def version(self, layer: int) -> int:
        """Updates applied to ``layer`` so far (counting from the store's first step)."""
        return self._layer(layer).version

    def holds_snapshot(self, layer: int, step: int) -> bool:
        """Whether ``layer`` keeps its version ``step`` as the snapshot of an uncommitted step."""
        slot = self._layer(layer)
        with slot.lock:
            return step in slot.snapshots

    def committed_step(self) -> int:
        """The step the committed state starts (every layer's version before a step in flight)."""
        with self._all_locks():
            return min(min(slot.snapshots, default=slot.version) for slot in self._layers)

    def weights(self, layer: int, step: int) -> dict[str, Tensor]:
        """Weights valid as input of step ``step``: the caller must not mutate them."""
        slot = self._layer(layer)
        with slot.lock:
            if slot.version == step:
                chosen = slot.current
            elif step in slot.snapshots:
                chosen = slot.snapshots[step]
            else:
                raise StepError(
                    f"layer {layer} has no weights for step {step}; "
                    f"available versions: {slot.available_versions()}."
                )
            return dict(chosen.params)

    def masks(self, layer: int, step: int) -> dict[str, Tensor]:
        """Pruning masks (True = pruned) of ``layer``'s masked params at version ``step``."""
        slot = self._layer(layer)
        with slot.lock:
            if slot.version == step:
                return dict(slot.current.masks)
            if step in slot.snapshots:
                return dict(slot.snapshots[step].masks)
            raise StepError(
                f"layer {layer} has no masks for step {step}; "
                f"available versions: {slot.available_versions()}."
            )

    def num_kept(self, layer: int) -> int:
        """Entries of ``layer``'s current weights that no mask prunes."""
        current = self._layer(layer).current
        pruned = sum(int(m.sum()) for m in current.masks.values())
        return sum(p.numel() for p in current.params.values()) - pruned

    def apply_gradients(self, layer: int, step: int, grads: Mapping[str, Tensor]) -> bool:
        """Apply step ``step``'s reduced gradient to ``layer``.

        Returns True when applied, False when the layer was already updated by
        this step (a re-run): an update is never applied twice.

        A NaN/Inf gradient, or an update that would make a weight NaN/Inf, is
        never applied. The optimizer's ``nonfinite`` policy says what happens:
        ``skip`` ends the step in every layer with its weights unchanged
        (``skip_step``) and returns False; ``error`` rolls the step back in
        every layer and raises ``NonFiniteUpdate``.
        """
        slot = self._layer(layer)
        check_grads(layer, self.layout(layer), grads)
        with slot.lock:
            if already_applied(layer, slot.version, step, step in slot.snapshots):
                return False
            problem = self._update(layer, step, slot, grads)
        if problem is None:
            return True
        # Outside the layer's lock: both take every layer's lock, in layer order.
        return self._end_nonfinite_step(layer, step, problem)

    def _end_nonfinite_step(self, layer: int, step: int, problem: str) -> bool:
        """End step ``step`` as ``optimizer.nonfinite`` says (no layer lock held)."""
        if self.optimizer.config.nonfinite == "skip":
            self.skip_step(step)
            return False
        # StepError: the other layers are not mid-step, so there is nothing of the step to undo.
        with contextlib.suppress(StepError):
            self.rollback(step)
        raise NonFiniteUpdate(layer, step, problem)

    def _finite_step(
        self, layer: int, step: int, new: _Version, grads: Mapping[str, Tensor]
    ) -> str | None:
        """``_step_version``; then None, or why ``new`` must not be published."""
        self._step_version(layer, step, new, grads)
        bad = nonfinite_names(new.params)
        if bad:
            return (
                f"the update of {', '.join(map(repr, bad))} gives NaN or Inf weights "
                "from a finite gradient"
            )
        return None

    def _update(
        self, layer: int, step: int, slot: _Layer, grads: Mapping[str, Tensor]
    ) -> str | None:
        """Publish version ``step + 1`` of ``slot``; or say why not (non-finite)."""
        problem = nonfinite_gradient(grads)
        if problem is not None:
            return problem
        old = slot.current
        new = _Version(
            params={name: p.clone() for name, p in old.params.items()},
            optimizer_state={
                name: {key: t.clone() for key, t in state.items()}
                for name, state in old.optimizer_state.items()
            },
            num_updates=old.num_updates + 1,
            masks=dict(old.masks),
        )
        problem = self._finite_step(layer, step, new, grads)
        if problem is not None:
            return problem
        slot.snapshots[step] = old
        slot.current = new
        slot.version = step + 1
        self._add_resident(_version_bytes(new))
        return None

    def skip_step(self, step: int) -> None:
        """End uncommitted step ``step`` in every layer with the weights it started from.

        Layers the step already updated go back to their version-``step``
        snapshot; then every layer publishes that same version as ``step + 1``
        (weights, optimizer state and update count unchanged, as when
        GradScaler skips ``optimizer.step()``). The snapshot stays until
        ``commit(step)``, so a re-run streams the same weights and its
        gradients count as already applied.
        """
        with self._all_locks():
            self._check_mid_step(step, "skip")
            for slot in self._layers:
                if slot.version == step + 1:
                    self._add_resident(-_version_bytes(slot.current))
                    start = slot.snapshots[step]
                else:
                    start = slot.current
                # Snapshot and version step + 1 are one object; commit(step) uncounts the snapshot.
                self._add_resident(_version_bytes(start))
                slot.snapshots[step] = start
                slot.current = start
                slot.version = step + 1
            self.num_skipped_steps += 1

    def _step_version(
        self, layer: int, step: int, new: _Version, grads: Mapping[str, Tensor]
    ) -> None:
        """Apply step ``step`` in place to ``new``, a private copy of the layer's version ``step``.

        The one update rule of every store (in RAM or tiered), so that they agree bitwise.
        """
        old_masks = dict(new.masks)
        for name, param in new.params.items():
            mask = old_masks.get(name)
            if mask is None:
                self.optimizer.update(
                    param, grads[name], new.optimizer_state[name], new.num_updates
                )
                continue
            # A version's pruned entries are zero in its weights and state (masked when
            # made, and by every update since), so only the kept entries need the update.
            self.optimizer.update_kept(
                param,
                grads[name],
                new.optimizer_state[name],
                new.num_updates,
                torch.from_numpy(kept_positions(mask)),
            )
        if self.sparsity is not None and old_masks and self.sparsity.is_update_step(step):
            new.masks = self._update_masks(layer, step, new, grads)

    def _update_masks(
        self, layer: int, step: int, new: _Version, grads: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        """The masks after update step ``step``, applied to ``new``'s weights and state."""
        assert self.sparsity is not None
        # One overflowed gradient anywhere in the layer skips the mask update (mixed precision).
        finite = all(all_finite(g) for g in grads.values())
        full = {f"{layer}.{name}": name for name in new.masks}
        updated = self.sparsity.update_masks(
            step,
            {key: new.params[name] for key, name in full.items()},
            {key: grads[name] for key, name in full.items()},
            {key: new.masks[name] for key, name in full.items()},
            grads_finite=finite,
        )
        masks = {name: updated[key] for key, name in full.items()}
        apply_masks(new.params, new.optimizer_state, masks, previous=new.masks)
        return masks

    def commit(self, step: int) -> None:
        """Finish step ``step``: every layer must be at version ``step + 1`` (or later).

        Drops the snapshots of versions up to ``step``, so the step can no longer
        be re-run or rolled back. Committing the same step again is a no-op.
        """
        with self._all_locks():
            lagging = [i for i, slot in enumerate(self._layers) if slot.version < step + 1]
            if lagging:
                raise StepError(
                    f"cannot commit step {step}: layers {lagging} are not updated yet "
                    f"(versions {[self._layers[i].version for i in lagging]}, "
                    f"need {step + 1})."
                )
            for slot in self._layers:
                for version in [v for v in slot.snapshots if v <= step]:
                    self._add_resident(-_version_bytes(slot.snapshots.pop(version)))

    def rollback(self, step: int) -> list[int]:
        """Undo uncommitted step ``step`` in every layer it reached; returns those layers.

        Every layer must be at version ``step`` or ``step + 1`` with the snapshot
        of ``step`` still held, so that all layers end at version ``step``.
        """
        with self._all_locks():
            self._check_mid_step(step, "roll back")
            rolled_back = []
            for index, slot in enumerate(self._layers):
                if slot.version == step + 1:
                    self._add_resident(-_version_bytes(slot.current))
                    slot.current = slot.snapshots.pop(step)
                    slot.version = step
                    rolled_back.append(self.layer_offset + index)
            return rolled_back

    def _check_mid_step(self, step: int, action: str) -> None:
        """Every layer is at version ``step``, or at an uncommitted ``step + 1``; hold the locks."""
        stuck = [
            i
            for i, slot in enumerate(self._layers)
            if not (slot.version == step or (slot.version == step + 1 and step in slot.snapshots))
        ]
        if stuck:
            raise StepError(
                f"cannot {action} step {step}: layers {stuck} are at versions "
                f"{[self._layers[i].available_versions() for i in stuck]} "
                f"instead of an uncommitted {step + 1} or {step}."
            )

    def state_dict(self, *, committed_only: bool = False) -> dict:
        """Committed weights, optimizer state and versions, as plain containers of tensors.

        A step in flight (uncommitted snapshots) is refused, unless ``committed_only``:
        then each layer it reached is saved as its snapshot from before the step.
        """
        with self._all_locks():
            pending = {i: sorted(s.snapshots) for i, s in enumerate(self._layers) if s.snapshots}
            if pending and not committed_only:
                raise ValueError(
                    f"cannot save uncommitted state: layers {sorted(pending)} still hold snapshots "
                    f"of steps {sorted({v for vs in pending.values() for v in vs})}; "
                    "commit the step first."
                )
            chosen = [
                (min(slot.snapshots), slot.snapshots[min(slot.snapshots)])
                if slot.snapshots
                else (slot.version, slot.current)
                for slot in self._layers
            ]
            # Published versions are never written again, so references are a consistent copy.
            return {
                "format_version": STATE_FORMAT_VERSION,
                "layers": [
                    {
                        "version": version,
                        "num_updates": entry.num_updates,
                        "params": dict(entry.params),
                        "masks": dict(entry.masks),
                        "optimizer_state": {
                            name: dict(state) for name, state in entry.optimizer_state.items()
                        },
                    }
                    for version, entry in chosen
                ],
            }

    @classmethod
    def from_state_dict(
        cls,
        state: dict,
        optimizer: Optimizer,
        *,
        sparsity: Sparsity | None = None,
        layer_offset: int = 0,
    ) -> ParameterStore:
        """Rebuild a store from ``state_dict()``; ``optimizer`` must keep the same state tensors.

        Saved masks are restored as they were; ``sparsity`` (None: no masks) must
        select exactly the saved masked parameters.
        """
        if state.get("format_version") != STATE_FORMAT_VERSION:
            raise ValueError(
                f"state format_version must be {STATE_FORMAT_VERSION}, "
                f"got {state.get('format_version')!r}."
            )
        layers = state["layers"]
        store = cls([entry["params"] for entry in layers], optimizer, layer_offset=layer_offset)
        store.sparsity = sparsity
        for index, (slot, entry) in enumerate(zip(store._layers, layers, strict=True)):
            saved_masks = entry["masks"]
            selected = store._selected(store.layer_offset + index, slot.current.params)
            if set(saved_masks) != selected:
                raise ValueError(
                    f"layer {index} was saved with masks of {sorted(saved_masks)}, but the "
                    f"sparsity config selects {sorted(selected)}; resume with the same sparsity."
                )
            for name, mask in saved_masks.items():
                if mask.dtype != torch.bool or mask.shape != slot.current.params[name].shape:
                    raise ValueError(
                        f"mask of layer {index} param {name!r} must be bool of shape "
                        f"{tuple(slot.current.params[name].shape)}, got {mask.dtype} of shape "
                        f"{tuple(mask.shape)}."
                    )
            slot.current.masks = dict(saved_masks)
            for name, param in slot.current.params.items():
                expected = optimizer.init_state(param)
                saved = entry["optimizer_state"][name]
                if set(saved) != set(expected):
                    raise ValueError(
                        f"optimizer state of layer {index} param {name!r} holds {sorted(saved)}, "
                        f"but {type(optimizer).__name__} with this config needs {sorted(expected)}."
                    )
                for key, tensor in expected.items():
                    if saved[key].shape != tensor.shape:
                        raise ValueError(
                            f"optimizer state {key!r} of layer {index} param {name!r} has shape "
                            f"{tuple(saved[key].shape)}, expected {tuple(tensor.shape)}."
                        )
                    tensor.copy_(saved[key])
                slot.current.optimizer_state[name] = expected
            # A saved version is masked already; masking again keeps that true of any state
            # handed in (the update touches only the kept entries).
            apply_masks(slot.current.params, slot.current.optimizer_state, slot.current.masks)
            slot.current.num_updates = entry["num_updates"]
            slot.version = entry["version"]
        store._resident_bytes = store.peak_resident_bytes = store.state_bytes
        return store

    def _selected(self, layer: int, params: Mapping[str, Tensor]) -> set[str]:
        if self.sparsity is None:
            return set()
        return {name for name in params if f"{layer}.{name}" in self.sparsity.params}

    def _layer(self, layer: int) -> _Layer:
        return self._layers[self._index(layer)]

    def _index(self, layer: int) -> int:
        """Position in this store of model layer ``layer``."""
        if layer not in self.layer_ids:
            raise ValueError(
                f"layer must be in [{self.layer_ids.start}, {self.layer_ids.stop}), got {layer}."
            )
        return layer - self.layer_offset

    @contextmanager
    def _all_locks(self) -> Iterator[None]:
        # Always in layer order, so that two holders of several locks cannot deadlock.
        with ExitStack() as stack:
            for slot in self._layers:
                stack.enter_context(slot.lock)
            yield


def _version_bytes(version: _Version) -> int:
    """Tensor bytes of one version: weights, optimizer state and masks."""
    return (
        sum(t.nbytes for t in version.params.values())
        + sum(t.nbytes for state in version.optimizer_state.values() for t in state.values())
        + sum(t.nbytes for t in version.masks.values())
    )


def already_applied(layer: int, version: int, step: int, uncommitted: bool = False) -> bool:
    """True if step ``step``'s gradients were applied to a layer at ``version`` (a re-run);
    StepError if the layer is not at that step, at the next, or past it with ``step`` still
    ``uncommitted`` (its snapshot kept: a pass of several steps run again)."""
    if version == step + 1 or (version > step and uncommitted):
        return True
    if version != step:
        raise StepError(
            f"layer {layer} cannot take gradients of step {step}: it is at version "
            f"{version}, so it expects step {version}."
        )
    return False


def _to_master(tensor: Tensor) -> Tensor:
    """A private contiguous fp32 copy, detached from any autograd graph."""
    return tensor.detach().to(dtype=torch.float32, copy=True).contiguous()


__all__ = [
    "STATE_FORMAT_VERSION",
    "NonFiniteUpdate",
    "ParameterStore",
    "StepError",
]
