"""The photonic preset file loads, and its numbers are the dataclass defaults."""

from __future__ import annotations

import dataclasses

import pytest

from nodes.photonic.calibration import PhaseCalibration
from nodes.photonic.cost import PhotonicCost
from nodes.photonic.nonideal import (
    DetectionNoise,
    InsertionLoss,
    PhaseError,
    PhaseQuantization,
    Readout,
    ShifterGainError,
    SplitterImbalance,
    ThermalCrosstalk,
)
from nodes.photonic.preset import PRESET_DIR, load_preset


def test_preset_sections_equal_the_documented_defaults():
    device = load_preset("photonic_taichi")
    assert device.mesh_size == 64
    assert device.phase_quantization == PhaseQuantization.Config()
    assert device.phase_error == PhaseError.Config()
    assert device.gain_error == ShifterGainError.Config()
    assert device.crosstalk == ThermalCrosstalk.Config()
    assert device.insertion_loss == InsertionLoss.Config()
    assert device.detection_noise == DetectionNoise.Config()
    assert device.readout == Readout.Config()
    assert device.splitter_imbalance == SplitterImbalance.Config()
    assert device.calibration == PhaseCalibration.Config()
    assert device.cost == PhotonicCost.Config()


def test_uncalibrated_preset_is_the_default_device_without_calibration():
    calibrated = load_preset("photonic_taichi")
    uncalibrated = load_preset("photonic_uncalibrated")
    assert uncalibrated.calibration is None
    assert dataclasses.replace(calibrated, calibration=None) == uncalibrated


def test_twin_keeps_size_and_cost_but_no_errors():
    twin = load_preset().twin()
    assert twin.mesh_size == 64 and twin.cost == PhotonicCost.Config()
    assert twin.phase_error is None and twin.insertion_loss is None and twin.readout is None
    assert twin.calibration is None


def test_bad_presets_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="Unknown photonic preset 'nope'"):
        load_preset("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        (PRESET_DIR / "photonic_taichi.yaml").read_text().replace("loss_db: 0.2", "loss_db: -0.2")
    )
    with pytest.raises(ValueError, match="insertion_loss.loss_db = -0.2"):
        load_preset(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("device:\n  mesh_sise: 8\n")
    with pytest.raises(ValueError, match="Unknown config key device.mesh_sise"):
        load_preset(typo)


def test_null_sections_switch_an_error_off(tmp_path):
    path = tmp_path / "clean.yaml"
    path.write_text("device:\n  mesh_size: 8\n  phase_error: null\n  readout: {bits: 10}\n")
    device = load_preset(path)
    assert device.mesh_size == 8 and device.phase_error is None
    assert device.readout == Readout.Config(bits=10)
