"""The physical device against its digital twin."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from nodes.photonic.clements import svd_decompose, tile_matrix
from nodes.photonic.device import PhotonicCore, TiledEngine
from nodes.photonic.nonideal import (
    InsertionLoss,
    PhaseError,
    PhaseQuantization,
    Readout,
    ShifterGainError,
    ThermalCrosstalk,
)
from nodes.photonic.preset import load_preset

EXACT = 1e-9


def physical(mesh_size: int = 8) -> PhotonicCore.Config:
    """The raw device, its fabrication errors uncorrected (test_photonic_calibration.py: corrected)."""
    return dataclasses.replace(load_preset("photonic_uncalibrated"), mesh_size=mesh_size)


def weights(seed: int = 0, shape=(6, 5)) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def inputs(seed: int = 1, n: int = 5) -> torch.Tensor:
    return torch.randn(32, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def test_twin_computes_exactly_w_x_on_a_larger_mesh():
    w, x = weights(), inputs()
    twin = physical().twin().build(seed=0)
    twin.program(svd_decompose(w, 8))
    y = twin.matmul(x)
    assert y.shape == (32, 6)
    assert (y - x @ w.T).abs().max().item() < EXACT


def test_physical_device_deviates_and_its_errors_are_fixed_by_the_seed():
    w, x = weights(), inputs()
    config = dataclasses.replace(physical(), detection_noise=None, readout=None)
    devices = [config.build(seed) for seed in (5, 5, 6)]
    outputs = []
    for device in devices:
        device.program(svd_decompose(w, 8))
        outputs.append(device.matmul(x).real)
    reference = x @ w.T
    relative_error = (outputs[0] - reference).norm() / reference.norm()
    assert relative_error.item() > 0.05
    assert torch.equal(outputs[0], outputs[1])
    assert torch.equal(outputs[0], devices[0].matmul(x).real)
    assert not torch.allclose(outputs[0], outputs[2])


def test_zero_error_device_with_uniform_loss_matches_the_twin_after_calibration():
    # 2 modes: every path crosses the same 3 MZIs, so the nominal-loss calibration is exact.
    config = PhotonicCore.Config(
        mesh_size=2,
        phase_error=PhaseError.Config(sigma_rad=0.0),
        gain_error=ShifterGainError.Config(sigma=0.0),
        crosstalk=ThermalCrosstalk.Config(coupling=0.0),
        insertion_loss=InsertionLoss.Config(loss_db=0.5, sigma_db=0.0),
    )
    w = weights(shape=(2, 2))
    device = config.build(seed=0)
    device.program(svd_decompose(w))
    x = inputs(n=2)
    assert (device.matmul(x) - x @ w.T).abs().max().item() < EXACT


def test_quantized_readout_and_noise_stay_close_to_the_twin():
    w, x = weights(), inputs()
    config = PhotonicCore.Config(
        mesh_size=8,
        phase_quantization=PhaseQuantization.Config(bits=16),
        readout=Readout.Config(bits=12),
        detection_noise=load_preset().detection_noise,
    )
    device = config.build(seed=0)
    device.program(svd_decompose(w, 8))
    reference = x @ w.T
    relative_error = ((device.matmul(x).real - reference).norm() / reference.norm()).item()
    assert 1e-6 < relative_error < 0.02


def test_programming_costs_thermal_tuning_time_and_energy():
    device = physical().build(seed=0)
    program = svd_decompose(weights(), 8)
    first = device.program(program)
    cost = device.config.cost
    assert first.time_s == cost.thermal_tuning_time_s
    assert first.num_shifters_changed > 0
    heater_power = sum(t.remainder(2 * torch.pi).sum().item() for t in program.phases.tensors())
    heater_power *= cost.heater_power_per_pi_w / torch.pi
    assert first.energy_j == pytest.approx(heater_power * cost.thermal_tuning_time_s)
    again = device.program(program)
    assert (again.time_s, again.energy_j, again.num_shifters_changed) == (0.0, 0.0, 0)


def test_bad_device_inputs_are_rejected():
    with pytest.raises(ValueError, match="mesh_size = 0"):
        PhotonicCore.Config(mesh_size=0)
    device = physical(4).build(seed=0)
    with pytest.raises(ValueError, match="mesh_size = 4"):
        device.program(svd_decompose(weights(), 8))


def test_tiled_engine_streams_tiles_through_fewer_cores():
    w, x = weights(shape=(20, 30)), inputs(n=30)
    program = tile_matrix(w, 8)  # 3 x 4 = 12 tiles
    twin = physical().twin()
    streaming = TiledEngine(twin, num_cores=3, seed=0)
    y, first = streaming.matmul(program, x)
    assert (y.real - x @ w.T).abs().max().item() < EXACT
    tuning = twin.cost.thermal_tuning_time_s
    assert first.time_s == pytest.approx(4 * tuning)  # 4 tiles per core, cores tune in parallel
    _, again = streaming.matmul(program, x)
    assert again.time_s == pytest.approx(4 * tuning)  # streamed: every product reprograms
    resident = TiledEngine(twin, num_cores=12, seed=0)
    _, first = resident.matmul(program, x)
    _, again = resident.matmul(program, x)
    assert first.time_s == pytest.approx(tuning)
    assert (again.time_s, again.energy_j) == (0.0, 0.0)
    with pytest.raises(ValueError, match="num_cores = 0"):
        TiledEngine(twin, num_cores=0, seed=0)
