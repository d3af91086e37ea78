"""PCM device physics: programming noise, conductance drift, read noise, drift compensation.

Every model follows the statistical fit of ~1M IBM PCM devices (Joshi et al., Nat. Commun.
11, 2473, 2020; the same fit drives aihwkit's ``PCMLikeNoiseModel``), as written out in
docs/hardware.md §3.2. Conductances are in uS; ``gh = g_target / g_max`` is
the normalised target. Time ``t_inference`` counts seconds after programming; the fit itself
measures time from the programming pulse, ``t = t_inference + t0``, so ``t_inference = 0``
means no drift yet.

Each effect is a strategy behind a small base class, with an ideal variant, so an ideal run
swaps strategies instead of branching inside the physics. All randomness goes through an
explicit ``torch.Generator``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from core.config import doc


def _check_interval(owner: str, name: str, interval: tuple[float, float]) -> None:
    low, high = interval
    if not low <= high:
        raise ValueError(
            f"{name} = {interval!r} is not valid for {owner}; the lower clip must not exceed the upper one."
        )


def _check_scale(owner: str, scale: float) -> None:
    if scale < 0:
        raise ValueError(
            f"scale = {scale} is not valid for {owner}; use a factor >= 0 (0 switches the effect off)."
        )


class ProgrammingNoise(ABC):
    """Where a device lands when programmed to ``g_target`` (program-and-verify residual)."""

    @dataclass(kw_only=True)
    class Config:
        kind: Literal["pcm", "none"] = doc(
            "'pcm' = published fit, 'none' = ideal programming", default="pcm"
        )
        scale: float = doc("multiplier on the fitted std, dimensionless", default=1.0)
        # docs/hardware.md §3.2 / Joshi et al. 2020: s_prog = c0 + c1 gh + c2 gh^2 (uS at g_max = 25 uS).
        coefficients: tuple[float, float, float] = doc(
            "s_prog polynomial c0, c1, c2 in gh, uS at g_max = fit_g_max",
            default=(0.26348, 1.9650, -1.1731),
        )
        fit_g_max: float = doc("g_max of the devices the fit was measured on, uS", default=25.0)

        def __post_init__(self) -> None:
            _check_scale("ProgrammingNoise", self.scale)
            if self.fit_g_max <= 0:
                raise ValueError(
                    f"fit_g_max = {self.fit_g_max} is not valid for ProgrammingNoise; use a conductance > 0 uS."
                )

        def build(self, g_max: float) -> ProgrammingNoise:
            if self.kind == "none":
                return NoProgrammingNoise()
            return PcmProgrammingNoise(self, g_max)

    @abstractmethod
    def program(self, g_target: Tensor, generator: torch.Generator) -> Tensor:
        """Programmed conductance (uS, >= 0) for each target conductance (uS)."""


class NoProgrammingNoise(ProgrammingNoise):
    def program(self, g_target: Tensor, generator: torch.Generator) -> Tensor:
        return g_target.clone()


class PcmProgrammingNoise(ProgrammingNoise):
    """g_prog = g_target + N(0, s_prog(gh)), clamped at 0 (a device cannot go negative)."""

    def __init__(self, config: ProgrammingNoise.Config, g_max: float) -> None:
        self.config = config
        self.g_max = g_max

    def std(self, g_target: Tensor) -> Tensor:
        c0, c1, c2 = self.config.coefficients
        gh = g_target / self.g_max
        return (
            self.config.scale * (c0 + c1 * gh + c2 * gh**2) * (self.g_max / self.config.fit_g_max)
        )

    def program(self, g_target: Tensor, generator: torch.Generator) -> Tensor:
        noise = torch.randn(g_target.shape, generator=generator, dtype=g_target.dtype)
        return (g_target + self.std(g_target) * noise).clamp(min=0.0)


class Drift(ABC):
    """Conductance relaxation g(t) = g_prog (t / t0)^(-nu) with one exponent nu per device."""

    @dataclass(kw_only=True)
    class Config:
        kind: Literal["pcm", "none"] = doc(
            "'pcm' = published fit, 'none' = no drift", default="pcm"
        )
        scale: float = doc("multiplier on every drift exponent, dimensionless", default=1.0)
        # docs/hardware.md §3.2 / Joshi et al. 2020: mu = clip(-0.0155 ln gh + 0.0244, 0.049, 0.1).
        mean_coefficients: tuple[float, float] = doc(
            "mu(gh) = a ln(gh) + b: (a, b), dimensionless", default=(-0.0155, 0.0244)
        )
        mean_clip: tuple[float, float] = doc("clip of mu, dimensionless", default=(0.049, 0.1))
        # docs/hardware.md §3.2 / Joshi et al. 2020: s = clip(-0.0125 ln gh - 0.0059, 0.008, 0.045).
        std_coefficients: tuple[float, float] = doc(
            "s(gh) = a ln(gh) + b: (a, b), dimensionless", default=(-0.0125, -0.0059)
        )
        std_clip: tuple[float, float] = doc("clip of s, dimensionless", default=(0.008, 0.045))

        def __post_init__(self) -> None:
            _check_scale("Drift", self.scale)
            _check_interval("Drift", "mean_clip", self.mean_clip)
            _check_interval("Drift", "std_clip", self.std_clip)
            if self.std_clip[0] < 0:
                raise ValueError(
                    f"std_clip = {self.std_clip!r} is not valid for Drift; a standard deviation must be >= 0."
                )

        def build(self, g_max: float, t0: float) -> Drift:
            if self.kind == "none":
                return NoDrift(t0)
            return PcmDrift(self, g_max, t0)

    def __init__(self, t0: float) -> None:
        self.t0 = t0

    @abstractmethod
    def sample_exponents(self, g_target: Tensor, generator: torch.Generator) -> Tensor:
        """One drift exponent per device, drawn once at programming time."""

    def apply(self, g_programmed: Tensor, exponents: Tensor, t_inference: float) -> Tensor:
        """Conductance ``t_inference`` seconds after programming (t = t_inference + t0)."""
        factor = ((t_inference + self.t0) / self.t0) ** (-exponents)
        return g_programmed * factor


class NoDrift(Drift):
    def sample_exponents(self, g_target: Tensor, generator: torch.Generator) -> Tensor:
        return torch.zeros_like(g_target)


class PcmDrift(Drift):
    """nu = |N(mu(gh), s(gh))|, mu and s clipped log-linear functions of gh."""

    def __init__(self, config: Drift.Config, g_max: float, t0: float) -> None:
        super().__init__(t0)
        self.config = config
        self.g_max = g_max

    def exponent_moments(self, g_target: Tensor) -> tuple[Tensor, Tensor]:
        """(mu, s) of the normal that nu is the absolute value of; gh = 0 takes the clip limit."""
        log_gh = torch.log(g_target / self.g_max)
        a_mu, b_mu = self.config.mean_coefficients
        a_s, b_s = self.config.std_coefficients
        mu = (a_mu * log_gh + b_mu).clamp(*self.config.mean_clip)
        s = (a_s * log_gh + b_s).clamp(*self.config.std_clip)
        return mu, s

    def sample_exponents(self, g_target: Tensor, generator: torch.Generator) -> Tensor:
        mu, s = self.exponent_moments(g_target)
        noise = torch.randn(g_target.shape, generator=generator, dtype=g_target.dtype)
        return self.config.scale * (mu + s * noise).abs()


class ReadNoise(ABC):
    """Accumulated 1/f noise seen when the array is read at time t."""

    @dataclass(kw_only=True)
    class Config:
        kind: Literal["pcm", "none"] = doc(
            "'pcm' = published fit, 'none' = noiseless reads", default="pcm"
        )
        scale: float = doc("multiplier on the fitted std, dimensionless", default=1.0)
        # docs/hardware.md §3.2; Nandakumar et al. ICECS 2019 as aihwkit's PCMLikeNoiseModel
        # implements it (docs/device_fidelity.md):
        # Qs = min(0.0088 / max(gh_prog^0.65, 1e-3), 0.2), gh_prog = |g_prog| / g_max.
        q_coefficient: float = doc("Qs numerator, dimensionless", default=0.0088)
        q_exponent: float = doc("Qs power of gh, dimensionless", default=0.65)
        q_max: float = doc("upper clip of Qs, dimensionless", default=0.2)
        q_power_floor: float = doc(
            "lower clip of gh^q_exponent before dividing, dimensionless (the fit's 1e-3)",
            default=1e-3,
        )
        t_read: float = doc("duration of one read, s (docs/hardware.md §3.2)", default=250e-9)

        def __post_init__(self) -> None:
            _check_scale("ReadNoise", self.scale)
            if self.t_read <= 0:
                raise ValueError(
                    f"t_read = {self.t_read} is not valid for ReadNoise; use a duration > 0 s."
                )
            if not self.q_power_floor > 0:
                raise ValueError(
                    f"q_power_floor = {self.q_power_floor} is not valid for ReadNoise; use a value > 0."
                )

        def build(self, g_max: float, t0: float) -> ReadNoise:
            if self.kind == "none":
                return NoReadNoise()
            return PcmReadNoise(self, g_max, t0)

    @abstractmethod
    def read(
        self,
        g_drifted: Tensor,
        g_programmed: Tensor,
        t_inference: float,
        generator: torch.Generator,
    ) -> Tensor:
        """Conductance (uS, >= 0) that one read of the array sees."""


class NoReadNoise(ReadNoise):
    def read(
        self,
        g_drifted: Tensor,
        g_programmed: Tensor,
        t_inference: float,
        generator: torch.Generator,
    ) -> Tensor:
        return g_drifted


class PcmReadNoise(ReadNoise):
    """sigma = |g(t)| Qs(gh_prog) sqrt(ln((t + t_read) / (2 t_read))), t = t_inference + t0.

    The 1/f magnitude Qs depends on the *programmed* conductance g_prog (after programming
    noise, before drift), not on the target: Nandakumar et al. 2019 as aihwkit's
    ``PCMLikeNoiseModel.apply_drift_noise_to_conductance`` implements it. At low targets the
    programming noise is large against g_target, so the two differ most there.
    """

    def __init__(self, config: ReadNoise.Config, g_max: float, t0: float) -> None:
        self.config = config
        self.g_max = g_max
        self.t0 = t0

    def q_s(self, g_programmed: Tensor) -> Tensor:
        c = self.config
        gh_power = ((g_programmed.abs() / self.g_max) ** c.q_exponent).clamp(min=c.q_power_floor)
        return (c.q_coefficient / gh_power).clamp(max=c.q_max)

    def time_factor(self, t_inference: float) -> float:
        t = t_inference + self.t0
        t_read = self.config.t_read
        return math.sqrt(math.log((t + t_read) / (2 * t_read)))

    def std(self, g_drifted: Tensor, g_programmed: Tensor, t_inference: float) -> Tensor:
        return (
            self.config.scale
            * g_drifted.abs()
            * self.q_s(g_programmed)
            * self.time_factor(t_inference)
        )

    def read(
        self,
        g_drifted: Tensor,
        g_programmed: Tensor,
        t_inference: float,
        generator: torch.Generator,
    ) -> Tensor:
        noise = torch.randn(g_drifted.shape, generator=generator, dtype=g_drifted.dtype)
        return (g_drifted + self.std(g_drifted, g_programmed, t_inference) * noise).clamp(min=0.0)


class DriftCompensation(ABC):
    """Digital output rescaling that undoes the average drift of a layer."""

    @dataclass(kw_only=True)
    class Config:
        kind: Literal["global", "none"] = doc(
            "'global' = one factor per layer from a reference read (docs/hardware.md §3.2), 'none' = off",
            default="global",
        )

        def build(self) -> DriftCompensation:
            if self.kind == "none":
                return NoDriftCompensation()
            return GlobalDriftCompensation()

    @abstractmethod
    def readout(self, read: Callable[[Tensor], Tensor], num_inputs: int) -> Tensor:
        """Scalar figure of the array's output magnitude; ``read`` maps x_KI to analog y_KO."""

    @staticmethod
    def output_scale(baseline: Tensor, readout: Tensor) -> Tensor:
        """Factor applied to the outputs: baseline (right after programming) over readout now."""
        tiny = torch.finfo(readout.dtype).tiny
        return baseline / readout.clamp(min=tiny)


class NoDriftCompensation(DriftCompensation):
    def readout(self, read: Callable[[Tensor], Tensor], num_inputs: int) -> Tensor:
        return torch.ones(())


class GlobalDriftCompensation(DriftCompensation):
    """alpha = mean |y| over reads with one-hot inputs (aihwkit GlobalDriftCompensation).

    One-hot inputs read every row on its own, so positive and negative weights cannot cancel
    in the sum and alpha tracks the mean weight magnitude.
    """

    def readout(self, read: Callable[[Tensor], Tensor], num_inputs: int) -> Tensor:
        return read(torch.eye(num_inputs)).abs().mean()


class PcmDevice:
    """The device model of one PCM chip: the four strategies sharing g_max and t0."""

    @dataclass(kw_only=True)
    class Config:
        g_max: float = doc(
            "conductance that max|W| maps to, uS (docs/hardware.md §3.2)", default=25.0
        )
        t0: float = doc(
            "time after programming at which drift is referenced, s (docs/hardware.md §3.2)",
            default=20.0,
        )
        programming_noise: ProgrammingNoise.Config = doc(
            "programming-noise model", default_factory=ProgrammingNoise.Config
        )
        drift: Drift.Config = doc("drift model", default_factory=Drift.Config)
        read_noise: ReadNoise.Config = doc(
            "read (1/f) noise model", default_factory=ReadNoise.Config
        )
        drift_compensation: DriftCompensation.Config = doc(
            "drift compensation", default_factory=DriftCompensation.Config
        )

        def __post_init__(self) -> None:
            if self.g_max <= 0:
                raise ValueError(
                    f"g_max = {self.g_max} is not valid for PcmDevice; use a conductance > 0 uS."
                )
            if self.t0 <= 0:
                raise ValueError(f"t0 = {self.t0} is not valid for PcmDevice; use a time > 0 s.")

        @classmethod
        def ideal(cls) -> PcmDevice.Config:
            """Devices that land exactly on target and never drift or fluctuate."""
            return cls(
                programming_noise=ProgrammingNoise.Config(kind="none"),
                drift=Drift.Config(kind="none"),
                read_noise=ReadNoise.Config(kind="none"),
                drift_compensation=DriftCompensation.Config(kind="none"),
            )

        def build(self) -> PcmDevice:
            return PcmDevice(self)

    def __init__(self, config: PcmDevice.Config) -> None:
        self.config = config
        self.g_max = config.g_max
        self.programming_noise = config.programming_noise.build(config.g_max)
        self.drift = config.drift.build(config.g_max, config.t0)
        self.read_noise = config.read_noise.build(config.g_max, config.t0)
        self.drift_compensation = config.drift_compensation.build()

    def program(self, g_target: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Programmed conductances and their drift exponents, both fixed from now on."""
        g_programmed = self.programming_noise.program(g_target, generator)
        exponents = self.drift.sample_exponents(g_target, generator)
        return g_programmed, exponents

    def read(
        self,
        g_target: Tensor,
        g_programmed: Tensor,
        exponents: Tensor,
        t_inference: float,
        generator: torch.Generator,
    ) -> Tensor:
        """Conductances one read sees ``t_inference`` seconds after programming."""
        check_drift_time(t_inference)
        g_drifted = self.drift.apply(g_programmed, exponents, t_inference)
        return self.read_noise.read(g_drifted, g_programmed, t_inference, generator)


def check_drift_time(t_inference: float) -> None:
    if t_inference < 0:
        raise ValueError(
            f"drift time t_inference = {t_inference} s is not valid; use a time >= 0 s after programming."
        )


__all__ = [
    "Drift",
    "DriftCompensation",
    "GlobalDriftCompensation",
    "NoDrift",
    "NoDriftCompensation",
    "NoProgrammingNoise",
    "NoReadNoise",
    "PcmDevice",
    "PcmDrift",
    "PcmProgrammingNoise",
    "PcmReadNoise",
    "ProgrammingNoise",
    "ReadNoise",
    "check_drift_time",
]
