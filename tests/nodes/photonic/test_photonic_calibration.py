"""Phase calibration: measured errors corrected by the controller, leaving the measurement's error.

Moment tests draw 100k shifters; the standard error of a sample std is std / sqrt(2 n) = 0.22%
of it, so the 2% tolerances are 9 standard errors wide. Every generator is seeded.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from nodes.photonic.calibration import (
    CalibratedController,
    PhaseCalibration,
    PhaseController,
    build_controllers,
)
from nodes.photonic.clements import svd_decompose
from nodes.photonic.nonideal import (
    TWO_PI,
    PhaseError,
    PhaseQuantization,
    ShifterGainError,
    ThermalCrosstalk,
)
from nodes.photonic.preset import load_preset

SHAPE = (200, 500)  # 200 rows of 500 neighbouring heaters


def fabricate(*configs, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [c.build(SHAPE, generator) for c in configs]


def wanted_phases(seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(SHAPE, generator=generator, dtype=torch.float64) * TWO_PI


def seen(controller: PhaseController, effects, wanted: torch.Tensor) -> torch.Tensor:
    phase = controller.command(wanted)
    for effect in effects:
        phase = effect.apply(phase)
    return phase


def wrapped_residual(actual: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    """actual - wanted taken into [-pi, pi): a phase is only defined modulo 2 pi."""
    return torch.remainder(actual - wanted + math.pi, TWO_PI) - math.pi


def test_offsets_are_corrected_to_the_measurement_accuracy():
    effects = fabricate(PhaseError.Config(sigma_rad=0.2))
    calibration = PhaseCalibration.Config(phase_accuracy_rad=0.01)
    (controller,) = build_controllers(calibration, [effects], seed=3)
    wanted = wanted_phases()
    residual = wrapped_residual(seen(controller, effects, wanted), wanted)
    raw = wrapped_residual(seen(PhaseController(), effects, wanted), wanted)
    assert residual.mean().item() == pytest.approx(0.0, abs=0.01 * 0.01)
    assert residual.std().item() == pytest.approx(0.01, rel=0.02)
    # The raw offsets: a 2-sigma-truncated normal of 0.2 rad, 0.88 of sigma.
    assert raw.std().item() == pytest.approx(0.2 * 0.8796, rel=0.02)


def test_gain_errors_are_corrected_to_the_measurement_accuracy():
    effects = fabricate(ShifterGainError.Config(sigma=0.01))
    calibration = PhaseCalibration.Config(gain_accuracy=0.001)
    (controller,) = build_controllers(calibration, [effects], seed=3)
    wanted = wanted_phases()
    ratio = seen(controller, effects, wanted) / wanted
    # actual = wanted g / (g (1 + e)) = wanted / (1 + e): relative error -e, std gain_accuracy.
    assert (ratio - 1).mean().item() == pytest.approx(0.0, abs=0.01 * 0.001)
    assert (ratio - 1).std().item() == pytest.approx(0.001, rel=0.02)


def test_exactly_measured_crosstalk_is_undone():
    effects = fabricate(ThermalCrosstalk.Config(coupling=0.02))
    exact = PhaseCalibration.Config(crosstalk_accuracy=0.0)
    (controller,) = build_controllers(exact, [effects], seed=3)
    wanted = wanted_phases()
    residual = wrapped_residual(seen(controller, effects, wanted), wanted)
    assert residual.abs().max().item() < 1e-9
    raw = wrapped_residual(seen(PhaseController(), effects, wanted), wanted)
    assert raw.abs().max().item() > 0.1  # two neighbours up to 2 pi each, times 0.02


def test_crosstalk_residual_scales_with_the_coupling_error():
    """A coupling measured 10% off leaves 10% of the crosstalk: k e (left + right)."""
    effects = fabricate(ThermalCrosstalk.Config(coupling=0.02))
    calibration = PhaseCalibration.Config(crosstalk_accuracy=0.1)
    (controller,) = build_controllers(calibration, [effects], seed=3)
    assert isinstance(controller, CalibratedController)
    relative_error = controller.coupling / 0.02 - 1
    wanted = wanted_phases()
    residual = wrapped_residual(seen(controller, effects, wanted), wanted)
    raw = wrapped_residual(seen(PhaseController(), effects, wanted), wanted)
    interior = (slice(None), slice(1, -1))
    ratio = residual[interior].std() / raw[interior].std()
    assert ratio.item() == pytest.approx(abs(relative_error), rel=0.05)


def test_full_chain_with_exact_measurements_leaves_only_the_dac():
    bits = 12
    effects = fabricate(
        PhaseQuantization.Config(bits=bits),
        ShifterGainError.Config(sigma=0.002),
        ThermalCrosstalk.Config(coupling=0.005),
        PhaseError.Config(sigma_rad=0.2),
    )
    exact = PhaseCalibration.Config(
        phase_accuracy_rad=0.0, gain_accuracy=0.0, crosstalk_accuracy=0.0
    )
    (controller,) = build_controllers(exact, [effects], seed=3)
    wanted = wanted_phases()
    residual = wrapped_residual(seen(controller, effects, wanted), wanted)
    step = TWO_PI / 2**bits
    outliers = residual.abs() > 2 * step
    # Rounding is uniform over a step (std step / sqrt(12)), seen through gain and crosstalk.
    assert residual[~outliers].std().item() == pytest.approx(step / math.sqrt(12), rel=0.05)
    # The DAC's range edge (see calibration.py) leaves rare outliers, each below
    # 2 pi (1 - g) + 2 pi x coupling for a 4-sigma gain.
    assert outliers.double().mean().item() < 0.005
    assert residual.abs().max().item() < TWO_PI * (4 * 0.002 + 0.005)


def test_measurements_are_seeded_and_apart_from_fabrication():
    effects = fabricate(PhaseError.Config(sigma_rad=0.2))
    calibration = PhaseCalibration.Config()
    (first,) = build_controllers(calibration, [effects], seed=3)
    (again,) = build_controllers(calibration, [effects], seed=3)
    (other,) = build_controllers(calibration, [effects], seed=4)
    assert torch.equal(first.offset_rad, again.offset_rad)
    assert not torch.equal(first.offset_rad, other.offset_rad)
    # An uncalibrated device gets identities: commands pass unchanged.
    (identity,) = build_controllers(None, [effects], seed=3)
    wanted = wanted_phases()
    assert identity.command(wanted) is wanted


def test_calibrated_and_uncalibrated_devices_share_their_fabrication_errors():
    calibrated = dataclasses.replace(load_preset("photonic_taichi"), mesh_size=8).build(5)
    raw = dataclasses.replace(load_preset("photonic_uncalibrated"), mesh_size=8).build(5)
    for mine, theirs in zip(calibrated._phase_effects, raw._phase_effects, strict=True):
        offsets = [e.offset_rad for e in mine if isinstance(e, PhaseError)]
        assert torch.equal(
            offsets[0], [e.offset_rad for e in theirs if isinstance(e, PhaseError)][0]
        )


def test_calibrated_device_computes_close_to_the_twin():
    w = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = torch.randn(32, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    errors = {}
    for preset in ("photonic_taichi", "photonic_uncalibrated"):
        config = dataclasses.replace(
            load_preset(preset), mesh_size=8, detection_noise=None, readout=None
        )
        device = config.build(5)
        device.program(svd_decompose(w, 8))
        reference = x @ w.T
        errors[preset] = ((device.matmul(x).real - reference).norm() / reference.norm()).item()
    assert errors["photonic_uncalibrated"] > 0.05
    assert errors["photonic_taichi"] < 0.05
    assert errors["photonic_taichi"] < errors["photonic_uncalibrated"] / 5


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"phase_accuracy_rad": -0.1}, r"calibration.phase_accuracy_rad = -0.1"),
        ({"gain_accuracy": -1.0}, r"calibration.gain_accuracy = -1.0"),
        ({"crosstalk_accuracy": float("nan")}, r"calibration.crosstalk_accuracy = nan"),
    ],
)
def test_bad_calibration_is_rejected(overrides, match):
    with pytest.raises(ValueError, match=match):
        PhaseCalibration.Config(**overrides)
