"""The calibration a real photonic deployment performs, and the controller it leaves behind.

A fabricated MZI mesh is never used as drawn: before deployment its phase offsets, heater
gains and thermal crosstalk are *measured* (with limited accuracy: detector noise, finite
scan steps, drift between measurement and use) and the controller corrects for them. The
device then computes with the residual errors of the measurement, not the raw fabrication
errors (figures and sources: docs/device_fidelity.md).

``PhaseCalibration`` is that step as a strategy. Built against the hidden phase effects of
one heater array (``nonideal.PhaseEffect``: DAC, gain error, crosstalk, offset), it draws
one measurement of each error from a generator of its own and returns a ``PhaseController``
that maps the phases the user wants to the commands the heaters get, inverting the measured
chain: subtract the measured offset, undo the measured crosstalk, divide by the measured
gain. What the light then sees differs from the wanted phase by the measurement errors
(plus the DAC's rounding), which is what a calibrated chip shows. Two rare edge cases of the
DAC's [0, 2 pi) range stay: a heater with gain g < 1 cannot reach the top 2 pi (1 - g) of the
circle, and a drive that sits on the wrap point can leave its neighbours 2 pi x coupling off.

``PhaseController`` (identity) is what an uncalibrated device has. Neither needs a branch:
``PhotonicCore`` always runs its controller before its physical effects.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from core.config import doc
from nodes.photonic.nonideal import (
    TWO_PI,
    PhaseEffect,
    PhaseError,
    PhaseQuantization,
    ShifterGainError,
    ThermalCrosstalk,
)

#: Fixed-point sweeps that invert the tridiagonal crosstalk map; the residual after k sweeps
#: is (2 coupling)^(k+1) of the phase: < 1e-10 rad for coupling <= 0.05.
_CROSSTALK_SWEEPS = 8


def _require_non_negative(name: str, value: float) -> None:
    if not value >= 0:
        raise ValueError(f"{name} = {value!r} is not valid; it must be >= 0.")


class PhaseController:
    """Maps wanted phases to heater commands; the identity (an uncalibrated device)."""

    def command(self, wanted: Tensor) -> Tensor:
        return wanted


class CalibratedController(PhaseController):
    """Inverts the measured chain: offset, then crosstalk, then gain (reverse physical order)."""

    def __init__(
        self,
        offset_rad: Tensor | None,
        coupling: float | None,
        gain: Tensor | None,
        *,
        wraps: bool,
    ) -> None:
        self.offset_rad = offset_rad
        self.coupling = coupling
        self.gain = gain
        self.wraps = wraps

    def _wrap(self, phase: Tensor) -> Tensor:
        return torch.remainder(phase, TWO_PI) if self.wraps else phase

    def command(self, wanted: Tensor) -> Tensor:
        # With a DAC the heaters see wrapped phases ([0, 2 pi)) and crosstalk comes from the
        # neighbours' wrapped phases, so the inverse works on wrapped phases too.
        target = wanted if self.offset_rad is None else wanted - self.offset_rad.to(wanted.dtype)
        target = self._wrap(target)
        drive = target
        if self.coupling is not None and self.coupling != 0.0:
            # Solve x + k (left(x) + right(x)) = target (mod 2 pi with a DAC) row by row.
            for _ in range(_CROSSTALK_SWEEPS):
                padded = torch.nn.functional.pad(drive, (1, 1))
                drive = self._wrap(target - self.coupling * (padded[..., :-2] + padded[..., 2:]))
        return drive if self.gain is None else drive / self.gain.to(wanted.dtype)


class PhaseCalibration:
    """Measure each phase error of a heater array with limited accuracy; build its controller."""

    @dataclass(kw_only=True)
    class Config:
        phase_accuracy_rad: float = doc(
            "std of the measured phase offset about the true one, rad "
            "(docs/device_fidelity.md: phase encoding error of a calibrated mesh, Shen et al. 2017)",
            default=0.005,
        )
        gain_accuracy: float = doc(
            "std of the measured heater gain about the true one, fraction of it (assumed)",
            default=0.001,
        )
        crosstalk_accuracy: float = doc(
            "std of the measured crosstalk coupling about the true one, fraction of it "
            "(one coupling per array; assumed)",
            default=0.1,
        )

        def __post_init__(self) -> None:
            _require_non_negative("calibration.phase_accuracy_rad", self.phase_accuracy_rad)
            _require_non_negative("calibration.gain_accuracy", self.gain_accuracy)
            _require_non_negative("calibration.crosstalk_accuracy", self.crosstalk_accuracy)

        def build(
            self, effects: list[PhaseEffect], generator: torch.Generator
        ) -> CalibratedController:
            return PhaseCalibration(self).measure(effects, generator)

    def __init__(self, config: Config) -> None:
        self.config = config

    def measure(
        self, effects: list[PhaseEffect], generator: torch.Generator
    ) -> CalibratedController:
        """One measurement of every error in ``effects`` (the hidden truth), drawn from ``generator``."""
        c = self.config
        offset = coupling = gain = None
        for effect in effects:
            if isinstance(effect, PhaseError):
                error = c.phase_accuracy_rad * torch.randn(
                    effect.offset_rad.shape, generator=generator, dtype=torch.float64
                )
                offset = effect.offset_rad + error
            elif isinstance(effect, ShifterGainError):
                error = c.gain_accuracy * torch.randn(
                    effect.gain.shape, generator=generator, dtype=torch.float64
                )
                gain = effect.gain * (1.0 + error)
            elif isinstance(effect, ThermalCrosstalk):
                error = c.crosstalk_accuracy * torch.randn(
                    (), generator=generator, dtype=torch.float64
                )
                coupling = effect.coupling * (1.0 + error.item())
        # The controller knows its own DAC: whether the heaters wrap phases into [0, 2 pi).
        wraps = any(isinstance(effect, PhaseQuantization) for effect in effects)
        return CalibratedController(offset, coupling, gain, wraps=wraps)


def build_controllers(
    calibration: PhaseCalibration.Config | None,
    effects_per_array: list[list[PhaseEffect]],
    seed: int,
) -> list[PhaseController]:
    """One controller per heater array: measured ones when ``calibration`` is set, else identities.

    The measurement draws from a generator of its own (seeded from ``seed``), so a calibrated
    device keeps exactly the fabrication errors of the same device uncalibrated.
    """
    if calibration is None:
        return [PhaseController() for _ in effects_per_array]
    generator = torch.Generator().manual_seed(calibration_seed(seed))
    return [calibration.build(effects, generator) for effects in effects_per_array]


def calibration_seed(seed: int) -> int:
    """The measurement's seed for a device fabricated from ``seed`` (apart from every other stream)."""
    return seed + 7_000_003


__all__ = [
    "CalibratedController",
    "PhaseCalibration",
    "PhaseController",
    "build_controllers",
    "calibration_seed",
]
