"""Each non-ideality against its statistics, edge cases and bad input.

Tolerances: with n samples the standard error of a sample mean is sd/sqrt(n)
and of a sample variance about var*sqrt(2/n) (less for the lighter-tailed
uniform and truncated Gaussian). Each check allows >= 5 standard errors, so a
correct implementation fails with probability < 1e-6, while the effect it
checks (a wrong sigma, a missing truncation, a wrong formula) is many times larger.
"""

from __future__ import annotations

import math

import pytest
import torch

from nodes.photonic.clements import svd_decompose, unit_elements
from nodes.photonic.elements import propagate
from nodes.photonic.mesh import MeshLayout, MeshPhases, mesh_elements
from nodes.photonic.nonideal import (
    BOLTZMANN_J_PER_K,
    ELEMENTARY_CHARGE_C,
    DetectionNoise,
    InsertionLoss,
    PhaseError,
    PhaseQuantization,
    Readout,
    ShifterGainError,
    ThermalCrosstalk,
)

N = 100_000


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def uniform_phases(seed: int = 1) -> torch.Tensor:
    return torch.rand(N, generator=gen(seed), dtype=torch.float64) * 2 * math.pi


# --- phase quantization ------------------------------------------------------------------------


def test_phase_quantization_error_is_uniform_over_one_step():
    bits = 6
    effect = PhaseQuantization.Config(bits=bits).build((N,), gen())
    step = 2 * math.pi / 2**bits
    phases = uniform_phases()
    quantized = effect.apply(phases)
    levels = quantized / step
    assert torch.allclose(levels, levels.round(), atol=1e-9)
    assert torch.all((quantized >= 0) & (quantized < 2 * math.pi))
    error = torch.remainder(quantized - phases + math.pi, 2 * math.pi) - math.pi
    assert error.abs().max().item() <= step / 2 + 1e-12
    # Uniform error: var = step^2 / 12; SE of the variance ~ 0.9 var / sqrt(N) = 0.3 %.
    assert error.var().item() == pytest.approx(step**2 / 12, rel=0.02)
    assert error.mean().item() == pytest.approx(0.0, abs=5 * step / math.sqrt(12 * N))


def test_phase_quantization_wraps_and_passes_gradients_straight_through():
    effect = PhaseQuantization.Config(bits=3).build((2,), gen())
    phases = torch.tensor([-0.1, 2 * math.pi + 0.1], dtype=torch.float64, requires_grad=True)
    out = effect.apply(phases)
    assert out.detach().tolist() == pytest.approx([0.0, 0.0], abs=1e-12)
    out.sum().backward()
    assert phases.grad.tolist() == [1.0, 1.0]


def test_phase_bits_zero_is_rejected():
    with pytest.raises(ValueError, match="phase_bits = 0"):
        PhaseQuantization.Config(bits=0)


# --- phase error -------------------------------------------------------------------------------


def test_phase_error_is_gaussian_truncated_at_two_sigma():
    sigma = 0.1
    offsets = PhaseError.Config(sigma_rad=sigma).build((N,), gen()).offset_rad
    assert offsets.abs().max().item() <= 2 * sigma + 1e-12
    # Truncated N(0, s^2) at +-2s: var = s^2 (1 - 2*2*pdf(2) / (cdf(2) - cdf(-2))).
    pdf2 = math.exp(-2.0) / math.sqrt(2 * math.pi)
    mass = math.erf(2 / math.sqrt(2))
    expected_std = sigma * math.sqrt(1 - 4 * pdf2 / mass)
    assert expected_std == pytest.approx(0.8796 * sigma, rel=1e-3)
    assert offsets.std().item() == pytest.approx(expected_std, rel=0.015)
    assert offsets.mean().item() == pytest.approx(0.0, abs=5 * expected_std / math.sqrt(N))
    # Truncation must bite: a plain Gaussian would put 4.55 % beyond 2 sigma and
    # 13.6 % between 1.5 and 2 sigma; the truncated one has 0 % and 13.6/95.45 %.
    share = (offsets.abs() > 1.5 * sigma).double().mean().item()
    assert share == pytest.approx((mass - math.erf(1.5 / math.sqrt(2))) / mass, abs=0.01)


def test_phase_error_is_fixed_per_device_and_seeded():
    config = PhaseError.Config(sigma_rad=0.1)
    a = config.build((50,), gen(3))
    b = config.build((50,), gen(3))
    c = config.build((50,), gen(4))
    phases = uniform_phases()[:50]
    assert torch.equal(a.apply(phases), a.apply(phases))
    assert torch.equal(a.offset_rad, b.offset_rad)
    assert not torch.equal(a.offset_rad, c.offset_rad)
    assert torch.equal(PhaseError.Config(sigma_rad=0.0).build((50,), gen()).apply(phases), phases)


# --- shifter gain error ------------------------------------------------------------------------


def test_shifter_gain_error_scales_phases_with_the_configured_spread():
    effect = ShifterGainError.Config(sigma=0.002).build((N,), gen())
    ratio = effect.apply(torch.full((N,), 2.0, dtype=torch.float64)) / 2.0
    assert ratio.mean().item() == pytest.approx(1.0, abs=5 * 0.002 / math.sqrt(N))
    # SE of a Gaussian sample std: std / sqrt(2N) = 0.22 %.
    assert ratio.std().item() == pytest.approx(0.002, rel=0.015)
    assert effect.apply(torch.zeros(N, dtype=torch.float64)).abs().max().item() == 0.0


# --- thermal crosstalk -------------------------------------------------------------------------


def test_thermal_crosstalk_couples_neighbouring_heaters_only():
    effect = ThermalCrosstalk.Config(coupling=0.005).build((4,), gen())
    phases = torch.tensor([1.0, 0.0, 0.0, 2.0], dtype=torch.float64)
    assert effect.apply(phases).tolist() == pytest.approx([1.0, 0.005, 0.010, 2.0])


def test_thermal_crosstalk_mean_shift_for_random_settings():
    coupling = 0.005
    rows = uniform_phases().reshape(-1, 10)
    shift = ThermalCrosstalk.Config(coupling=coupling).build(rows.shape, gen()).apply(rows) - rows
    # Interior heaters have two neighbours of mean pi, edge heaters one.
    interior = shift[:, 1:-1].flatten()
    sd_interior = coupling * math.sqrt(2 * (2 * math.pi) ** 2 / 12)
    assert interior.mean().item() == pytest.approx(
        2 * math.pi * coupling, abs=5 * sd_interior / math.sqrt(len(interior))
    )
    assert interior.std().item() == pytest.approx(sd_interior, rel=0.02)
    assert shift[:, 0].mean().item() == pytest.approx(math.pi * coupling, rel=0.02)
    zero = ThermalCrosstalk.Config(coupling=0.0).build(rows.shape, gen())
    assert torch.equal(zero.apply(rows), rows)


# --- insertion loss ----------------------------------------------------------------------------


def test_insertion_loss_spread_and_amplitude():
    loss = InsertionLoss.Config(loss_db=0.3, sigma_db=0.03).build((N,), gen())
    assert loss.loss_db.mean().item() == pytest.approx(0.3, abs=5 * 0.03 / math.sqrt(N))
    assert loss.loss_db.std().item() == pytest.approx(0.03, rel=0.015)
    assert torch.allclose(loss.amplitude, 10 ** (-loss.loss_db / 20))


def test_insertion_loss_compounds_with_optical_depth():
    # A 2-mode mesh is one MZI (its odd column is empty): power x 10^(-L / 10) for any input.
    loss_db = 0.4
    layout = MeshLayout(2)
    loss = InsertionLoss.Config(loss_db=loss_db, sigma_db=0.0).build((layout.num_columns, 1), gen())
    theta = torch.rand(2, 1, generator=gen(1), dtype=torch.float64) * 2 * math.pi
    phases = MeshPhases(theta, theta.flip(0), torch.zeros(2, dtype=torch.float64))
    x = torch.randn(200, 2, dtype=torch.complex128, generator=gen(2))
    out = propagate(mesh_elements(phases, loss.amplitude), x)
    ratio = out.abs().pow(2).sum(-1) / x.abs().pow(2).sum(-1)
    assert torch.allclose(ratio, torch.full_like(ratio, 10 ** (-loss_db / 10)))
    # A 2-mode unit (mesh, attenuators, mesh: depth 3) programmed with the identity.
    program = svd_decompose(torch.eye(2, dtype=torch.float64))
    amplitudes = [loss.amplitude, 10 ** (-torch.full((2,), loss_db) / 20), loss.amplitude]
    out = propagate(unit_elements(program.phases, amplitudes), x)
    ratio = out.abs().pow(2).sum(-1) / x.abs().pow(2).sum(-1)
    assert torch.allclose(ratio, torch.full_like(ratio, 10 ** (-3 * loss_db / 10)))
    assert loss.nominal_amplitude(3) ** 2 == pytest.approx(10 ** (-3 * loss_db / 10))


def test_negative_loss_is_rejected_with_the_number():
    with pytest.raises(ValueError, match=r"insertion_loss.loss_db = -0.1"):
        InsertionLoss.Config(loss_db=-0.1)


# --- detection noise ---------------------------------------------------------------------------


def expected_noise_std(config: DetectionNoise.Config, quadrature: float) -> float:
    current = config.responsivity_a_per_w * config.full_scale_power_w * quadrature
    thermal = (
        4
        * BOLTZMANN_J_PER_K
        * config.temperature_k
        * config.bandwidth_hz
        / config.load_resistance_ohm
    )
    shot = 2 * ELEMENTARY_CHARGE_C * (abs(current) + config.dark_current_a) * config.bandwidth_hz
    return math.sqrt(thermal + shot) / (config.responsivity_a_per_w * config.full_scale_power_w)


@pytest.mark.parametrize("quadrature", [0.0, 0.3, -0.8])
def test_detection_noise_matches_thermal_plus_shot(quadrature):
    # A weak channel (1 uW) makes both terms matter: thermal 0.13 uA vs shot ~0.01-0.02 uA.
    config = DetectionNoise.Config(full_scale_power_w=1e-6, load_resistance_ohm=50.0)
    noise = config.build(gen())
    signal = torch.full((N,), quadrature, dtype=torch.float64)
    error = noise.apply(signal) - signal
    expected = expected_noise_std(config, quadrature)
    assert error.std().item() == pytest.approx(expected, rel=0.015)
    assert error.mean().item() == pytest.approx(0.0, abs=5 * expected / math.sqrt(N))


def test_shot_noise_grows_with_current_and_quadratures_are_independent():
    config = DetectionNoise.Config(full_scale_power_w=1e-6, load_resistance_ohm=1e6)
    noise = config.build(gen())
    signal = torch.complex(
        torch.full((N,), 1.0, dtype=torch.float64), torch.zeros(N, dtype=torch.float64)
    )
    error = noise.apply(signal) - signal
    assert error.real.std().item() == pytest.approx(expected_noise_std(config, 1.0), rel=0.015)
    assert error.imag.std().item() == pytest.approx(expected_noise_std(config, 0.0), rel=0.015)
    assert expected_noise_std(config, 1.0) > 2 * expected_noise_std(config, 0.0)
    correlation = torch.corrcoef(torch.stack([error.real, error.imag]))[0, 1].item()
    assert abs(correlation) < 5 / math.sqrt(N)


def test_detection_noise_is_seeded():
    config = DetectionNoise.Config()
    signal = torch.zeros(10, dtype=torch.float64)
    assert torch.equal(config.build(gen(1)).apply(signal), config.build(gen(1)).apply(signal))
    assert not torch.equal(config.build(gen(1)).apply(signal), config.build(gen(2)).apply(signal))


# --- readout -----------------------------------------------------------------------------------


def test_readout_error_is_uniform_within_range_and_clips_outside():
    bits, full_scale = 6, 2.0
    readout = Readout.Config(bits=bits, full_scale=full_scale).build(gen())
    step = 2 * full_scale / 2**bits
    values = (torch.rand(N, generator=gen(5), dtype=torch.float64) * 2 - 1) * (full_scale - step)
    error = readout.apply(values) - values
    assert error.abs().max().item() <= step / 2 + 1e-12
    assert error.var().item() == pytest.approx(step**2 / 12, rel=0.02)
    clipped = readout.apply(torch.tensor([-5.0, 5.0], dtype=torch.float64))
    assert clipped.tolist() == [-full_scale, full_scale]
    complex_out = readout.apply(torch.tensor([0.26 + 0.74j], dtype=torch.complex128))
    assert complex_out.real.item() == pytest.approx(round(0.26 / step) * step)
    assert complex_out.imag.item() == pytest.approx(round(0.74 / step) * step)


def test_readout_bits_zero_is_rejected():
    with pytest.raises(ValueError, match="readout.bits = 0"):
        Readout.Config(bits=0)
