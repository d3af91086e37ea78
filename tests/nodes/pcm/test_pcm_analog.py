"""Analog MVMs on programmed tiles, drift compensation, hardware-aware autograd, placement."""

import math

import pytest
import torch

from nodes.pcm.analog import (
    WeightStationary,
    analog_matmul,
    analog_matmul_transposed,
    drift_compensation_scale,
    program_layer,
)
from nodes.pcm.device import DriftCompensation, PcmDevice
from nodes.pcm.modes import HardwareAware
from nodes.pcm.periphery import Periphery
from nodes.pcm.tile import Tile


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def layer(num_outputs, num_inputs, seed=0, dtype=torch.float32):
    w_OI = torch.randn(num_outputs, num_inputs, generator=generator(seed), dtype=dtype) / math.sqrt(
        num_inputs
    )
    bias_O = torch.randn(num_outputs, generator=generator(seed + 1), dtype=dtype)
    return w_OI, bias_O


def test_ideal_chip_is_exact_without_quantisation():
    tile = Tile.Config(rows=16, cols=8).build()
    periphery = Periphery.Config.ideal().build()
    w_OI, bias_O = layer(20, 40, dtype=torch.float64)
    programmed = program_layer(
        w_OI, bias_O, tile, PcmDevice.Config.ideal().build(), periphery, generator()
    )
    x_BI = torch.randn(32, 40, generator=generator(5), dtype=torch.float64)
    y_BO = analog_matmul(x_BI, programmed, 0.0, periphery, generator())
    torch.testing.assert_close(y_BO, x_BI @ w_OI.T + bias_O, rtol=0, atol=1e-6)


def test_zero_noise_error_stays_within_quantisation_bound():
    """Single tile, 8-bit DAC/ADC, no noise: |error| <= DAC and ADC half-steps propagated."""
    tile = Tile.Config(rows=8, cols=8).build()
    config = Periphery.Config(output_noise=0.0)
    periphery = config.build()
    w_OI = torch.rand(6, 8, generator=generator(), dtype=torch.float64) * 2 - 1
    programmed = program_layer(
        w_OI, None, tile, PcmDevice.Config.ideal().build(), periphery, generator()
    )
    x_BI = torch.randn(64, 8, generator=generator(1), dtype=torch.float64)
    y_BO = analog_matmul(x_BI, programmed, 0.0, periphery, generator())
    # 8 inputs on weights |w_norm| <= 1 sum to at most 8 < adc_bound, so nothing saturates.
    w_norm_OI = w_OI / w_OI.abs().max()
    dac_half_step = 0.5 / (2 ** (config.dac_bits - 1) - 1)
    adc_half_step = 0.5 * config.adc_bound / (2 ** (config.adc_bits - 1) - 1)
    bound_BO = (
        x_BI.abs().amax(dim=1, keepdim=True)
        * w_OI.abs().max()
        * (dac_half_step * w_norm_OI.abs().sum(dim=1) + adc_half_step)
    )
    error_BO = (y_BO - x_BI @ w_OI.T).abs()
    assert (error_BO <= bound_BO + 1e-12).all()
    assert error_BO.max() > 0


def test_weights_spanning_many_tiles_sum_partial_products():
    tile = Tile.Config(rows=8, cols=4).build()
    periphery = Periphery.Config.ideal().build()
    w_OI, bias_O = layer(10, 30, dtype=torch.float64)
    programmed = program_layer(
        w_OI, bias_O, tile, PcmDevice.Config.ideal().build(), periphery, generator()
    )
    assert programmed.num_tiles == 4 * 3
    x_BI = torch.randn(5, 30, generator=generator(2), dtype=torch.float64)
    torch.testing.assert_close(
        analog_matmul(x_BI, programmed, 0.0, periphery, generator()), x_BI @ w_OI.T + bias_O
    )
    g_BO = torch.randn(5, 10, generator=generator(3), dtype=torch.float64)
    torch.testing.assert_close(
        analog_matmul_transposed(g_BO, programmed, 0.0, periphery, generator()), g_BO @ w_OI
    )


def test_noisy_chip_is_close_but_not_exact():
    tile = Tile.Config().build()
    periphery = Periphery.Config().build()
    w_OI, bias_O = layer(64, 100)
    programmed = program_layer(
        w_OI, bias_O, tile, PcmDevice.Config().build(), periphery, generator()
    )
    x_BI = torch.rand(128, 100, generator=generator(1))
    y_BO = analog_matmul(x_BI, programmed, 1.0, periphery, generator(2))
    ideal = x_BI @ w_OI.T
    relative = ((y_BO - bias_O - ideal).norm() / ideal.norm()).item()
    assert 0.01 < relative < 0.2


def test_seeded_analog_runs_reproduce_and_seeds_differ():
    tile = Tile.Config(rows=32, cols=32).build()
    periphery = Periphery.Config().build()
    device = PcmDevice.Config().build()
    w_OI, bias_O = layer(20, 50)
    x_BI = torch.randn(8, 50, generator=generator(9))

    def run(seed):
        programmed = program_layer(w_OI, bias_O, tile, device, periphery, generator(seed))
        return analog_matmul(x_BI, programmed, 3600.0, periphery, generator(seed + 1))

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_drift_compensation_restores_mean_output_magnitude():
    tile = Tile.Config(rows=64, cols=64).build()
    periphery = Periphery.Config().build()
    w_OI, _ = layer(64, 64, seed=3)
    programmed = program_layer(w_OI, None, tile, PcmDevice.Config().build(), periphery, generator())
    x_BI = torch.rand(512, 64, generator=generator(4))
    fresh = analog_matmul(x_BI, programmed, 0.0, periphery, generator(5)).abs().mean()
    one_year = 365 * 86400.0
    drifted = analog_matmul(x_BI, programmed, one_year, periphery, generator(6)).abs().mean()
    scale = drift_compensation_scale(programmed, one_year, periphery, generator(7))
    compensated = (
        analog_matmul(x_BI, programmed, one_year, periphery, generator(6), drift_scale=scale)
        .abs()
        .mean()
    )
    # nu ~ 0.05-0.1 over t / t0 ~ 1.6e6 shrinks conductances to ~0.25-0.5 of their value.
    assert drifted / fresh < 0.6
    assert (compensated / fresh).item() == pytest.approx(1.0, abs=0.05)


def test_drift_compensation_restores_the_transposed_read_too():
    """The forward's one global factor undoes the drift seen from the column side as well."""
    tile = Tile.Config(rows=64, cols=64).build()
    periphery = Periphery.Config().build()
    w_OI, _ = layer(64, 64, seed=3)
    programmed = program_layer(w_OI, None, tile, PcmDevice.Config().build(), periphery, generator())
    grad_BO = torch.randn(512, 64, generator=generator(4))
    one_year = 365 * 86400.0

    def magnitude(t_inference: float, **scale) -> float:
        grad_BI = analog_matmul_transposed(
            grad_BO, programmed, t_inference, periphery, generator(6), **scale
        )
        return grad_BI.abs().mean().item()

    fresh = magnitude(0.0)
    scale = drift_compensation_scale(programmed, one_year, periphery, generator(7))
    assert magnitude(one_year) / fresh < 0.6
    assert magnitude(one_year, drift_scale=scale) / fresh == pytest.approx(1.0, abs=0.05)


def test_hardware_aware_reads_apply_the_drift_scale():
    mode, periphery, programmed, w_OI, bias_O, x_BI, grad_BO = _hardware_aware_setup(
        HardwareAware.Config(backward="analog")
    )
    x = x_BI.clone().requires_grad_()
    y = mode.linear(x, w_OI, bias_O, programmed, 1.0, periphery, generator(3), drift_scale=0.5)
    want = analog_matmul(x_BI, programmed, 1.0, periphery, generator(3), drift_scale=0.5)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    (grad_x,) = _gradients(y, grad_BO, x)
    # The generator continued after the forward's draws, as in the autograd backward.
    gen = generator(3)
    analog_matmul(x_BI, programmed, 1.0, periphery, gen)
    unscaled = analog_matmul_transposed(grad_BO, programmed, 1.0, periphery, gen)
    torch.testing.assert_close(grad_x, 0.5 * unscaled, rtol=1e-12, atol=1e-12)


def test_without_compensation_the_scale_is_one():
    periphery = Periphery.Config().build()
    device = PcmDevice.Config(drift_compensation=DriftCompensation.Config(kind="none")).build()
    w_OI, _ = layer(8, 8)
    programmed = program_layer(w_OI, None, Tile.Config().build(), device, periphery, generator())
    assert drift_compensation_scale(programmed, 86400.0, periphery, generator()).item() == 1.0


def test_negative_drift_time_rejected():
    periphery = Periphery.Config().build()
    w_OI, _ = layer(4, 4)
    programmed = program_layer(
        w_OI, None, Tile.Config().build(), PcmDevice.Config().build(), periphery, generator()
    )
    with pytest.raises(ValueError, match=r"t_inference = -5\.0 s"):
        analog_matmul(torch.ones(1, 4), programmed, -5.0, periphery, generator())


def test_wrong_input_width_rejected():
    periphery = Periphery.Config().build()
    w_OI, _ = layer(4, 6)
    programmed = program_layer(
        w_OI, None, Tile.Config().build(), PcmDevice.Config().build(), periphery, generator()
    )
    with pytest.raises(ValueError, match=r"expected \(batch, 6\)"):
        analog_matmul(torch.ones(2, 5), programmed, 0.0, periphery, generator())


def _hardware_aware_setup(config):
    periphery = Periphery.Config().build()
    w_OI, bias_O = layer(12, 20, dtype=torch.float64)
    programmed = program_layer(
        w_OI,
        bias_O,
        Tile.Config(rows=8, cols=8).build(),
        PcmDevice.Config().build(),
        periphery,
        generator(),
    )
    x_BI = torch.randn(16, 20, generator=generator(1), dtype=torch.float64)
    grad_BO = torch.randn(16, 12, generator=generator(2), dtype=torch.float64)
    return config.build(), periphery, programmed, w_OI, bias_O, x_BI, grad_BO


def _gradients(y_BO, grad_BO, *tensors):
    return torch.autograd.grad(y_BO, tensors, grad_BO)


def test_hardware_aware_backward_is_the_ideal_gradient():
    mode, periphery, programmed, w_OI, bias_O, x_BI, grad_BO = _hardware_aware_setup(
        HardwareAware.Config()
    )
    x, w, b = (t.clone().requires_grad_() for t in (x_BI, w_OI, bias_O))
    y = mode.linear(x, w, b, programmed, 1.0, periphery, generator(3))
    x_ref, w_ref, b_ref = (t.clone().requires_grad_() for t in (x_BI, w_OI, bias_O))
    y_ref = x_ref @ w_ref.T + b_ref
    assert not torch.allclose(y, y_ref)  # the forward really is analog
    for got, expected in zip(
        _gradients(y, grad_BO, x, w, b),
        _gradients(y_ref, grad_BO, x_ref, w_ref, b_ref),
        strict=True,
    ):
        assert torch.equal(got, expected)  # same products, same order: bit-identical


def test_hardware_aware_forward_matches_analog_matmul():
    mode, periphery, programmed, w_OI, bias_O, x_BI, _ = _hardware_aware_setup(
        HardwareAware.Config()
    )
    y = mode.linear(x_BI, w_OI, bias_O, programmed, 1.0, periphery, generator(3))
    assert torch.equal(y, analog_matmul(x_BI, programmed, 1.0, periphery, generator(3)))


def test_ideal_forward_mode_is_exact():
    config = HardwareAware.Config(forward="ideal")
    mode, periphery, programmed, w_OI, bias_O, x_BI, _ = _hardware_aware_setup(config)
    y = mode.linear(x_BI, w_OI, bias_O, programmed, 1.0, periphery, generator(3))
    torch.testing.assert_close(y, x_BI @ w_OI.T + bias_O, rtol=0, atol=1e-12)


def test_analog_backward_mode_reads_the_transposed_tiles():
    config = HardwareAware.Config(backward="analog")
    mode, periphery, programmed, w_OI, bias_O, x_BI, grad_BO = _hardware_aware_setup(config)
    x, w = x_BI.clone().requires_grad_(), w_OI.clone().requires_grad_()
    y = mode.linear(x, w, bias_O, programmed, 1.0, periphery, generator(3))
    grad_x, grad_w = _gradients(y, grad_BO, x, w)
    ideal = grad_BO @ w_OI
    relative = ((grad_x - ideal).norm() / ideal.norm()).item()
    assert 0.005 < relative < 0.3
    torch.testing.assert_close(grad_w, grad_BO.T @ x_BI, rtol=0, atol=1e-12)  # update stays digital


def test_weight_stationary_counts_arrays():
    placement = WeightStationary.Config().build(Tile.Config().build())
    shapes = [(100, 784), (10, 100)]
    assert placement.arrays_needed(shapes) == [4, 1]
    assert placement.place(shapes) == 5


def test_weight_stationary_rejects_models_that_do_not_fit():
    placement = WeightStationary.Config(num_chips=2).build(Tile.Config().build())
    with pytest.raises(
        ValueError, match=r"needs 256 arrays .* 2 chip\(s\) x 64 cores = 128 arrays.*at least 4"
    ):
        placement.place([(4096, 4096)])


def test_weight_stationary_config_validated():
    with pytest.raises(ValueError, match=r"num_chips = 0"):
        WeightStationary.Config(num_chips=0)
