"""Every registered backend against the Backend contract, and the PCM backend's numerics.

Parametrized over ``nodes.registry.BACKEND_CONFIGS`` so a new backend is tested on
registration. A backend whose default config is noisy provides an ``ideal()`` variant, which
must reproduce the digital layer.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from emulator.config import load_config
from nodes.backend import Backend, autograd_backward, call_block
from nodes.pcm.analog import WeightStationary
from nodes.pcm.backend import PcmBackend, matrix_shapes
from nodes.pcm.config import load_preset
from nodes.pcm.device import PcmDevice
from nodes.pcm.modes import HardwareAware
from nodes.pcm.periphery import Periphery
from nodes.pcm.tile import Tile
from nodes.registry import BACKEND_CONFIGS
from proto.rpc import Security

KINDS = sorted(BACKEND_CONFIGS)


def _mlp_block() -> nn.Module:
    return nn.Sequential(nn.Linear(20, 48), nn.ReLU())


def _conv_block() -> nn.Module:
    return nn.Sequential(
        nn.Unflatten(1, (2, 5, 5)), nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.Flatten()
    )


def _attention_block() -> nn.Module:
    """LayerNorm, a projection, a digital score matmul between activations, a projection."""

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln = nn.LayerNorm(8)
            self.qkv = nn.Linear(8, 24)
            self.out = nn.Linear(8, 8)

        def forward(self, x):
            q, k, v = self.qkv(self.ln(x)).chunk(3, dim=-1)
            scores = torch.softmax(q @ k.transpose(-2, -1) / 8**0.5, dim=-1)
            return x + self.out(scores @ v)

    return Attention()


BLOCKS = {
    "mlp": (_mlp_block, lambda: torch.randn(6, 20)),
    "conv": (_conv_block, lambda: torch.randn(6, 50)),
    "attention": (_attention_block, lambda: torch.randn(3, 5, 8)),
}


def _case(name: str, seed: int = 0):
    torch.manual_seed(seed)
    make_block, make_input = BLOCKS[name]
    block = make_block()
    params = {n: p.detach().clone() for n, p in block.named_parameters()}
    return block, params, make_input()


def _ideal(kind: str) -> Backend.Config:
    config_cls = BACKEND_CONFIGS[kind]
    return config_cls.ideal() if hasattr(config_cls, "ideal") else config_cls()


def _digital(block, params, x):
    with torch.no_grad():
        return call_block(block, params, x)


def _digital_grads(block, params, x, grad_y):
    return autograd_backward(call_block, block, params, x, grad_y)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("block_name", sorted(BLOCKS))
def test_forward_shape_and_dtype(kind, block_name):
    block, params, x = _case(block_name)
    backend = BACKEND_CONFIGS[kind]().build()
    torch.manual_seed(1)
    y = backend.forward(0, block, params, x)
    reference = _digital(block, params, x)
    assert y.shape == reference.shape and y.dtype == torch.float32
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("block_name", sorted(BLOCKS))
def test_backward_gives_every_parameter_its_gradient(kind, block_name):
    block, params, x = _case(block_name)
    backend = BACKEND_CONFIGS[kind]().build()
    grad_y = torch.randn_like(_digital(block, params, x))
    torch.manual_seed(1)
    grad_x, grads = backend.backward(0, block, params, x, grad_y)
    assert grad_x.shape == x.shape
    assert set(grads) == set(params)
    for name, grad in grads.items():
        assert grad.shape == params[name].shape and grad.dtype == torch.float32


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("block_name", sorted(BLOCKS))
def test_ideal_variant_equals_the_digital_layer(kind, block_name):
    block, params, x = _case(block_name)
    backend = _ideal(kind).build()
    torch.manual_seed(1)
    y = backend.forward(0, block, params, x)
    torch.testing.assert_close(y, _digital(block, params, x), atol=1e-5, rtol=1e-5)
    grad_y = torch.randn_like(y)
    grad_x, grads = backend.backward(0, block, params, x, grad_y)
    want_x, want = _digital_grads(block, params, x, grad_y)
    assert torch.equal(grad_x, want_x)
    for name in params:
        assert torch.equal(grads[name], want[name])


@pytest.mark.parametrize("kind", KINDS)
def test_stats_are_named_floats(kind):
    block, params, x = _case("mlp")
    backend = BACKEND_CONFIGS[kind]().build()
    torch.manual_seed(1)
    backend.forward(0, block, params, x)
    stats = backend.stats()
    assert all(isinstance(k, str) and isinstance(v, float) for k, v in stats.items())


@pytest.mark.parametrize("block_name", sorted(BLOCKS))
def test_pcm_noisy_forward_differs_but_backward_is_exact_autograd(block_name):
    block, params, x = _case(block_name)
    backend = PcmBackend.Config().build()
    torch.manual_seed(1)
    y = backend.forward(0, block, params, x)
    digital = _digital(block, params, x)
    assert not torch.allclose(y, digital, atol=1e-4)
    # Hardware-aware training: close to the digital layer, not far off.
    assert (y - digital).abs().mean() < 0.2 * digital.abs().mean() + 0.05
    grad_y = torch.randn_like(y)
    grad_x, grads = backend.backward(0, block, params, x, grad_y)
    want_x, want = _digital_grads(block, params, x, grad_y)
    assert torch.equal(grad_x, want_x)
    for name in params:
        assert torch.equal(grads[name], want[name])


def test_pcm_analog_backward_reads_the_input_gradient_through_the_tiles():
    block, params, x = _case("mlp")
    config = PcmBackend.Config(training=HardwareAware.Config(backward="analog"))
    grad_y = torch.randn(6, 48)
    torch.manual_seed(1)
    grad_x, grads = config.build().backward(0, block, params, x, grad_y)
    want_x, _want = _digital_grads(block, params, x, grad_y)
    assert not torch.equal(grad_x, want_x)
    assert torch.nn.functional.cosine_similarity(grad_x.flatten(), want_x.flatten(), dim=0) > 0.8
    assert set(grads) == set(params)


def test_pcm_is_reproducible_from_its_seed():
    block, params, x = _case("mlp")

    def run(seed: int, torch_seed: int = 1) -> torch.Tensor:
        torch.manual_seed(torch_seed)
        return PcmBackend.Config(seed=seed).build().forward(0, block, params, x)

    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))
    # The node's per-(rank, step, layer) random state picks the noise too.
    assert not torch.equal(run(3, torch_seed=1), run(3, torch_seed=2))


def test_pcm_counts_programming_and_mvms():
    block, params, x = _case("mlp")
    backend = PcmBackend.Config().build()
    for _ in range(3):
        backend.forward(0, block, params, x)
    stats = backend.stats()
    assert stats["pcm.programmings"] == 3
    # 20 x 48 weights -> 2 x 20 x 48 devices (G+, G-), all rewritten when streamed.
    assert stats["pcm.devices_written"] == 3 * 2 * 20 * 48
    assert stats["pcm.max_write_cycles"] == 3 * backend.config.cost.program_verify_iterations
    assert stats["pcm.mvm_mvms"] == 3 * 6  # one tile, six vectors per pass
    assert stats["pcm.mvm_macs"] == 3 * 6 * 20 * 48
    assert stats["pcm.program_time_s"] > 0 and stats["pcm.program_energy_j"] > 0
    assert stats["pcm.layer.0.program_energy_j"] == stats["pcm.program_energy_j"]
    assert stats["pcm.endurance_programmings"] == pytest.approx(
        backend.config.cost.endurance_cycles / backend.config.cost.program_verify_iterations
    )
    assert stats["pcm.endurance_lifetime_s"] > 0
    assert stats["pcm.clock_s"] >= stats["pcm.program_time_s"] + stats["pcm.mvm_time_s"]


def test_weight_stationary_keeps_arrays_and_rewrites_only_changes():
    block, params, x = _case("mlp")
    backend = PcmBackend.Config(mode="weight-stationary").build()
    backend.forward(0, block, params, x)
    backend.forward(0, block, params, x)
    assert backend.stats()["pcm.programmings"] == 1
    changed = dict(params, **{"0.weight": params["0.weight"] * 1.5})
    backend.forward(0, block, changed, x)
    assert backend.stats()["pcm.programmings"] == 2
    assert backend.stats()["pcm.arrays_in_use"] == 1


def test_weight_stationary_rejects_a_model_larger_than_the_chips():
    config = PcmBackend.Config(
        mode="weight-stationary",
        tile=Tile.Config(rows=16, cols=16),
        weight_stationary=WeightStationary.Config(num_chips=1, cores_per_chip=4),
    )
    block, params, x = _case("mlp")  # 48 x 20 -> 2 x 3 = 6 tiles of 16 x 16
    with pytest.raises(ValueError, match=r"needs 6 arrays .* = 4 arrays"):
        config.build().check_layers([block])
    with pytest.raises(ValueError, match=r"needs 6 arrays"):
        config.build().forward(0, block, params, x)
    assert matrix_shapes([_conv_block()]) == [(6, 18)]


def test_drift_lowers_uncompensated_outputs_and_compensation_restores_them():
    block, params, x = _case("mlp")
    x = x.abs()
    y = {}
    for kind in ("none", "global"):
        device = dataclasses.replace(
            PcmDevice.Config(),
            drift_compensation=type(PcmDevice.Config().drift_compensation)(kind=kind),
        )
        backend = PcmBackend.Config(mode="weight-stationary", device=device).build()
        torch.manual_seed(1)
        y[kind, 0] = backend.forward(
            0, nn.Linear(20, 48), {"weight": params["0.weight"], "bias": params["0.bias"] * 0}, x
        )
        backend.advance_clock(86400.0)
        torch.manual_seed(2)
        y[kind, 1] = backend.forward(
            0, nn.Linear(20, 48), {"weight": params["0.weight"], "bias": params["0.bias"] * 0}, x
        )
    ratio_none = (y["none", 1].abs().mean() / y["none", 0].abs().mean()).item()
    ratio_global = (y["global", 1].abs().mean() / y["global", 0].abs().mean()).item()
    assert ratio_none < 0.85
    assert ratio_global == pytest.approx(1.0, abs=0.05)


def test_pcm_defaults_are_the_pcm_ibm64_preset():
    preset, config = load_preset("pcm_ibm64"), PcmBackend.Config()
    for name in ("device", "tile", "periphery", "cost", "weight_stationary", "training"):
        assert getattr(config, name) == getattr(preset, name)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"tile": {"rows": 0}}, r"^backend\.tile\.rows = 0 is not valid"),
        ({"tile": {"cols": -4}}, r"^backend\.tile\.cols = -4 is not valid"),
        (
            {"periphery": {"adc_bits": 0}},
            r"^backend\.periphery\.adc_bits = 0 is not valid.*2 to 16",
        ),
        ({"periphery": {"adc_bits": 17}}, r"^backend\.periphery\.adc_bits = 17 is not valid"),
        ({"drift_time_s": -1.0}, r"^backend\.drift_time_s = -1\.0 is not valid.*>= 0 s"),
        ({"mode": "resident"}, r"^backend\.mode = 'resident' is not valid; choose one of"),
    ],
)
def test_pcm_config_errors_name_the_field_and_number(raw, message):
    with pytest.raises(ValueError, match=message):
        load_config(overrides={"backend": {"kind": "pcm", **raw}})


def test_pcm_config_errors_when_built_in_python():
    with pytest.raises(ValueError, match=r"rows = 0 is not valid for Tile"):
        PcmBackend.Config(tile=Tile.Config(rows=0))
    with pytest.raises(ValueError, match=r"adc_bits = 0 is not valid"):
        PcmBackend.Config(periphery=Periphery.Config(adc_bits=0))
    with pytest.raises(ValueError, match=r"drift_time_s = -2\.5 is not valid"):
        PcmBackend.Config(drift_time_s=-2.5)
    with pytest.raises(ValueError, match=r"drift time t_inference = -1\.0 s"):
        PcmBackend.Config().build().advance_clock(-1.0)


def test_cli_backend_flag_selects_pcm():
    config = load_config(overrides={"backend.kind": "pcm"})
    assert isinstance(config.backend, PcmBackend.Config)
    assert config.backend.build().wire_dtype == "float32"


def test_node_stats_carry_the_backend_counters():
    from core.data import DataConfig
    from emulator.zoo import ModelConfig
    from nodes.service import ComputeNodeServicer
    from nodes.worker import NodeWorker
    from proto.messages import node_stats_to_wire

    layers = list(ModelConfig(name="mlp-digits").build(seed=0))
    weights = [{n: p.detach().clone() for n, p in layer.named_parameters()} for layer in layers]
    worker = NodeWorker(
        rank=0,
        num_nodes=1,
        layers=layers,
        dataset=DataConfig().build(seed=0),
        batch_size=16,
        seed=0,
        backend=PcmBackend.Config().build(),
    )
    worker.forward(0, 0, weights[0])
    stats = node_stats_to_wire(
        ComputeNodeServicer(worker, name="node-0", security=Security.generate()).stats()
    )
    assert stats.backend_stats["pcm.programmings"] == 1
    assert stats.backend_stats["pcm.program_energy_j"] > 0


def test_only_backends_whose_arrays_drift_have_a_drift_eval():
    from nodes.cs2 import Cs2Backend
    from nodes.photonic.backend import PhotonicBackend

    for config in (Cs2Backend.Config(), PhotonicBackend.Config.ideal(mesh_size=8)):
        with pytest.raises(
            ValueError, match=rf"backend.kind = '{config.kind}' has no analog arrays"
        ):
            config.check_drift_eval()
    pcm = PcmBackend.Config()
    pcm.check_drift_eval()
    for compensated, kind in ((True, "global"), (False, "none")):
        evaluated = pcm.drift_eval_config(compensated)
        assert evaluated.operating_mode.name == "weight-stationary"
        assert evaluated.device.drift_compensation.kind == kind
        assert evaluated.tile == pcm.tile and evaluated.training == pcm.training
