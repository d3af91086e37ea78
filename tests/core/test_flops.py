"""Shape-counted FLOPs (core.cost.flops) against FlopCounterMode, layer kind by layer kind."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from core.cost.flops import analytic_block
from core.cost.profile import (
    block_flops,
    block_matmuls,
    counted_flops,
    hooked_matmuls,
    shape_forward,
)


def _frozen(module: nn.Module) -> nn.Module:
    module.weight.requires_grad_(False)
    return module


CASES = {
    "linear": (nn.Linear(8, 16), (4, 8), torch.float32),
    "linear-no-bias-3d": (nn.Linear(8, 16, bias=False), (2, 5, 8), torch.float32),
    "linear-frozen-weight": (_frozen(nn.Linear(8, 16)), (4, 8), torch.float32),
    "mlp": (
        nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Dropout(0.1), nn.Linear(32, 4)),
        (6, 8),
        torch.float32,
    ),
    "norms": (
        nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8), nn.RMSNorm(8), nn.Softmax(-1)),
        (3, 7, 8),
        torch.float32,
    ),
    "embedding": (
        nn.Sequential(nn.Embedding(50, 12), nn.Linear(12, 50, bias=False)),
        (3, 9),
        torch.int64,
    ),
    "conv-net": (
        nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)),
            nn.Conv2d(1, 4, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(4, 6, 3, stride=2, groups=2, padding=1, bias=False),
            nn.GroupNorm(2, 6),
            nn.AvgPool2d(2, stride=1),
            nn.Flatten(),
            nn.Linear(6, 3),
        ),
        (5, 64),
        torch.float32,
    ),
    "conv1d-dilated": (
        nn.Sequential(nn.Conv1d(3, 5, 3, dilation=2, padding="same"), nn.AdaptiveAvgPool1d(2)),
        (2, 3, 11),
        torch.float32,
    ),
    "conv3d-valid": (nn.Conv3d(2, 3, (1, 2, 3), padding="valid"), (2, 2, 4, 5, 6), torch.float32),
}


@pytest.mark.parametrize("differentiate_input", [False, True])
@pytest.mark.parametrize("name", list(CASES))
def test_shape_counts_equal_flop_counter(name, differentiate_input):
    block, shape, dtype = CASES[name]
    x = (
        torch.zeros(shape, dtype=dtype)
        if dtype.is_floating_point
        else torch.ones(shape, dtype=dtype)
    )
    assert analytic_block(block, shape, dtype, differentiate_input=differentiate_input) is not None
    forward, backward, y = block_flops(block, x, differentiate_input=differentiate_input)
    ref_forward, ref_backward, ref_y = counted_flops(
        block, x, differentiate_input=differentiate_input
    )
    assert (forward, backward) == (ref_forward, ref_backward)
    assert forward > 0
    assert (y.shape, y.dtype, y.device.type) == (ref_y.shape, ref_y.dtype, "meta")
    assert block_matmuls(block, x) == hooked_matmuls(block, x)


class _Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        return self.proj(x) @ self.proj.weight  # a product no layer declares


class _Subclass(nn.Linear):
    def forward(self, x):
        return super().forward(x) @ self.weight


@pytest.mark.parametrize(
    "block",
    [_Custom(), _Subclass(4, 4), nn.Sequential(nn.Linear(4, 4), _Custom())],
    ids=["custom", "subclass", "sequential-of-custom"],
)
def test_other_blocks_are_left_to_the_flop_counter(block):
    x = torch.zeros(3, 4)
    assert analytic_block(block, (3, 4), torch.float32, differentiate_input=True) is None
    # The fallback sees the product that the layers alone do not declare.
    forward, _, _ = block_flops(block, x, differentiate_input=True)
    assert forward == counted_flops(block, x, differentiate_input=True)[0] > 2 * 3 * 4 * 4


def test_a_hook_or_a_mismatched_input_falls_back():
    block = nn.Linear(4, 4)
    assert analytic_block(block, (3, 5), torch.float32, differentiate_input=False) is None
    assert analytic_block(block, (3, 4), torch.int64, differentiate_input=False) is None
    handle = block.register_forward_hook(lambda *args: None)
    try:
        assert analytic_block(block, (3, 4), torch.float32, differentiate_input=False) is None
    finally:
        handle.remove()


@pytest.mark.parametrize(
    "block",
    [nn.Softmax(dim=2), nn.LogSoftmax(dim=-3), nn.Flatten(start_dim=2), nn.Unflatten(3, (2, 2))],
    ids=["softmax", "log-softmax", "flatten", "unflatten"],
)
def test_a_dimension_the_input_lacks_is_left_to_torch(block):
    """Torch raises for these on a 2-D input; a count from shapes must not answer instead."""
    assert analytic_block(block, (3, 4), torch.float32, differentiate_input=False) is None
    with pytest.raises((IndexError, RuntimeError)):
        block(torch.zeros(3, 4))


def test_shape_forward_answers_from_shapes_or_runs_torch():
    block = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.ReLU())
    x = torch.empty(2, 3, 4, device="meta")
    y = shape_forward(block, x)
    assert (y.device.type, tuple(y.shape), y.dtype) == ("meta", (2, 5), torch.float32)
    # Not a standard block: it runs on the meta tensors, as before.
    y = shape_forward(_Custom().to("meta"), torch.empty(3, 4, device="meta"))
    assert (y.device.type, tuple(y.shape)) == ("meta", tuple(_Custom()(torch.zeros(3, 4)).shape))
    # A misfit raises torch's own error, from the meta forward.
    with pytest.raises(RuntimeError, match="cannot be multiplied|must have same reduction dim"):
        shape_forward(nn.Linear(5, 2, device="meta"), torch.empty(3, 4, device="meta"))
