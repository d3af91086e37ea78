from __future__ import annotations

import pytest
import torch
from torch import nn

from core.cost.profile import profile_modules
from core.cost.workload import LayerProfile, Workload
from emulator.cost.gpt import GPT_SPECS, gpt_workload


def _layer(**overrides) -> LayerProfile:
    fields = dict(
        name="fc",
        num_params=10,
        weight_bytes=20.0,
        grad_bytes=20.0,
        forward_flops=100.0,
        activation_bytes=8.0,
    )
    return LayerProfile(**{**fields, **overrides})


def test_backward_defaults_to_twice_forward():
    assert _layer().backward_flops == 200.0
    assert _layer(backward_flops=50.0).backward_flops == 50.0


def test_sparsity_only_scales_the_weight_flops():
    layer = _layer(weight_flops_fraction=0.8, weight_density=0.25)
    # 20 FLOPs do not touch weights; 80 shrink to 20.
    assert layer.effective_flops(100.0) == pytest.approx(40.0)
    assert _layer().effective_flops(100.0) == 100.0


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"weight_bytes": -1.0}, "weight_bytes"),
        ({"forward_flops": -1.0}, "forward_flops"),
        ({"backward_flops": -2.0}, "backward_flops"),
        ({"weight_density": 1.5}, "weight_density"),
    ],
)
def test_layer_rejects_impossible_values(overrides, field):
    with pytest.raises(ValueError, match=rf"^{field} = .* of layer 'fc' is not valid"):
        _layer(**overrides)


def test_workload_validation():
    with pytest.raises(ValueError, match="samples_per_step = 0"):
        Workload(name="w", layers=(_layer(),), samples_per_step=0)
    with pytest.raises(ValueError, match="unique names"):
        Workload(name="w", layers=(_layer(), _layer()), samples_per_step=1)
    with pytest.raises(ValueError, match="is empty"):
        Workload(name="w", layers=(), samples_per_step=1)


def test_profile_modules_counts_flops_per_sample_and_leaves_the_model_alone():
    torch.manual_seed(0)
    blocks = [
        ("hidden", nn.Sequential(nn.Linear(8, 16), nn.ReLU())),
        ("head", nn.Linear(16, 4)),
    ]
    before = blocks[0][1][0].weight.detach().clone()
    workload = profile_modules("mlp", blocks, torch.randn(4, 8), samples_per_step=32)
    hidden, head = workload.layers
    assert (hidden.num_params, head.num_params) == (8 * 16 + 16, 16 * 4 + 4)
    assert hidden.weight_bytes == hidden.num_params * 2  # fp16
    assert hidden.forward_flops == 2 * 8 * 16
    # The first block has no input gradient: only the weight gradient.
    assert hidden.backward_flops == 2 * 8 * 16
    assert head.forward_flops == 2 * 16 * 4
    assert head.backward_flops == 2 * 2 * 16 * 4
    assert (hidden.activation_bytes, head.activation_bytes) == (8 * 2, 16 * 2)
    assert workload.samples_per_step == 32
    weight = blocks[0][1][0].weight
    assert weight.device.type == "cpu" and torch.equal(weight.detach(), before)


def test_profile_modules_counts_convolutions():
    conv = nn.Conv2d(1, 4, kernel_size=3, padding=1)
    workload = profile_modules(
        "cnn", [("conv", conv)], torch.zeros(2, 1, 8, 8), samples_per_step=2, precision="fp32"
    )
    (layer,) = workload.layers
    assert layer.forward_flops == 2 * 8 * 8 * 4 * 9
    assert layer.weight_bytes == (4 * 9 + 4) * 4


@pytest.mark.parametrize(
    "model, billions",
    [("gpt3-125m", 0.125), ("gpt3-1.3b", 1.3), ("gpt3-13b", 13.0), ("gpt3-175b", 175.0)],
)
def test_gpt_sizes_match_their_names(model, billions):
    # Within 5%: the paper's names are rounded (125M counts ~124M with embeddings).
    assert gpt_workload(model).num_params / 1e9 == pytest.approx(billions, rel=0.05)


def test_brain_scale_models_are_as_stated():
    assert gpt_workload("gpt-1t").num_params == pytest.approx(1.008e12, rel=0.01)
    assert gpt_workload("gpt-120t").num_params == pytest.approx(118.8e12, rel=0.01)


def test_gpt_block_flops_include_attention():
    spec = GPT_SPECS["gpt3-1.3b"]
    block = gpt_workload("gpt3-1.3b").layers[1]
    d, s = spec.d_model, spec.seq_len
    assert block.forward_flops == 24 * d * d * s + 4 * s * s * d
    assert block.weight_flops_fraction == pytest.approx(24 * d / (24 * d + 4 * s))
    # Checkpointing recomputes the forward during backward.
    assert block.backward_flops == 3 * block.forward_flops
    full = gpt_workload("gpt3-1.3b", activation_checkpointing=False).layers[1]
    assert full.backward_flops == 2 * full.forward_flops
    assert full.activation_bytes > block.activation_bytes == s * d * 2


def test_gpt_batch_and_sequence_overrides():
    workload = gpt_workload("gpt3-175b", batch_size=64, seq_len=1024)
    assert (workload.samples_per_step, workload.tokens_per_sample) == (64, 1024)
    assert gpt_workload("gpt3-175b").samples_per_step == 1536  # 3.2M tokens


def test_sparse_gpt_streams_fewer_bytes():
    dense = gpt_workload("gpt3-1.3b").layers[1]
    sparse = gpt_workload("gpt3-1.3b", weight_density=0.25).layers[1]
    # Values at 25% plus a one-bit-per-weight bitmap.
    assert sparse.weight_bytes == pytest.approx(dense.num_params * (0.25 * 2 + 1 / 8))


def test_unknown_gpt_model_lists_the_sizes():
    with pytest.raises(ValueError, match=r"Unknown GPT model 'gpt3-9b'; choose one of gpt3-125m"):
        gpt_workload("gpt3-9b")
