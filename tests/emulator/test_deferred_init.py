"""The layer-by-layer build (meta device + recorded init) against the whole-model build."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from emulator.config import load_config
from emulator.prepare import prepare_layers, prepare_streamed_layers
from emulator.zoo import ModelConfig
from emulator.zoo.deferred import build_deferred


@pytest.mark.parametrize(
    "overrides",
    [
        {"model.name": "mlp-digits"},
        {"model.name": "gpt-tiny", "model.num_layers": 3},
    ],
)
def test_streamed_layers_are_bitwise_the_whole_build(overrides):
    config = load_config(overrides={**overrides, "seed": 7})
    whole, _ = prepare_layers(config)
    layers, _, weights = prepare_streamed_layers(config)
    assert weights.init is not None  # the zoo model was built on the meta device
    assert all(p.device.type == "meta" for layer in layers for p in layer.parameters())
    assert len(weights) == len(whole)
    for index, layer in enumerate(whole):
        made = weights[index]
        want = dict(layer.named_parameters())
        assert list(made) == list(want)  # the order MemoryX lays the layer out in
        for name, tensor in want.items():
            assert made[name].dtype == torch.float32
            assert torch.equal(made[name], tensor.detach()), f"layer {index} {name}"
        assert weights.layer_bytes(index) == sum(t.numel() * 4 for t in want.values())


def test_layers_materialize_in_any_order_and_leave_the_global_rng_alone():
    model = ModelConfig(name="gpt-tiny")
    whole = model.build(seed=3)
    meta, init = model.build_deferred(seed=3)
    before = torch.random.get_rng_state()
    for index in reversed(range(len(whole))):
        made = init.materialize(meta[index])
        for name, tensor in whole[index].named_parameters():
            assert torch.equal(made[name], tensor.detach())
    assert torch.equal(torch.random.get_rng_state(), before)


class _Tied(nn.Module):
    """An init that reads another tensor: not replayable from a recipe."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        with torch.no_grad():
            self.b.weight.copy_(self.a.weight * 2)


class _Factories(nn.Module):
    """Weights and a buffer from factories (one random) besides a Linear's own init."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3))
        self.linear = nn.Linear(3, 4)
        self.register_buffer("mask", torch.ones(4))


def test_an_init_that_reads_other_tensors_is_not_deferred():
    assert build_deferred(_Tied) is None


def test_random_factories_and_buffers_replay_and_the_rng_advances_as_in_the_real_build():
    torch.manual_seed(11)
    whole = _Factories()
    after_real = torch.rand(3)
    torch.manual_seed(11)
    meta, init = build_deferred(_Factories)
    assert torch.equal(torch.rand(3), after_real)
    for name, tensor in init.materialize(meta).items():
        assert torch.equal(tensor, dict(whole.named_parameters())[name].detach())
    init.materialize_buffers(meta)
    assert torch.equal(meta.mask, whole.mask)
