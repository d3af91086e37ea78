"""A run's weight sparsity: its config, and the object MemoryX drives masks with.

Names follow docs/hardware.md §2.1 (the vendor's model zoo). In YAML::

    sparsity:
      algorithm: rigl
      sparsity: 0.9
      update: {freq: 100, start: 0, stop: 2000}
      groups:                      # optional: other settings per pattern
        - {param_filter: ["*.fc1.weight"], sparsity: 0.5}

``Sparsity.Config.build(named_shapes)`` resolves the filters against a
model's parameters; the ``Sparsity`` it returns makes the initial masks and,
on update steps with finite gradients, the new ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import Tensor

from core.config import doc
from memoryx.sparsity.algorithms import ALGORITHMS, AlgorithmName
from memoryx.sparsity.filters import ParamSparsity, select_parameters
from memoryx.sparsity.masks import InitMethod, generator_for, init_mask
from memoryx.sparsity.schedules import (
    CosineSchedule,
    PowerSchedule,
    Schedule,
    Scheduled,
    UpdateSchedule,
    as_schedule_config,
)

# SET's drop fraction (Mocanu et al. 2018 call it zeta) and RigL's initial
# drop fraction (Evci et al. 2020, alpha): 0.3 in both papers and in the
# vendor's default (docs/hardware.md §2.1).
DEFAULT_DROP_FRACTION = 0.3
# GMP ramps from a dense model (Zhu & Gupta 2017 use s_i = 0).
GMP_INITIAL_SPARSITY = 0.0


def _check_fraction(where: str, value: Scheduled, *, upper_inclusive: bool, meaning: str) -> None:
    lowest, highest = as_schedule_config(value).value_range()
    too_high = highest > 1 if upper_inclusive else highest >= 1
    if lowest < 0 or too_high:
        interval = "[0, 1]" if upper_inclusive else "[0, 1)"
        shown = (
            value
            if not isinstance(value, Schedule.Config)
            else f"a schedule over [{lowest}, {highest}]"
        )
        raise ValueError(f"{where} = {shown} is not valid; {meaning} must lie in {interval}.")


@dataclass(kw_only=True)
class ParamGroupConfig:
    """Sparsity settings for the parameters some patterns match."""

    param_filter: list[str] = doc("glob patterns over full parameter names, e.g. '*.fc1.weight'")
    sparsity: float | Schedule.Config = doc(
        "fraction of the group's weights pruned, in [0, 1), or a schedule of it"
    )
    init_method: InitMethod | None = doc(
        "how the first mask is chosen (None: the top-level init_method)", default=None
    )
    drop_fraction: float | Schedule.Config | None = doc(
        "SET/RigL: fraction of surviving weights dropped per update (None: top-level)",
        default=None,
    )

    def __post_init__(self) -> None:
        if not self.param_filter:
            raise ValueError("param_filter must list at least one glob pattern, got [].")
        _check_fraction(
            "sparsity", self.sparsity, upper_inclusive=False, meaning="the pruned fraction"
        )
        if self.drop_fraction is not None:
            _check_fraction(
                "drop_fraction",
                self.drop_fraction,
                upper_inclusive=True,
                meaning="the dropped fraction",
            )


class Sparsity:
    """Which weights are pruned, and how the masks evolve over training."""

    @dataclass(kw_only=True)
    class Config:
        algorithm: AlgorithmName = doc(
            "static: fixed mask; gmp: gradual magnitude pruning; set/rigl: drop and regrow",
            default="static",
        )
        sparsity: float | Schedule.Config | None = doc(
            "fraction of each selected parameter's weights pruned, in [0, 1), or a schedule "
            "(gmp: a number is the final sparsity of a cubic ramp from 0); None: groups only",
            default=None,
        )
        init_method: InitMethod = doc(
            "first mask: random entries, smallest magnitudes (topk), or existing zeros",
            default="random",
        )
        param_filter: list[str] | None = doc(
            "glob patterns of parameters the top-level sparsity covers (None: every parameter "
            "with more than one dimension except names with embedding, norm, lm_head)",
            default=None,
        )
        groups: list[ParamGroupConfig] = doc(
            "per-pattern settings, e.g. [{param_filter: ['*.fc1.weight'], sparsity: 0.9}]; "
            "they take precedence over the top level",
            default_factory=list,
        )
        update: UpdateSchedule.Config | None = doc(
            "gmp/set/rigl: steps that update the masks, {freq, start, stop}", default=None
        )
        drop_fraction: float | Schedule.Config | None = doc(
            "set/rigl: fraction of surviving weights dropped and regrown per update "
            "(None: 0.3; constant for set, cosine decay to 0 at update.stop for rigl)",
            default=None,
        )
        seed: int = doc("seed of random masks (init and SET regrowth)", default=0)

        def __post_init__(self) -> None:
            if self.algorithm not in ALGORITHMS:
                raise ValueError(
                    f"algorithm = {self.algorithm!r} is not valid; choose one of "
                    f"{', '.join(map(repr, ALGORITHMS))}."
                )
            if self.sparsity is None and not self.groups:
                raise ValueError(
                    "sparsity is not set and groups is empty; give a sparsity in [0, 1) "
                    "(e.g. 0.9) or a list of groups."
                )
            if self.sparsity is not None:
                _check_fraction(
                    "sparsity", self.sparsity, upper_inclusive=False, meaning="the pruned fraction"
                )
            if self.drop_fraction is not None:
                _check_fraction(
                    "drop_fraction",
                    self.drop_fraction,
                    upper_inclusive=True,
                    meaning="the dropped fraction",
                )
            algorithm = ALGORITHMS[self.algorithm]
            if algorithm.is_dynamic and self.update is None:
                raise ValueError(
                    f"update is not set, but algorithm = {self.algorithm!r} changes masks on a "
                    "schedule; give update: {freq: N, start: S, stop: E} (steps)."
                )
            if not algorithm.is_dynamic and self.update is not None:
                raise ValueError(
                    "update is set, but algorithm = 'static' never changes its masks; "
                    "drop update or choose gmp, set or rigl."
                )
            uses_drop = algorithm.regrows
            if not uses_drop and (
                self.drop_fraction is not None
                or any(g.drop_fraction is not None for g in self.groups)
            ):
                raise ValueError(
                    f"drop_fraction is set, but algorithm = {self.algorithm!r} never regrows; "
                    "it applies to set and rigl only."
                )
            for where, value in self._sparsities():
                self._check_sparsity_schedule(where, value)
            # Build every schedule once, so a missing end step shows up now, not mid-run.
            for _, value in self._sparsities():
                self.sparsity_schedule(value).build(self.update)
            if uses_drop:
                drops = [self.drop_fraction] + [g.drop_fraction for g in self.groups]
                for value in drops:
                    self.drop_fraction_schedule(value, self.update)

        def _sparsities(self) -> list[tuple[str, Scheduled]]:
            found = [("sparsity", self.sparsity)] if self.sparsity is not None else []
            return found + [
                (f"groups[{i}].sparsity", g.sparsity) for i, g in enumerate(self.groups)
            ]

        def _check_sparsity_schedule(self, where: str, value: Scheduled) -> None:
            if self.algorithm == "static" and isinstance(value, Schedule.Config):
                lowest, highest = value.value_range()
                if lowest != highest:
                    raise ValueError(
                        f"{where} is a schedule, but algorithm = 'static' keeps one mask; "
                        "give a number, or choose gmp, set or rigl."
                    )
            if self.algorithm == "gmp" and not self.sparsity_schedule(value).is_non_decreasing():
                raise ValueError(
                    f"{where} must never decrease under algorithm = 'gmp', which only prunes; "
                    "use a ramp with final >= init, or choose set or rigl to regrow."
                )

        def sparsity_schedule(self, value: Scheduled) -> Schedule.Config:
            """The schedule of a sparsity setting: gmp turns a number into its cubic ramp."""
            if self.algorithm == "gmp" and not isinstance(value, Schedule.Config):
                return PowerSchedule.Config(init=GMP_INITIAL_SPARSITY, final=value)
            return as_schedule_config(value)

        def drop_fraction_schedule(
            self, value: Scheduled | None, update: UpdateSchedule.Config | None
        ) -> Schedule | None:
            """The built drop-fraction schedule (None for algorithms that never drop)."""
            if not ALGORITHMS[self.algorithm].regrows:
                return None
            if value is None and self.algorithm == "rigl":
                # Evci et al. 2020, eq. 1: alpha/2 (1 + cos(t pi / T_end)).
                value = CosineSchedule.Config(init=DEFAULT_DROP_FRACTION, final=0.0)
            elif value is None:
                value = DEFAULT_DROP_FRACTION
            try:
                return as_schedule_config(value).build(update)
            except ValueError as exc:
                raise ValueError(f"drop_fraction: {exc}") from None

        def build(self, named_shapes: Mapping[str, Sequence[int]]) -> Sparsity:
            return Sparsity(self, named_shapes)

    def __init__(self, config: Sparsity.Config, named_shapes: Mapping[str, Sequence[int]]) -> None:
        self.config = config
        self.params: dict[str, ParamSparsity] = select_parameters(config, named_shapes)
        self.algorithm = ALGORITHMS[config.algorithm]()
        self.update_schedule = config.update.build() if config.update is not None else None

    def is_update_step(self, step: int) -> bool:
        """True when the masks may change after applying step ``step``."""
        return self.update_schedule is not None and self.update_schedule.is_update_step(step)

    def needs_dense_gradients(self, step: int) -> bool:
        """True when step ``step``'s gradient must include pruned positions (RigL updates)."""
        return self.algorithm.needs_dense_gradients and self.is_update_step(step)

    def target_sparsity(self, name: str, step: int) -> float:
        return self.params[name].sparsity.value(step)

    def init_masks(self, weights: Mapping[str, Tensor], step: int = 0) -> dict[str, Tensor]:
        """First masks of the selected parameters among ``weights`` (any subset, e.g. a layer)."""
        masks = {}
        for name, weight in weights.items():
            param = self.params.get(name)
            if param is None:
                continue
            if tuple(weight.shape) != param.shape:
                raise ValueError(
                    f"parameter {name!r} has shape {tuple(weight.shape)}, but the sparsity was "
                    f"resolved for shape {param.shape}."
                )
            masks[name] = init_mask(
                weight,
                param.sparsity.value(step),
                param.init_method,
                generator=generator_for(param.seed, name, step),
                name=name,
            )
        return masks

    def update_masks(
        self,
        step: int,
        weights: Mapping[str, Tensor],
        grads: Mapping[str, Tensor],
        masks: Mapping[str, Tensor],
        *,
        grads_finite: bool,
    ) -> dict[str, Tensor]:
        """Masks to use from step ``step + 1``: changed only on update steps with finite grads."""
        if not self.is_update_step(step):
            return dict(masks)
        return self.algorithm.update(
            step, weights, grads, masks, params=self.params, grads_finite=grads_finite
        )


__all__ = ["DEFAULT_DROP_FRACTION", "GMP_INITIAL_SPARSITY", "ParamGroupConfig", "Sparsity"]
