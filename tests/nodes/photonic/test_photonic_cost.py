"""Cost model: calibration, prediction, time per MVM, reprogramming, GPU baseline."""

from __future__ import annotations

import dataclasses
import math

import pytest

from nodes.photonic.cost import (
    SPEED_OF_LIGHT_M_PER_S,
    Cost,
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
    power, efficiency = predictions(cost)
    assert power.published == 80.0 and efficiency.published == pytest.approx(65.5 / 80.0)
    # The prediction is what the model says, computed by hand here: 65.5 TOPS from 64 x 64 units.
    per_mvm = cost.mvm_energy_j(64, 64, num_unit_shifters(64))
    assert power.predicted == pytest.approx(65.5e12 / (2 * 64 * 64) * per_mvm)
    assert efficiency.relative_error == pytest.approx(
        efficiency.predicted / efficiency.published - 1
    )
    assert math.isfinite(power.relative_error)


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
