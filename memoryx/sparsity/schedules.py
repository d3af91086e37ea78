"""Step schedules of sparsity hyperparameters, and when masks update.

A ``Schedule`` maps a training step (0-based, the step whose gradient MemoryX
has just applied) to a value: the target sparsity of a parameter, or the
fraction of its surviving weights that SET/RigL drop. Each kind is a class with
a nested ``Config`` whose ``kind`` names it (``Schedule.Config.variants()``), so
YAML selects one with ``{kind: power, init: 0.0, final: 0.9}``.

Ramps (linear, power, cosine) run from ``begin`` to ``end``; left unset, those
default to the update schedule's ``start`` and ``stop``, which is how Zhu &
Gupta (2017) tie the pruning ramp to the pruning steps and Evci et al. (2020)
tie RigL's drop-fraction decay to ``T_end``.

``UpdateSchedule`` is the ``{freq, start, stop}`` of dynamic algorithms: a step
updates the mask when ``start <= step < stop`` and ``(step - start) % freq == 0``
(the vendor's ``FreqSchedule`` semantics).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Literal

from core.config import doc


class UpdateSchedule:
    """The steps on which a dynamic algorithm updates its masks."""

    @dataclass(kw_only=True)
    class Config:
        freq: int = doc("steps between mask updates, steps")
        start: int = doc("first step that may update the mask, step index", default=0)
        stop: int | None = doc(
            "updates happen on steps before this one, step index (None: never stop)",
            default=None,
        )

        def __post_init__(self) -> None:
            if self.freq < 1:
                raise ValueError(f"freq = {self.freq} must be at least 1 step.")
            if self.start < 0:
                raise ValueError(f"start = {self.start} must be a step index >= 0.")
            if self.stop is not None and self.stop <= self.start:
                raise ValueError(
                    f"stop = {self.stop} must be greater than start = {self.start} "
                    "(or None to keep updating)."
                )

        def build(self) -> UpdateSchedule:
            return UpdateSchedule(self)

    def __init__(self, config: UpdateSchedule.Config) -> None:
        self.config = config

    def is_update_step(self, step: int) -> bool:
        cfg = self.config
        if step < cfg.start or (cfg.stop is not None and step >= cfg.stop):
            return False
        return (step - cfg.start) % cfg.freq == 0

    def update_steps(self, num_steps: int) -> list[int]:
        """Update steps among ``0 .. num_steps - 1``."""
        return [step for step in range(num_steps) if self.is_update_step(step)]


class Schedule(ABC):
    """A hyperparameter as a function of the training step."""

    @dataclass(kw_only=True)
    class Config:
        kind: str
        default_kind: ClassVar[str] = "constant"

        @classmethod
        def variants(cls) -> dict[str, type[Schedule.Config]]:
            return {schedule.Config.kind_name(): schedule.Config for schedule in SCHEDULES}

        @classmethod
        def kind_name(cls) -> str:
            return cls.__dataclass_fields__["kind"].default

        def value_range(self) -> tuple[float, float]:
            """Smallest and largest value the schedule can take, at any step."""
            raise NotImplementedError

        def is_non_decreasing(self) -> bool:
            lowest, highest = self.value_range()
            return lowest == highest

        def needs_end(self) -> bool:
            """True when the schedule needs an ``end`` step (its own, or the update's stop)."""
            return False

        def build(self, update: UpdateSchedule.Config | None = None) -> Schedule:
            """The schedule, with ``begin``/``end`` left unset taken from ``update``."""
            raise NotImplementedError

    @abstractmethod
    def value(self, step: int) -> float:
        """The value at training step ``step``."""


def _window(
    name: str, begin: int | None, end: int | None, update: UpdateSchedule.Config | None
) -> tuple[int, int | None]:
    begin = begin if begin is not None else (update.start if update is not None else 0)
    end = end if end is not None else (update.stop if update is not None else None)
    if end is not None and end <= begin:
        raise ValueError(f"a {name} schedule needs end > begin, got begin = {begin}, end = {end}.")
    return begin, end


class _RampConfig(Schedule.Config):
    """Fields shared by schedules that move from ``init`` to ``final`` over [begin, end]."""

    def __post_init__(self) -> None:
        if self.begin is not None and self.begin < 0:
            raise ValueError(f"begin = {self.begin} must be a step index >= 0 (or None).")
        if self.begin is not None and self.end is not None and self.end <= self.begin:
            raise ValueError(f"end = {self.end} must be greater than begin = {self.begin}.")

    def value_range(self) -> tuple[float, float]:
        return min(self.init, self.final), max(self.init, self.final)

    def is_non_decreasing(self) -> bool:
        return self.final >= self.init

    def needs_end(self) -> bool:
        return True

    def _resolve(self, update: UpdateSchedule.Config | None) -> tuple[int, int]:
        begin, end = _window(self.kind, self.begin, self.end, update)
        if end is None:
            raise ValueError(
                f"a {self.kind} schedule needs an end step: set its end, "
                "or the update schedule's stop."
            )
        return begin, end


def _progress(step: int, begin: int, end: int) -> float:
    return min(max((step - begin) / (end - begin), 0.0), 1.0)


class ConstantSchedule(Schedule):
    @dataclass(kw_only=True)
    class Config(Schedule.Config):
        kind: Literal["constant"] = doc(
            "schedule: the same value at every step", default="constant"
        )
        value: float = doc("the value, in the hyperparameter's unit")

        def value_range(self) -> tuple[float, float]:
            return self.value, self.value

        def build(self, update: UpdateSchedule.Config | None = None) -> ConstantSchedule:
            return ConstantSchedule(self.value)

    def __init__(self, value: float) -> None:
        self.constant = value

    def value(self, step: int) -> float:
        return self.constant


class LinearSchedule(Schedule):
    @dataclass(kw_only=True)
    class Config(_RampConfig):
        kind: Literal["linear"] = doc(
            "schedule: straight line from init to final", default="linear"
        )
        init: float = doc("value at begin and before, hyperparameter unit")
        final: float = doc("value at end and after, hyperparameter unit")
        begin: int | None = doc("step the ramp starts (None: update.start), step", default=None)
        end: int | None = doc("step the ramp ends (None: update.stop), step", default=None)

        def build(self, update: UpdateSchedule.Config | None = None) -> LinearSchedule:
            return LinearSchedule(self, *self._resolve(update))

    def __init__(self, config: LinearSchedule.Config, begin: int, end: int) -> None:
        self.config, self.begin, self.end = config, begin, end

    def value(self, step: int) -> float:
        cfg = self.config
        return cfg.init + (cfg.final - cfg.init) * _progress(step, self.begin, self.end)


class PowerSchedule(Schedule):
    """Zhu & Gupta (2017), eq. 1: ``s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3``."""

    @dataclass(kw_only=True)
    class Config(_RampConfig):
        kind: Literal["power"] = doc(
            "schedule: polynomial ramp, fast first and flat at the end (GMP)", default="power"
        )
        init: float = doc("value at begin and before, hyperparameter unit")
        final: float = doc("value at end and after, hyperparameter unit")
        begin: int | None = doc("step the ramp starts (None: update.start), step", default=None)
        end: int | None = doc("step the ramp ends (None: update.stop), step", default=None)
        # Zhu & Gupta 2017, "To prune, or not to prune", eq. 1: cubic.
        exponent: float = doc("power of the remaining fraction, dimensionless", default=3.0)

        def __post_init__(self) -> None:
            super().__post_init__()
            if not self.exponent > 0:
                raise ValueError(f"exponent = {self.exponent} must be > 0 (3 is the GMP cubic).")

        def build(self, update: UpdateSchedule.Config | None = None) -> PowerSchedule:
            return PowerSchedule(self, *self._resolve(update))

    def __init__(self, config: PowerSchedule.Config, begin: int, end: int) -> None:
        self.config, self.begin, self.end = config, begin, end

    def value(self, step: int) -> float:
        cfg = self.config
        remaining = 1.0 - _progress(step, self.begin, self.end)
        return cfg.final + (cfg.init - cfg.final) * remaining**cfg.exponent


class CosineSchedule(Schedule):
    """Half a cosine from init to final: RigL's drop-fraction decay (Evci et al. 2020, eq. 1)."""

    @dataclass(kw_only=True)
    class Config(_RampConfig):
        kind: Literal["cosine"] = doc(
            "schedule: half cosine from init to final (RigL's drop-fraction decay)",
            default="cosine",
        )
        init: float = doc("value at begin and before, hyperparameter unit")
        final: float = doc("value at end and after, hyperparameter unit", default=0.0)
        begin: int | None = doc("step the ramp starts (None: update.start), step", default=None)
        end: int | None = doc("step the ramp ends (None: update.stop), step", default=None)

        def build(self, update: UpdateSchedule.Config | None = None) -> CosineSchedule:
            return CosineSchedule(self, *self._resolve(update))

    def __init__(self, config: CosineSchedule.Config, begin: int, end: int) -> None:
        self.config, self.begin, self.end = config, begin, end

    def value(self, step: int) -> float:
        cfg = self.config
        progress = _progress(step, self.begin, self.end)
        return cfg.final + (cfg.init - cfg.final) * 0.5 * (1.0 + math.cos(math.pi * progress))


class ExpSchedule(Schedule):
    """Exponential approach from init towards final, with no end step."""

    @dataclass(kw_only=True)
    class Config(Schedule.Config):
        kind: Literal["exp"] = doc(
            "schedule: exponential approach from init to final", default="exp"
        )
        init: float = doc("value at begin and before, hyperparameter unit")
        final: float = doc("value approached as steps go on, hyperparameter unit")
        decay_steps: float = doc("steps for the gap to final to shrink by e, steps")
        begin: int | None = doc("step the approach starts (None: update.start), step", default=None)

        def __post_init__(self) -> None:
            if not self.decay_steps > 0:
                raise ValueError(f"decay_steps = {self.decay_steps} must be > 0 steps.")
            if self.begin is not None and self.begin < 0:
                raise ValueError(f"begin = {self.begin} must be a step index >= 0 (or None).")

        def value_range(self) -> tuple[float, float]:
            return min(self.init, self.final), max(self.init, self.final)

        def is_non_decreasing(self) -> bool:
            return self.final >= self.init

        def build(self, update: UpdateSchedule.Config | None = None) -> ExpSchedule:
            begin, _ = _window(self.kind, self.begin, None, update)
            return ExpSchedule(self, begin)

    def __init__(self, config: ExpSchedule.Config, begin: int) -> None:
        self.config, self.begin = config, begin

    def value(self, step: int) -> float:
        cfg = self.config
        elapsed = max(step - self.begin, 0)
        return cfg.final + (cfg.init - cfg.final) * math.exp(-elapsed / cfg.decay_steps)


class CyclingSchedule(Schedule):
    """Steps through ``values`` in turn, one every ``period`` steps, then starts over."""

    @dataclass(kw_only=True)
    class Config(Schedule.Config):
        kind: Literal["cycling"] = doc(
            "schedule: cycle through a list of values", default="cycling"
        )
        values: list[float] = doc("values in turn, hyperparameter unit", default_factory=list)
        period: int | None = doc(
            "steps each value holds (None: update.freq, one value per mask update), steps",
            default=None,
        )
        begin: int | None = doc("step of the first value (None: update.start), step", default=None)

        def __post_init__(self) -> None:
            if not self.values:
                raise ValueError("values must list at least one value to cycle through, got [].")
            if self.period is not None and self.period < 1:
                raise ValueError(f"period = {self.period} must be at least 1 step (or None).")
            if self.begin is not None and self.begin < 0:
                raise ValueError(f"begin = {self.begin} must be a step index >= 0 (or None).")

        def value_range(self) -> tuple[float, float]:
            return min(self.values), max(self.values)

        def build(self, update: UpdateSchedule.Config | None = None) -> CyclingSchedule:
            begin, _ = _window(self.kind, self.begin, None, update)
            period = self.period if self.period is not None else (update.freq if update else 1)
            return CyclingSchedule(list(self.values), period, begin)

    def __init__(self, values: list[float], period: int, begin: int) -> None:
        self.values, self.period, self.begin = values, period, begin

    def value(self, step: int) -> float:
        index = max(step - self.begin, 0) // self.period
        return self.values[index % len(self.values)]


SCHEDULES: tuple[type[Schedule], ...] = (
    ConstantSchedule,
    LinearSchedule,
    PowerSchedule,
    CosineSchedule,
    ExpSchedule,
    CyclingSchedule,
)

#: A hyperparameter given as a plain number (constant) or as a schedule.
Scheduled = float | Schedule.Config


def as_schedule_config(value: Scheduled) -> Schedule.Config:
    if isinstance(value, Schedule.Config):
        return value
    return ConstantSchedule.Config(value=value)


__all__ = [
    "SCHEDULES",
    "ConstantSchedule",
    "CosineSchedule",
    "CyclingSchedule",
    "ExpSchedule",
    "LinearSchedule",
    "PowerSchedule",
    "Schedule",
    "Scheduled",
    "UpdateSchedule",
    "as_schedule_config",
]
