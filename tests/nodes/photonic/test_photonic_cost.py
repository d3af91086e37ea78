"""Cost model: calibration, prediction, time per MVM, reprogramming, GPU baseline."""

from __future__ import annotations

import dataclasses
import math

import pytest

from nodes.photonic.cost import (
    SPEED_OF_LIGHT_M_PER_S,
    Cost,
    PhaseShifter,
    PhotonicCost,
    TaichiReference,
    num_unit_shifters,
    predictions,
)


def model(**overrides) -> PhotonicCost:
    return dataclasses.replace(PhotonicCost.Config(), **overrides).build()


def test_calibration_reproduces_taichi_efficiency():
    cost = model()
    ref = cost.reference
    rc = ref.config
    energy = cost.mvm_energy_j(rc.num_inputs, rc.num_outputs, ref.num_shifters)
    assert Cost(1.0, energy, ref.ops_per_pass).tops_per_w == pytest.approx(160.82, rel=1e-12)
    assert cost.conversion_energy_j > 0


def test_calibrated_conversion_energy_follows_the_target():
    # Halving the target efficiency doubles the energy per pass; the static part stays.
    low, high = model(), model(calibration=TaichiReference.Config(tops_per_w=80.41))
    ref = low.reference
    per_pass = ref.ops_per_pass / 160.82e12
    conversions = ref.config.num_inputs + ref.config.num_outputs
    assert (high.conversion_energy_j - low.conversion_energy_j) * conversions == pytest.approx(
        per_pass
    )


def test_unreachable_calibration_is_rejected():
    with pytest.raises(ValueError, match="calibration.tops_per_w = 1000000.0 cannot be met"):
        model(calibration=TaichiReference.Config(tops_per_w=1e6))


def test_lightmatter_prediction_is_reported_with_its_error():
    cost = model()
    power, efficiency, thermal = predictions(cost)
    assert power.published == 80.0 and efficiency.published == pytest.approx(65.5 / 80.0)
    # The prediction is what the model says, computed by hand here: 65.5 TOPS from 64 x 64 units
    # holding their phases with MEMS shifters (Lightmatter's technology).
    mems = PhaseShifter.Config(technology="mems").build()
    per_mvm = cost.mvm_energy_j(64, 64, num_unit_shifters(64), mems)
    assert power.predicted == pytest.approx(65.5e12 / (2 * 64 * 64) * per_mvm)
    assert efficiency.relative_error == pytest.approx(
        efficiency.predicted / efficiency.published - 1
    )
    assert math.isfinite(power.relative_error)
    # Within 2x of the published ~80 W with MEMS; heaters would hold 8,320 x 20 mW per unit.
    assert 0.5 < power.predicted / power.published < 2.0
    heaters_w = 65.5e12 / (2 * 64 * 64) / 1e9 * num_unit_shifters(64) * 0.02
    assert thermal.predicted - power.predicted == pytest.approx(heaters_w, rel=1e-6)


def test_calibration_uses_taichis_own_shifters_whatever_the_engines():
    thermal = model()
    mems = model(phase_shifter=PhaseShifter.Config(technology="mems"))
    assert mems.conversion_energy_j == thermal.conversion_energy_j


@pytest.mark.parametrize(
    ("technology", "hold_w", "energy_j", "time_s"),
    [
        ("thermal", 0.02, 0.02 * 10e-6, 10e-6),
        ("mems", 1e-9, 1e-12, 1e-6),
        ("electro_optic", 0.0, 1e-13, 1e-9),
        ("phase_change", 0.0, 1e-9, 1e-6),
    ],
)
def test_phase_shifter_technologies_carry_their_figures(technology, hold_w, energy_j, time_s):
    shifter = PhaseShifter.Config(technology=technology).build()
    assert shifter.hold_power_per_pi_w == hold_w
    assert shifter.tuning_energy_per_pi_j == pytest.approx(energy_j)
    assert shifter.tuning_time_s == time_s
    # Holding and setting scale with the phase held or set (in units of pi).
    assert shifter.hold_power_w(3.0) == pytest.approx(3 * hold_w)
    assert shifter.tuning_energy_j(3.0) == pytest.approx(3 * energy_j)
    config = PhotonicCost.Config(phase_shifter=PhaseShifter.Config(technology=technology))
    # The legacy names price programming: power while settling x settling time = tuning energy.
    assert config.heater_power_per_pi_w * config.thermal_tuning_time_s == pytest.approx(energy_j)


def test_thermal_tuning_energy_follows_an_overridden_hold_power():
    shifter = PhaseShifter.Config(hold_power_per_pi_w=0.03, tuning_time_s=2e-6).build()
    assert shifter.tuning_energy_per_pi_j == pytest.approx(0.03 * 2e-6)
    given = PhaseShifter.Config(technology="mems", tuning_energy_per_pi_j=5e-12).build()
    assert given.tuning_energy_per_pi_j == 5e-12


def test_phase_change_shifters_hold_for_free_even_if_told_otherwise():
    shifter = PhaseShifter.Config(technology="phase_change", hold_power_per_pi_w=1.0).build()
    assert shifter.hold_power_w(100.0) == 0.0


def test_reprogramming_costs_the_technologys_time_and_energy():
    cost = model(phase_shifter=PhaseShifter.Config(technology="electro_optic"))
    resident = cost.matmul(256, 256, num_vectors=100, mesh_size=64, num_cores=16)
    streamed = cost.matmul(256, 256, num_vectors=100, mesh_size=64, num_cores=4)
    assert streamed.time_s == pytest.approx(4 * (100e-9 + 1e-9) + cost.latency_s(64))
    tuning_energy = 16 * num_unit_shifters(64) * 1e-13
    assert streamed.energy_j - resident.energy_j == pytest.approx(tuning_energy)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"technology": "steam"}, "phase_shifter.technology = 'steam' is not valid"),
        ({"hold_power_per_pi_w": -1.0}, r"phase_shifter.hold_power_per_pi_w = -1.0"),
        ({"tuning_energy_per_pi_j": -1.0}, r"phase_shifter.tuning_energy_per_pi_j = -1.0"),
        ({"tuning_time_s": 0.0}, r"phase_shifter.tuning_time_s = 0.0"),
    ],
)
def test_bad_phase_shifters_are_rejected(overrides, match):
    with pytest.raises(ValueError, match=match):
        PhaseShifter.Config(**overrides)


def test_time_per_mvm_is_one_clock_plus_latency():
    cost = model()
    one = cost.matmul(64, 64, num_vectors=1, mesh_size=64)
    latency = 129 * 300e-6 * 4.2 / SPEED_OF_LIGHT_M_PER_S
    assert one.time_s == pytest.approx(1e-9 + latency)
    many = cost.matmul(64, 64, num_vectors=1000, mesh_size=64)
    assert many.time_s == pytest.approx(1000e-9 + latency)
    assert many.energy_j == pytest.approx(1000 * one.energy_j)
    assert many.ops == 2 * 64 * 64 * 1000


def test_tiling_and_streaming_add_rounds_and_thermal_tuning():
    cost = model()
    # 256 x 256 on 64-meshes = 16 tiles; 16 cores hold them all, 4 cores stream 4 rounds.
    resident = cost.matmul(256, 256, num_vectors=100, mesh_size=64, num_cores=16)
    streamed = cost.matmul(256, 256, num_vectors=100, mesh_size=64, num_cores=4)
    assert resident.time_s == pytest.approx(100e-9 + cost.latency_s(64))
    assert streamed.time_s == pytest.approx(4 * (100e-9 + 10e-6) + cost.latency_s(64))
    tuning_energy = 16 * num_unit_shifters(64) * 0.02 * 10e-6
    assert streamed.energy_j - resident.energy_j == pytest.approx(tuning_energy)


def test_gpu_baseline_precision_is_a_parameter():
    work = Cost(1.0, 1.0, 10e12)  # 10 TOPS/W
    assert model().times_gpu(work) == pytest.approx(10 / (1979 / 700))
    assert model(gpu_precision="fp16").times_gpu(work) == pytest.approx(10 / (989 / 700))
    assert model(gpu_precision="fp32").times_gpu(work) == pytest.approx(10 / (67 / 700))


def test_bad_cost_inputs_are_rejected():
    with pytest.raises(ValueError, match="clock_hz = 0"):
        PhotonicCost.Config(clock_hz=0)
    with pytest.raises(ValueError, match="laser_wall_plug_efficiency = 1.5"):
        PhotonicCost.Config(laser_wall_plug_efficiency=1.5)
    with pytest.raises(ValueError, match="mesh_size = 0"):
        model().matmul(4, 4, num_vectors=1, mesh_size=0)
