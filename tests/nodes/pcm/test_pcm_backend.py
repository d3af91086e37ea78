"""What the PCM backend's analog backward reads, programs and counts (nodes/pcm/backend.py).

The cross-backend contract and the forward counters are in tests/nodes/test_backends.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from nodes.pcm.backend import PcmBackend
from nodes.pcm.cost import MvmMode
from nodes.pcm.modes import HardwareAware
from nodes.pcm.tile import Tile

IN, OUT, BATCH = 300, 70, 5


def _linear_case(seed: int = 0):
    torch.manual_seed(seed)
    block = nn.Sequential(nn.Linear(IN, OUT))
    params = {n: p.detach().clone() for n, p in block.named_parameters()}
    return block, params, torch.randn(BATCH, IN), torch.randn(BATCH, OUT)


def _step(config: PcmBackend.Config, block, params, x, grad_y, layer: int = 1) -> PcmBackend:
    """One forward and one backward of a hidden layer, as a node runs them (same random state)."""
    backend = config.build()
    torch.manual_seed(1)
    backend.forward(layer, block, params, x)
    torch.manual_seed(1)
    backend.backward(layer, block, params, x, grad_y)
    return backend


def _analog(**overrides) -> PcmBackend.Config:
    return PcmBackend.Config(training=HardwareAware.Config(backward="analog"), **overrides)


@pytest.mark.parametrize("rows, cols", [(256, 256), (256, 128)])
def test_analog_backward_counts_one_transposed_mvm_per_tile_and_grad_vector(rows, cols):
    block, params, x, grad_y = _linear_case()
    backend = _step(_analog(tile=Tile.Config(rows=rows, cols=cols)), block, params, x, grad_y)
    stats = backend.stats()
    # The arrays hold W as ceil(in / rows) x ceil(out / cols) tiles, whichever way they are read.
    num_tiles = math.ceil(IN / rows) * math.ceil(OUT / cols)
    assert num_tiles == 2
    for prefix in ("pcm.mvm", "pcm.mvm_recompute", "pcm.mvm_transposed"):
        assert stats[f"{prefix}_mvms"] == BATCH * num_tiles, prefix
        assert stats[f"{prefix}_macs"] == BATCH * IN * OUT, prefix
    # Driven from the columns: cols DACs in, rows ADCs out, on the same tiles.
    transposed = backend.cost.mvm(
        MvmMode(
            rows=cols,
            cols=rows,
            dac_bits=backend.mvm_mode.dac_bits,
            adc_bits=backend.mvm_mode.adc_bits,
            num_phases=backend.mvm_mode.num_phases,
        )
    )
    # Two tiles on 64 cores: one round per vector.
    assert stats["pcm.mvm_transposed_time_s"] == pytest.approx(BATCH * transposed.time_s)
    assert stats["pcm.mvm_transposed_energy_j"] == pytest.approx(
        BATCH * num_tiles * transposed.energy_j
    )
    if rows != cols:
        # Fewer drivers, more converters: the transposed read costs differ from the forward's.
        assert stats["pcm.mvm_transposed_energy_j"] != pytest.approx(stats["pcm.mvm_energy_j"])
    else:
        assert stats["pcm.mvm_transposed_energy_j"] == pytest.approx(stats["pcm.mvm_energy_j"])


def test_analog_backward_advances_the_clock_by_everything_it_counts():
    block, params, x, grad_y = _linear_case()
    stats = _step(_analog(), block, params, x, grad_y).stats()
    parts = ("program", "calibration", "mvm", "mvm_recompute", "mvm_transposed")
    assert stats["pcm.mvm_transposed_time_s"] > 0
    assert stats["pcm.clock_s"] == pytest.approx(sum(stats[f"pcm.{p}_time_s"] for p in parts))


def test_ideal_backward_reads_nothing_and_programs_nothing():
    block, params, x, grad_y = _linear_case()
    backend = _step(PcmBackend.Config(), block, params, x, grad_y)
    stats = backend.stats()
    assert not any(k.startswith(("pcm.mvm_transposed", "pcm.mvm_recompute")) for k in stats)
    assert stats["pcm.programmings"] == 1
    assert stats["pcm.mvm_mvms"] == BATCH * 2
    assert stats["pcm.clock_s"] == pytest.approx(
        sum(stats[f"pcm.{p}_time_s"] for p in ("program", "calibration", "mvm"))
    )


@pytest.mark.parametrize(
    "mode, programmings", [("streaming", 2), ("weight-stationary", 1)], ids=["streaming", "ws"]
)
def test_analog_backward_reprograms_only_shared_arrays(mode, programmings):
    block, params, x, grad_y = _linear_case()
    stats = _step(_analog(mode=mode), block, params, x, grad_y).stats()
    assert stats["pcm.programmings"] == programmings
    # Every device of both tiles (G+ and G-), the zero-padded rows of the second one too.
    assert stats["pcm.devices_written"] == programmings * 2 * (2 * 256) * OUT
    cycles = programmings * PcmBackend.Config().cost.program_verify_iterations
    assert stats["pcm.max_write_cycles"] == cycles


def _two_matmul_case(first: nn.Module):
    torch.manual_seed(0)
    block = nn.Sequential(first, nn.Linear(20, 48), nn.ReLU(), nn.Linear(48, 10))
    params = {n: p.detach().clone() for n, p in block.named_parameters()}
    return block, params, torch.randn(6, 20), torch.randn(6, 10)


def test_every_matmul_of_a_hidden_block_reads_its_input_gradient_through_its_tiles():
    stats = _step(_analog(), *_two_matmul_case(nn.Identity())).stats()
    # One tile per matrix, six vectors each.
    assert stats["pcm.mvm_transposed_mvms"] == 2 * 6
    assert stats["pcm.mvm_transposed_macs"] == 6 * (20 * 48 + 48 * 10)
    assert stats["pcm.mvm_recompute_mvms"] == stats["pcm.mvm_mvms"] == 2 * 6


@pytest.mark.parametrize(
    "first, num_transposed",
    [(nn.Identity(), 1), (nn.Tanh(), 1), (nn.LayerNorm(20), 2)],
    ids=["data", "activation-of-data", "norm-with-parameters"],
)
def test_first_layer_skips_only_the_input_gradient_of_the_data(first, num_transposed):
    """The node drops layer 0's input gradient; a matmul after a parameter still needs its."""
    block, params, x, grad_y = _two_matmul_case(first)
    backend = _step(_analog(), block, params, x, grad_y, layer=0)
    assert backend.stats()["pcm.mvm_transposed_mvms"] == num_transposed * 6
    assert backend.stats()["pcm.mvm_recompute_mvms"] == 2 * 6
    # The backend still returns the data's gradient (Backend.backward's contract).
    torch.manual_seed(1)
    grad_x, _ = backend.backward(0, block, params, x, grad_y)
    assert grad_x.shape == x.shape


@pytest.mark.parametrize("drift_time_s", [0.0, 1e4])
def test_streaming_recompute_reproduces_the_forward_values(drift_time_s):
    """The backward of tanh uses 1 - y^2 of the re-run: it must be the forward's y.

    At 1e4 s the arrays have drifted to ~0.7 of their conductance; only a re-run that applies
    the forward's drift compensation gives back the same pre-activations.
    """
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(20, 48), nn.Tanh())
    params = {n: p.detach().clone() for n, p in block.named_parameters()}
    x, grad_y = torch.randn(6, 20), torch.randn(6, 48)
    backend = _analog(drift_time_s=drift_time_s).build()
    torch.manual_seed(1)
    y = backend.forward(0, block, params, x)
    torch.manual_seed(1)
    _, grads = backend.backward(0, block, params, x, grad_y)
    delta = grad_y * (1 - y**2)
    torch.testing.assert_close(grads["0.weight"], delta.T @ x)
    torch.testing.assert_close(grads["0.bias"], delta.sum(dim=0))
