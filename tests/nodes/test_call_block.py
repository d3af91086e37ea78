"""``nodes.backend.call_block``: a block run with streamed tensors in place of its own,
the same bits as ``torch.func.functional_call`` (which it leaves the unusual blocks to)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.utils import parametrizations

from nodes import backend
from nodes.backend import call_block


class _WithBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(6, 6)
        self.register_buffer("scale", torch.full((6,), 0.5))

    def forward(self, x):
        return self.linear(x) * self.scale


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6, bias=False)
        self.b = nn.Linear(6, 6, bias=False)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


BLOCKS = {
    "linear": lambda: nn.Linear(6, 6),
    "linear-no-bias": lambda: nn.Linear(6, 6, bias=False),
    "sequential": lambda: nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 6)),
    "layer-norm": lambda: nn.Sequential(nn.LayerNorm(6), nn.Linear(6, 6)),
    "buffer": _WithBuffer,
    "batch-norm": lambda: nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6)),
    "tied": _Tied,
    "parametrized": lambda: parametrizations.weight_norm(nn.Linear(6, 6)),
}


def _streamed(block: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    params = {
        n: torch.randn(t.shape, generator=gen).requires_grad_() for n, t in block.named_parameters()
    }
    buffers = {n: torch.rand(t.shape, generator=gen) for n, t in block.named_buffers()}
    return {**params, **buffers}


@pytest.mark.parametrize("kind", BLOCKS)
def test_the_same_bits_as_functional_call_and_the_blocks_tensors_put_back(kind):
    block = BLOCKS[kind]()
    own = {n: t for n, t in [*block.named_parameters(), *block.named_buffers()]}
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    grad_y = torch.randn(4, 6, generator=torch.Generator().manual_seed(2))
    results = []
    for run in (call_block, lambda b, p, x: functional_call(b, p, (x,), strict=True)):
        params = _streamed(block, seed=3)
        y = run(block, params, x)
        leaves = [t for t in params.values() if t.requires_grad]
        grads = torch.autograd.grad(y, leaves, grad_y, allow_unused=True)
        # (A batch norm's running statistics are updated in the streamed buffers.)
        results.append((y.detach(), grads, [t for t in params.values() if not t.requires_grad]))
        after = {n: t for n, t in [*block.named_parameters(), *block.named_buffers()]}
        assert after.keys() == own.keys() and all(after[n] is own[n] for n in own)
    (y_fast, grads_fast, buffers_fast), (y_ref, grads_ref, buffers_ref) = results
    assert torch.equal(y_fast, y_ref)
    for fast, ref in zip(grads_fast, grads_ref, strict=True):
        assert (fast is None and ref is None) or torch.equal(fast, ref)
    assert all(torch.equal(a, b) for a, b in zip(buffers_fast, buffers_ref, strict=True))


@pytest.mark.parametrize("kind", ["linear", "sequential", "buffer"])
def test_a_usual_block_takes_the_direct_way(kind, monkeypatch):
    def refused(*args, **kwargs):
        raise AssertionError("functional_call was used")

    monkeypatch.setattr(backend, "functional_call", refused)
    block = BLOCKS[kind]()
    call_block(block, _streamed(block, seed=0), torch.randn(2, 6))


@pytest.mark.parametrize("kind", ["tied", "parametrized"])
def test_an_unusual_block_is_left_to_functional_call(kind, monkeypatch):
    used = []

    def counted(*args, **kwargs):
        used.append(True)
        return functional_call(*args, **kwargs)

    monkeypatch.setattr(backend, "functional_call", counted)
    block = BLOCKS[kind]()
    call_block(block, _streamed(block, seed=0), torch.randn(2, 6))
    assert used == [True]


def test_missing_or_extra_tensors_fail_as_functional_call_does():
    block = nn.Linear(6, 6)
    params = _streamed(block, seed=0)
    with pytest.raises(RuntimeError, match="bias"):
        call_block(block, {"weight": params["weight"]}, torch.randn(2, 6))
    with pytest.raises(RuntimeError, match="extra"):
        call_block(block, {**params, "extra": torch.zeros(1)}, torch.randn(2, 6))


def test_the_blocks_tensors_are_put_back_when_the_call_fails():
    block = nn.Linear(6, 6)
    own = dict(block.named_parameters())
    with pytest.raises(RuntimeError):
        call_block(block, _streamed(block, seed=0), torch.randn(2, 5))  # wrong width
    assert all(dict(block.named_parameters())[n] is t for n, t in own.items())
