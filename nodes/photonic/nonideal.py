"""Non-idealities of a photonic MZI engine, each a strategy object (docs/hardware.md §4.4).

Two places in the signal chain take them:

- ``PhaseEffect``: between the phase a controller commands and the phase the
  light sees. The physical order is DAC quantization, heater gain error,
  thermal crosstalk from neighbouring heaters, then the fixed fabrication
  phase offset. Per-device errors are drawn once at ``build`` from the
  device's generator and then stay fixed (they are the device).
- ``OutputEffect``: between the field at the detectors and the number the
  readout reports: detection noise (fresh on every read), then limited-bit
  quantization.

``InsertionLoss`` sits in between: a per-MZI amplitude transmission applied
inside the mesh, so loss compounds with the optical depth.

Phase tensors keep their physical layout: the last axis is a row of
neighbouring heaters (a mesh column, a screen, the attenuator column).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

from core.config import doc

TWO_PI = 2.0 * math.pi
#: Boltzmann constant, J/K (SI exact, CODATA 2018).
BOLTZMANN_J_PER_K = 1.380649e-23
#: Elementary charge, C (SI exact, CODATA 2018).
ELEMENTARY_CHARGE_C = 1.602176634e-19


def _require_non_negative(name: str, value: float) -> None:
    if not value >= 0:
        raise ValueError(f"{name} = {value!r} is not valid; it must be >= 0.")


def _require_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} = {value!r} is not valid; it must be greater than 0.")


def _require_bits(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name} = {value!r} is not valid; it must be at least 1 bit.")


class PhaseEffect(ABC):
    """Maps commanded phases (rad) to the phases the light sees, same shape."""

    @abstractmethod
    def apply(self, phase: Tensor) -> Tensor: ...


class PhaseQuantization(PhaseEffect):
    """The heater DAC: phases wrap into [0, 2 pi) and snap to 2^bits levels.

    The rounding passes gradients straight through so a twin with a
    quantizing DAC can still be trained by autograd.
    """

    @dataclass(kw_only=True)
    class Config:
        bits: int = doc("heater DAC resolution over [0, 2 pi), bits", default=12)

        def __post_init__(self) -> None:
            _require_bits("phase_bits", self.bits)

        def build(self, shape: tuple[int, ...], generator: torch.Generator) -> PhaseQuantization:
            return PhaseQuantization(self)

    def __init__(self, config: Config) -> None:
        self.step_rad = TWO_PI / 2**config.bits

    def apply(self, phase: Tensor) -> Tensor:
        wrapped = torch.remainder(phase, TWO_PI)
        snapped = torch.remainder(torch.round(wrapped / self.step_rad) * self.step_rad, TWO_PI)
        return wrapped + (snapped - wrapped).detach()


def truncated_normal(
    shape: tuple[int, ...], sigma: float, truncate_at: float, generator: torch.Generator
) -> Tensor:
    """N(0, sigma^2) restricted to [-truncate_at sigma, truncate_at sigma], by inverse CDF."""
    normal = torch.distributions.Normal(0.0, 1.0)
    edge = normal.cdf(torch.tensor(truncate_at, dtype=torch.float64)).item()
    u = torch.rand(shape, generator=generator, dtype=torch.float64) * (2 * edge - 1) + (1 - edge)
    return sigma * torch.special.ndtri(u)


class PhaseError(PhaseEffect):
    """Fixed per-shifter fabrication phase offsets, Gaussian truncated at +-2 sigma."""

    @dataclass(kw_only=True)
    class Config:
        sigma_rad: float = doc(
            "std of the untruncated Gaussian offset, rad (assumed: residual after coarse calibration)",
            default=0.2,
        )
        truncate_at_sigmas: float = doc(
            "offsets beyond this many sigma are redrawn, sigmas (docs/hardware.md §4.4: 2)",
            default=2.0,
        )

        def __post_init__(self) -> None:
            _require_non_negative("phase_error.sigma_rad", self.sigma_rad)
            _require_positive("phase_error.truncate_at_sigmas", self.truncate_at_sigmas)

        def build(self, shape: tuple[int, ...], generator: torch.Generator) -> PhaseError:
            offset = truncated_normal(shape, self.sigma_rad, self.truncate_at_sigmas, generator)
            return PhaseError(offset)

    def __init__(self, offset_rad: Tensor) -> None:
        self.offset_rad = offset_rad

    def apply(self, phase: Tensor) -> Tensor:
        return phase + self.offset_rad.to(phase.dtype)


class ShifterGainError(PhaseEffect):
    """Each heater's phase-per-power differs from nominal by a fixed relative error."""

    @dataclass(kw_only=True)
    class Config:
        sigma: float = doc("std of the relative heater gain error, fraction", default=0.002)

        def __post_init__(self) -> None:
            _require_non_negative("gain_error.sigma", self.sigma)

        def build(self, shape: tuple[int, ...], generator: torch.Generator) -> ShifterGainError:
            gain = 1.0 + self.sigma * torch.randn(shape, generator=generator, dtype=torch.float64)
            return ShifterGainError(gain)

    def __init__(self, gain: Tensor) -> None:
        self.gain = gain

    def apply(self, phase: Tensor) -> Tensor:
        return phase * self.gain.to(phase.dtype)


class ThermalCrosstalk(PhaseEffect):
    """Heat from the two neighbouring heaters of a row adds ``coupling`` times their phase."""

    @dataclass(kw_only=True)
    class Config:
        coupling: float = doc(
            "phase picked up per rad of a neighbouring heater, rad/rad", default=0.005
        )

        def __post_init__(self) -> None:
            _require_non_negative("crosstalk.coupling", self.coupling)

        def build(self, shape: tuple[int, ...], generator: torch.Generator) -> ThermalCrosstalk:
            return ThermalCrosstalk(self)

    def __init__(self, config: Config) -> None:
        self.coupling = config.coupling

    def apply(self, phase: Tensor) -> Tensor:
        padded = torch.nn.functional.pad(phase, (1, 1))
        return phase + self.coupling * (padded[..., :-2] + padded[..., 2:])


class InsertionLoss:
    """Per-MZI insertion loss in dB, with a fixed per-device spread; returns amplitude transmissions."""

    @dataclass(kw_only=True)
    class Config:
        loss_db: float = doc(
            "mean insertion loss per MZI, dB (docs/hardware.md §4.4: 0.1-0.5)", default=0.2
        )
        sigma_db: float = doc("per-MZI fabrication spread of the loss, dB", default=0.02)

        def __post_init__(self) -> None:
            _require_non_negative("insertion_loss.loss_db", self.loss_db)
            _require_non_negative("insertion_loss.sigma_db", self.sigma_db)

        def build(self, shape: tuple[int, ...], generator: torch.Generator) -> InsertionLoss:
            spread = self.sigma_db * torch.randn(shape, generator=generator, dtype=torch.float64)
            return InsertionLoss(self, (self.loss_db + spread).clamp(min=0.0))

    def __init__(self, config: Config, loss_db: Tensor) -> None:
        self.nominal_loss_db = config.loss_db
        self.loss_db = loss_db

    @property
    def amplitude(self) -> Tensor:
        return 10.0 ** (-self.loss_db / 20.0)

    def nominal_amplitude(self, num_mzis: int) -> float:
        """Field transmission of a path crossing ``num_mzis`` nominal MZIs."""
        return 10.0 ** (-self.nominal_loss_db * num_mzis / 20.0)


class SplitterImbalance:
    """Fixed per-coupler splitting errors: each nominally 50:50 coupler splits at pi/4 + error.

    Two couplers per MZI, drawn once per device. A phase cannot undo them (the MZI's
    extinction is limited), so calibration leaves them in place.
    """

    @dataclass(kw_only=True)
    class Config:
        sigma_rad: float = doc(
            "std of each coupler's splitting-angle error about pi/4, rad; the power split is "
            "(1 -+ sin(2 error)) / 2, so 0.02 rad is 48:52 (docs/device_fidelity.md)",
            default=0.02,
        )

        def __post_init__(self) -> None:
            _require_non_negative("splitter_imbalance.sigma_rad", self.sigma_rad)

        def build(self, shape: tuple[int, ...], generator: torch.Generator) -> SplitterImbalance:
            """Errors of the two couplers of each of ``shape`` MZIs: ``[*shape, 2]``."""
            error = self.sigma_rad * torch.randn(
                (*shape, 2), generator=generator, dtype=torch.float64
            )
            return SplitterImbalance(error)

    def __init__(self, error_rad: Tensor) -> None:
        self.error_rad = error_rad


class OutputEffect(ABC):
    """Maps the complex field at the detectors (unit = one full-power input) to what is read."""

    @abstractmethod
    def apply(self, signal: Tensor) -> Tensor: ...


class DetectionNoise(OutputEffect):
    """Thermal (4kTB/R) and shot (2q(I + I_dark)B) current noise of coherent I/Q detection.

    A unit-amplitude field quadrature gives a photocurrent of responsivity x
    full-scale power; the noise is added to that current and converted back.
    Fresh noise is drawn on every read from the device's own generator.
    """

    @dataclass(kw_only=True)
    class Config:
        responsivity_a_per_w: float = doc("photodiode responsivity, A/W", default=1.0)
        full_scale_power_w: float = doc(
            "optical power of a unit-amplitude channel, W", default=1e-3
        )
        bandwidth_hz: float = doc("detection bandwidth, Hz", default=1e9)
        load_resistance_ohm: float = doc("load / transimpedance resistance, ohm", default=1e3)
        temperature_k: float = doc("receiver temperature, K", default=300.0)
        dark_current_a: float = doc("photodiode dark current, A", default=1e-8)

        def __post_init__(self) -> None:
            for name in (
                "responsivity_a_per_w",
                "full_scale_power_w",
                "bandwidth_hz",
                "load_resistance_ohm",
                "temperature_k",
            ):
                _require_positive(f"detection_noise.{name}", getattr(self, name))
            _require_non_negative("detection_noise.dark_current_a", self.dark_current_a)

        def build(self, generator: torch.Generator) -> DetectionNoise:
            return DetectionNoise(self, generator)

    def __init__(self, config: Config, generator: torch.Generator) -> None:
        self.config = config
        self.generator = generator
        self.current_per_unit_a = config.responsivity_a_per_w * config.full_scale_power_w

    def current_std_a(self, current_a: Tensor) -> Tensor:
        c = self.config
        thermal = 4 * BOLTZMANN_J_PER_K * c.temperature_k * c.bandwidth_hz / c.load_resistance_ohm
        shot = 2 * ELEMENTARY_CHARGE_C * (current_a.abs() + c.dark_current_a) * c.bandwidth_hz
        return torch.sqrt(thermal + shot)

    def _noisy(self, quadrature: Tensor) -> Tensor:
        current = quadrature * self.current_per_unit_a
        noise = torch.randn(
            quadrature.shape, generator=self.generator, dtype=quadrature.dtype
        ) * self.current_std_a(current.detach())
        return (current + noise) / self.current_per_unit_a

    def apply(self, signal: Tensor) -> Tensor:
        if signal.is_complex():
            return torch.complex(self._noisy(signal.real), self._noisy(signal.imag))
        return self._noisy(signal)


class Readout(OutputEffect):
    """A bits-limited ADC per quadrature over [-full_scale, full_scale] (clipping outside)."""

    @dataclass(kw_only=True)
    class Config:
        bits: int = doc("ADC resolution per quadrature, bits", default=8)
        full_scale: float = doc(
            "clipping level, in units of a full-power channel amplitude", default=1.0
        )

        def __post_init__(self) -> None:
            _require_bits("readout.bits", self.bits)
            _require_positive("readout.full_scale", self.full_scale)

        def build(self, generator: torch.Generator) -> Readout:
            return Readout(self)

    def __init__(self, config: Config) -> None:
        self.full_scale = config.full_scale
        self.step = 2 * config.full_scale / 2**config.bits

    def _quantize(self, value: Tensor) -> Tensor:
        clipped = value.clamp(-self.full_scale, self.full_scale)
        snapped = (torch.round(clipped / self.step) * self.step).clamp(
            -self.full_scale, self.full_scale
        )
        return clipped + (snapped - clipped).detach()

    def apply(self, signal: Tensor) -> Tensor:
        if signal.is_complex():
            return torch.complex(self._quantize(signal.real), self._quantize(signal.imag))
        return self._quantize(signal)
