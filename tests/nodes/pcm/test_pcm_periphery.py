"""DAC/ADC quantisation, output noise, noise management and bound management."""

import math

import pytest
import torch

from nodes.pcm.periphery import Periphery, Quantizer


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def identity_read(x_BPQK: torch.Tensor) -> torch.Tensor:
    """An analog stand-in: every tile sums its inputs (all weights 1)."""
    return x_BPQK.sum(dim=-1, keepdim=True)


def test_quantizer_levels_and_bounds():
    quantizer = Quantizer(bits=8, bound=10.0)
    values = torch.linspace(-20.0, 20.0, 100_001, dtype=torch.float64)
    codes = quantizer(values)
    levels = torch.unique(codes)
    assert levels.numel() == 255  # 2^7 - 1 levels per sign plus zero
    assert codes.min().item() == -10.0 and codes.max().item() == 10.0
    torch.testing.assert_close(
        torch.diff(levels), torch.full((254,), 10.0 / 127, dtype=torch.float64)
    )
    inside = values.abs() <= 10.0
    assert (codes[inside] - values[inside]).abs().max().item() <= 10.0 / 127 / 2 + 1e-12


def test_ideal_quantizer_only_clips():
    quantizer = Quantizer(bits=None, bound=1.0)
    values = torch.tensor([-3.0, -0.123456, 0.5, 2.0])
    assert torch.equal(quantizer(values), torch.tensor([-1.0, -0.123456, 0.5, 1.0]))


def test_output_noise_std_in_normalised_units():
    periphery = Periphery.Config(adc_bits=None, adc_bound=math.inf, output_noise=0.05).build()
    y, saturated = periphery.convert_outputs(
        torch.zeros(100_000, 1, dtype=torch.float64), generator()
    )
    # SE of a sample std over 100k draws is 0.22%; 2% is 9 SE.
    assert y.std().item() == pytest.approx(0.05, rel=0.02)
    assert y.mean().item() == pytest.approx(0.0, abs=0.05 * 5 / math.sqrt(100_000))
    assert not saturated.any()


def test_noise_management_scales_each_vector_to_full_dac_range():
    periphery = Periphery.Config().build()
    x_BPK = torch.tensor([[[0.5, -2.0, 1.0]], [[0.0, 0.0, 0.0]]])
    x_norm, scale_BP = periphery.normalize_inputs(x_BPK)
    assert torch.equal(scale_BP, torch.tensor([[2.0], [1.0]]))
    assert torch.equal(x_norm[0, 0], torch.tensor([0.25, -1.0, 0.5]))


def test_noise_management_keeps_small_inputs_above_dac_resolution():
    x_BPK = torch.full((1, 1, 4), 1e-3)
    managed = Periphery.Config(output_noise=0.0).build()
    unmanaged = Periphery.Config(output_noise=0.0, noise_management=False).build()
    # 4e-3 is below half an 8-bit DAC step (1/127), so without scaling every input rounds to 0.
    assert managed.read(x_BPK, 1, identity_read, generator()).item() == pytest.approx(
        4e-3, rel=0.02
    )
    assert unmanaged.read(x_BPK, 1, identity_read, generator()).item() == 0.0


def test_noise_management_makes_reads_scale_invariant():
    periphery = Periphery.Config(output_noise=0.0).build()
    x_BPK = torch.randn(8, 2, 16, generator=generator())
    base = periphery.read(x_BPK, 3, identity_read, generator())
    torch.testing.assert_close(periphery.read(x_BPK * 64, 3, identity_read, generator()), base * 64)


@pytest.mark.parametrize(("rounds", "expected"), [(0, 4.0), (1, 8.0), (3, 16.0)])
def test_bound_management_recovers_saturated_outputs(rounds, expected):
    """Sum of 16 full-scale inputs = 16 > ADC bound 4: needs 3 halvings (16 / 8 = 2 < 4)."""
    periphery = Periphery.Config(
        dac_bits=None,
        adc_bits=None,
        adc_bound=4.0,
        output_noise=0.0,
        bound_management_rounds=rounds,
    ).build()
    x_BPK = torch.ones(1, 1, 16)
    assert periphery.read(x_BPK, 1, identity_read, generator()).item() == pytest.approx(expected)


def test_bound_management_rereads_only_saturated_tiles():
    periphery = Periphery.Config(
        dac_bits=None, adc_bits=None, adc_bound=4.0, output_noise=0.0
    ).build()
    x_BPK = torch.stack([torch.ones(1, 16), torch.full((1, 16), 0.1)])
    calls = []

    def read(x_BPQK):
        calls.append(x_BPQK.clone())
        return identity_read(x_BPQK)

    y = periphery.read(x_BPK, 1, read, generator())
    # Noise management normalises both vectors to all-ones; the second's scale 0.1 brings
    # its sum back to 1.6 digitally, but in the analog domain both saturate alike.
    torch.testing.assert_close(y.flatten(), torch.tensor([16.0, 1.6]))
    assert len(calls) == 4


def test_bound_management_keeps_unsaturated_results_from_first_read():
    periphery = Periphery.Config(
        dac_bits=None, adc_bits=None, adc_bound=4.0, output_noise=0.0
    ).build()

    def read(x_BPQK):
        # Tile q = 0 always saturates at full input, tile q = 1 never does.
        return torch.stack([x_BPQK[..., 0, :].sum(-1), 0.1 * x_BPQK[..., 1, :].sum(-1)], dim=-1)[
            ..., None
        ]

    y = periphery.read(torch.ones(1, 1, 16), 2, read, generator())
    torch.testing.assert_close(y.flatten(), torch.tensor([16.0, 1.6]))


@pytest.mark.parametrize("bits", [0, 1, 17, -8])
def test_invalid_adc_bits_rejected_with_the_number(bits):
    with pytest.raises(
        ValueError, match=rf"adc_bits = {bits} is not valid for Periphery; use 2 to 16 bits"
    ):
        Periphery.Config(adc_bits=bits)


def test_invalid_dac_bits_rejected():
    with pytest.raises(ValueError, match=r"dac_bits = 0"):
        Periphery.Config(dac_bits=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"adc_bound": 0.0}, r"adc_bound = 0\.0"),
        ({"adc_bound": math.inf}, r"adc_bound = inf is not valid for Periphery with adc_bits = 8"),
        ({"output_noise": -0.1}, r"output_noise = -0\.1"),
        ({"bound_management_rounds": -1}, r"bound_management_rounds = -1"),
    ],
)
def test_invalid_periphery_config_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Periphery.Config(**kwargs)
