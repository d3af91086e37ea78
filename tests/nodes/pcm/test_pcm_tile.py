"""Mapping weights onto differential-pair crossbar tiles."""

import pytest
import torch

from nodes.pcm.device import PcmDevice
from nodes.pcm.tile import Tile

G_MAX = 25.0


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_grid_covers_the_matrix():
    tile = Tile.Config(rows=256, cols=128).build()
    assert tile.grid(num_outputs=300, num_inputs=600) == (3, 3)
    assert tile.num_tiles(300, 600) == 9
    assert tile.num_tiles(128, 256) == 1
    assert tile.num_tiles(129, 256) == 2


def test_differential_pair_has_one_side_at_zero_and_per_tile_g_max():
    tile = Tile.Config(rows=4, cols=3).build()
    w_OI = torch.randn(5, 7, generator=generator())
    g_SRCIO, scale_RC = tile.map_weights(w_OI, G_MAX)
    assert g_SRCIO.shape == (2, 2, 2, 4, 3)
    assert ((g_SRCIO[0] == 0) | (g_SRCIO[1] == 0)).all()
    assert (g_SRCIO >= 0).all()
    # Per-tile scaling: every tile's largest weight sits at g_max.
    torch.testing.assert_close(g_SRCIO.amax(dim=(0, 3, 4)), torch.full((2, 2), G_MAX))
    expected_scale = torch.tensor(
        [
            [w_OI[:3, :4].abs().max(), w_OI[3:, :4].abs().max()],
            [w_OI[:3, 4:].abs().max(), w_OI[3:, 4:].abs().max()],
        ]
    )
    torch.testing.assert_close(scale_RC, expected_scale)


def test_layer_scaling_maps_only_the_global_max_to_g_max():
    tile = Tile.Config(rows=4, cols=3, weight_scaling="layer").build()
    w_OI = torch.randn(5, 7, generator=generator())
    g_SRCIO, scale_RC = tile.map_weights(w_OI, G_MAX)
    assert torch.equal(scale_RC, torch.full((2, 2), w_OI.abs().max().item()))
    assert g_SRCIO.max().item() == pytest.approx(G_MAX)
    assert (g_SRCIO.amax(dim=(0, 3, 4)) < G_MAX).sum() >= 1


def test_ideal_programming_reconstructs_weights_and_keeps_bias_digital():
    tile = Tile.Config(rows=8, cols=8).build()
    w_OI = torch.randn(10, 20, generator=generator(), dtype=torch.float64)
    bias_O = torch.randn(10, generator=generator(1), dtype=torch.float64)
    programmed = tile.program(
        w_OI, bias_O, PcmDevice.Config.ideal().build(), generator(), programmed_at_s=12.5
    )
    torch.testing.assert_close(
        programmed.effective_weights(100.0, generator()), w_OI, rtol=0, atol=1e-12
    )
    assert torch.equal(programmed.bias_O, bias_O)
    assert programmed.programmed_at_s == 12.5
    assert programmed.num_tiles == 6


def test_all_zero_weights_map_to_zero_conductance():
    tile = Tile.Config(rows=4, cols=4).build()
    g_SRCIO, scale_RC = tile.map_weights(torch.zeros(3, 3), G_MAX)
    assert torch.equal(g_SRCIO, torch.zeros_like(g_SRCIO))
    assert torch.equal(scale_RC, torch.ones(1, 1))


def test_pruned_weights_are_zero_conductance_pairs():
    """A weight MemoryX pruned is 0 (or -0): both devices of its pair target 0 uS."""
    tile = Tile.Config(rows=16, cols=8).build()
    w_OI = torch.randn(20, 40, generator=generator(), dtype=torch.float64)
    pruned_OI = torch.rand(20, 40, generator=generator(1)) < 0.9
    w_OI[pruned_OI] = 0.0
    w_OI[pruned_OI & (torch.arange(40) % 2 == 0)] = -0.0
    g_SRCIO, _ = tile.map_weights(w_OI, G_MAX)
    pruned_RCIO = tile.split(pruned_OI.double()).bool()
    assert torch.equal(g_SRCIO[:, pruned_RCIO], torch.zeros(2, int(pruned_OI.sum())).double())
    assert (g_SRCIO.sum(dim=0)[~pruned_RCIO & (tile.split(w_OI) != 0)] > 0).all()
    ideal = tile.program(w_OI, None, PcmDevice.Config.ideal().build(), generator())
    assert torch.equal(ideal.effective_weights(0.0, generator())[pruned_OI], w_OI[pruned_OI])
    # On real devices a RESET pair still reads programming noise on both sides: zero on
    # average, not exactly (rectified normals of equal spread cancel in the difference).
    noisy = tile.program(w_OI, None, PcmDevice.Config().build(), generator(2))
    read_OI = noisy.effective_weights(0.0, generator(3))[pruned_OI]
    assert read_OI.std() > 0
    assert read_OI.mean().abs() < 4 * read_OI.std() / read_OI.numel() ** 0.5


def test_programmed_state_keeps_drift_exponents_fixed():
    tile = Tile.Config(rows=8, cols=8).build()
    programmed = tile.program(
        torch.randn(4, 4, generator=generator()), None, PcmDevice.Config().build(), generator()
    )
    exponents = programmed.drift_exponent_SRCIO.clone()
    programmed.conductances(3600.0, generator(1))
    assert torch.equal(programmed.drift_exponent_SRCIO, exponents)
    assert programmed.drift_exponent_SRCIO.shape == programmed.g_programmed_SRCIO.shape


@pytest.mark.parametrize(("field", "value"), [("rows", 0), ("cols", -3)])
def test_non_positive_tile_size_is_rejected(field, value):
    with pytest.raises(ValueError, match=rf"{field} = {value} is not valid for Tile"):
        Tile.Config(**{field: value})


def test_matrix_smaller_than_a_tile_keeps_only_the_used_block():
    tile = Tile.Config(rows=256, cols=256).build()
    g_SRCIO, scale_RC = tile.map_weights(torch.randn(10, 64, generator=generator()), G_MAX)
    assert g_SRCIO.shape == (2, 1, 1, 64, 10)
    assert tile.num_tiles(10, 64) == 1
    # Spanning several tiles pads to whole tiles.
    g_SRCIO, _ = tile.map_weights(torch.randn(10, 300, generator=generator()), G_MAX)
    assert g_SRCIO.shape == (2, 2, 1, 256, 10)


def test_time_since_programming_follows_the_clock():
    tile = Tile.Config(rows=8, cols=8).build()
    device = PcmDevice.Config.ideal().build()
    programmed = tile.program(torch.ones(2, 2), None, device, generator(), programmed_at_s=100.0)
    assert programmed.time_since_programming(160.0) == 60.0
    with pytest.raises(ValueError, match=r"t_inference = -10\.0 s"):
        programmed.time_since_programming(90.0)
