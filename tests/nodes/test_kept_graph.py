"""A kept forward graph (``nodes.backend.KeptGraph``) against the backward recompute.

A backend that ``keeps_forward_graph`` runs the backward from the forward's autograd graph,
with the weights streamed in again substituted for the ones the graph would have saved. The
results must be bitwise those of recomputing the layer from its input (what every other
backend does), dropout included, and the graph must hold no weights between the passes.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch
from torch import nn

from core.zoo import GPTShape
from emulator.config import load_config
from emulator.prepare import prepare_layers
from emulator.zoo.gpt import build_gpt
from nodes.backend import KeptGraph, KeptInput, vector_jacobian
from nodes.cs2.backend import Cs2Backend
from nodes.registry import BACKEND_CONFIGS
from nodes.worker import NodeWorker

_GPT = GPTShape(
    num_layers=1, d_model=32, num_heads=4, d_ff=64, seq_len=12, vocab_size=40, dropout=0.2
)


def _gpt_block(index: int) -> nn.Module:
    torch.manual_seed(0)
    return build_gpt(_GPT)[index]


BLOCKS = {
    "mlp-dropout": (
        lambda: nn.Sequential(nn.Linear(20, 48), nn.ReLU(), nn.Dropout(0.3), nn.Linear(48, 10)),
        lambda: torch.randn(6, 20),
    ),
    "gpt-embedding": (lambda: _gpt_block(0), lambda: torch.randint(0, 40, (3, 12))),
    "gpt-block": (lambda: _gpt_block(1), lambda: torch.randn(3, 12, 32)),
    "gpt-head": (lambda: _gpt_block(2), lambda: torch.randn(3, 12, 32)),
}


#: A layer after the first, whose input gradient the backward computes.
LAYER = 1


def _seeded(seed: int, fn):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn()


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_kept_graph_is_bitwise_the_recompute(name, precision):
    """A layer after the first (layer 0 takes the data: no input gradient, below)."""
    make_block, make_input = BLOCKS[name]
    torch.manual_seed(1)
    block, x = make_block().train(), make_input()
    backend = Cs2Backend.Config(precision=precision).build()
    wire = backend.operand_dtype
    params = {n: p.detach().to(wire).clone() for n, p in block.named_parameters()}
    streamed_again = {n: p.clone() for n, p in params.items()}

    y_recompute = _seeded(7, lambda: backend.forward(LAYER, block, params, x))
    y, kept = _seeded(7, lambda: backend.train_forward(LAYER, block, params, x))
    assert isinstance(kept, KeptGraph)
    assert torch.equal(y, y_recompute) and y.grad_fn is None
    grad_y = torch.randn_like(y)
    grad_x_recompute, grads_recompute = _seeded(
        7, lambda: backend.backward(LAYER, block, params, x, grad_y)
    )
    # The graph holds no weight: whatever the forward's buffers hold afterwards is not read.
    for p in params.values():
        p.fill_(float("nan"))
    assert kept.weight_bytes() == 0
    assert kept.tensors(), "the graph holds the forward's activations"
    grad_x, grads = kept.backward(backend, LAYER, block, streamed_again, grad_y)

    assert (grad_x is None) == (grad_x_recompute is None)
    if grad_x is not None:
        assert torch.equal(grad_x, grad_x_recompute)
    assert grads.keys() == grads_recompute.keys()
    for n, g in grads.items():
        assert torch.equal(g, grads_recompute[n]), n
        assert g.is_contiguous() and g.abs().max() > 0, n
    assert kept.tensors() == [] and kept.weight_bytes() == 0  # all dropped after the backward


@pytest.mark.parametrize("name", ["mlp-dropout", "gpt-block"])
def test_the_data_layer_computes_no_input_gradient_and_the_same_weight_gradients(name):
    """Layer 0's input is the data: its kept graph gives no input gradient (``wafer
    simulate``'s count has none either) and bitwise the weight gradients of a layer whose
    input gradient is computed."""
    make_block, make_input = BLOCKS[name]
    torch.manual_seed(1)
    block, x = make_block().train(), make_input()
    backend = Cs2Backend.Config().build()
    params = {n: p.detach().clone() for n, p in block.named_parameters()}
    _, kept_data = _seeded(7, lambda: backend.train_forward(0, block, params, x))
    y, kept_hidden = _seeded(7, lambda: backend.train_forward(1, block, params, x))
    grad_y = torch.randn_like(y)
    grad_x0, grads0 = kept_data.backward(backend, 0, block, params, grad_y)
    grad_x1, grads1 = kept_hidden.backward(backend, 1, block, params, grad_y)
    assert grad_x0 is None and grad_x1 is not None
    assert grads0.keys() == grads1.keys()
    for n, g in grads0.items():
        assert torch.equal(g, grads1[n]), n


def test_backward_weights_of_another_shape_are_refused():
    block = nn.Linear(4, 3)
    backend = Cs2Backend.Config().build()
    params = {n: p.detach().clone() for n, p in block.named_parameters()}
    _, kept = backend.train_forward(0, block, params, torch.randn(2, 4))
    wrong = dict(params, weight=torch.zeros(3, 5))
    with pytest.raises(ValueError, match="weight streamed for the backward has shape"):
        kept.backward(backend, 0, block, wrong, torch.ones(2, 3))


@pytest.mark.parametrize("kind", sorted(BACKEND_CONFIGS))
def test_only_backends_that_keep_the_graph_skip_the_recompute(kind):
    backend = BACKEND_CONFIGS[kind]().build()
    block = nn.Linear(8, 8)
    params = {n: p.detach().clone() for n, p in block.named_parameters()}
    _, held = backend.train_forward(0, block, params, torch.randn(2, 8))
    expected = KeptGraph if backend.keeps_forward_graph else KeptInput
    assert isinstance(held, expected)


class _RecomputingCs2(Cs2Backend):
    """The digital wafer as it ran before graphs were kept: the backward recomputes."""

    keeps_forward_graph = False


def _one_step(backend, layers, dataset, config, weights):
    worker = NodeWorker(
        rank=1,
        num_nodes=2,
        layers=layers,
        dataset=dataset,
        batch_size=config.batch_size,
        seed=config.seed,
        backend=backend,
    )
    step, forward, backward, mid_step = 3, [], {}, {}
    for index, params in enumerate(weights):
        forward.append(worker.forward(index, step, params))
    mid_step = {
        "process": worker.activation_bytes,
        "modelled": worker.layer_input_bytes,
        "weights": worker.weight_bytes_held,
    }
    for index in reversed(range(len(weights))):
        backward[index] = worker.backward(index, step, weights[index])
    after = (worker.activation_bytes, worker.layer_input_bytes, worker.weight_bytes_held)
    return worker, forward, backward, mid_step, after


@pytest.mark.parametrize("model", ["mlp-digits", "cnn-digits", "gpt-tiny"])
def test_node_step_with_kept_graphs_is_bitwise_the_recompute(model):
    overrides = {"model.name": model, "num_nodes": 2, "batch_size": 8}
    if model.startswith("gpt"):
        overrides["model.dropout"] = 0.1  # masks must match between the two paths
    config = load_config(overrides=overrides)
    layers, dataset = prepare_layers(config)
    weights = [{n: p.detach().clone() for n, p in layer.named_parameters()} for layer in layers]
    kept = _one_step(config.backend.build(), layers, dataset, config, weights)
    recomputed = _one_step(_RecomputingCs2(config.backend), layers, dataset, config, weights)

    _, forward, backward, mid_step, after = kept
    _, forward_ref, backward_ref, mid_step_ref, after_ref = recomputed
    timings = {"compute_seconds": 0, "cpu_seconds": 0}
    assert [dataclasses.asdict(r) | timings for r in forward] == [
        dataclasses.asdict(r) | timings for r in forward_ref
    ]
    for index, (grads, result) in backward.items():
        grads_ref, result_ref = backward_ref[index]
        assert result.flops == result_ref.flops
        for n, g in grads.items():
            assert torch.equal(g, grads_ref[n]), (index, n)
    # The modelled node keeps each layer's input either way; this process keeps the graphs'
    # saved activations, and no weights: for an MLP the same tensors (a ReLU saves its output,
    # the next layer's input), for a CNN or a transformer block more (attention, GELU, ...).
    assert mid_step["modelled"] == mid_step_ref["modelled"] > 0
    assert kept[0].peak_layer_input_bytes == recomputed[0].peak_layer_input_bytes
    assert mid_step_ref["process"] > 0
    if model == "mlp-digits":
        assert mid_step["process"] == mid_step_ref["process"]
    else:
        assert mid_step["process"] > mid_step_ref["process"]
    assert mid_step["weights"] == mid_step_ref["weights"] == 0
    assert after == after_ref == (0, 0, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vector_jacobian_is_bitwise_torch_autograd_grad(dtype):
    torch.manual_seed(3)
    block = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).to(dtype)
    unused = torch.randn(3, requires_grad=True, dtype=dtype)  # allow_unused: None comes back
    x = torch.randn(7, 6, dtype=dtype, requires_grad=True)
    inputs = [x, *block.parameters(), unused]
    y = block(x)
    grad_y = torch.randn_like(y)
    expected = torch.autograd.grad(y, inputs, grad_y, allow_unused=True, retain_graph=True)
    got = vector_jacobian(y, inputs, grad_y)
    assert got[-1] is None and expected[-1] is None
    for g, e in zip(got[:-1], expected[:-1], strict=True):
        assert g.dtype == e.dtype and torch.equal(g, e)
    with pytest.raises(ValueError, match=r"has shape \(7, 5\), the layer's output \(7, 4\)"):
        vector_jacobian(block(x), inputs, torch.ones(7, 5, dtype=dtype))


def test_a_node_backward_imports_no_symbolic_shapes():
    """torch.autograd.grad's own check imports sympy (~0.5 CPU s per node process)."""
    code = (
        "import sys, torch\n"
        "from torch import nn\n"
        "from nodes.backend import autograd_backward, call_block\n"
        "from nodes.cs2.backend import Cs2Backend\n"
        "backend = Cs2Backend.Config().build()\n"
        "block = nn.Linear(4, 3)\n"
        "params = {n: p.detach().clone() for n, p in block.named_parameters()}\n"
        "y, kept = backend.train_forward(0, block, params, torch.randn(2, 4))\n"
        "kept.backward(backend, 0, block, params, torch.ones_like(y))\n"
        "autograd_backward(call_block, block, params, torch.randn(2, 4), torch.ones(2, 3))\n"
        "print(sorted(m for m in ('sympy', 'torch.fx.experimental.symbolic_shapes')"
        " if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_a_node_built_from_the_drivers_skeleton_imports_no_symbolic_shapes():
    """The skeleton a node gets is already on the meta device; stripping it again with
    ``empty_like`` ran torch's Python meta kernel (sympy: ~1 s of CPU per host process)."""
    code = (
        "import copy, sys, torch\n"
        "from torch import nn\n"
        "from core.data import DataConfig\n"
        "from nodes.cs2.backend import Cs2Backend\n"
        "from nodes.worker import NodeWorker, strip_parameters\n"
        "layer = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 10))\n"
        "skeleton = [strip_parameters(copy.deepcopy(layer))]\n"
        "worker = NodeWorker(rank=0, num_nodes=2, layers=skeleton,\n"
        "    dataset=DataConfig().build(seed=0), batch_size=8, seed=0,\n"
        "    backend=Cs2Backend.Config().build())\n"
        "assert all(p.device.type == 'meta' for p in worker.layers[0].parameters())\n"
        "assert worker.layouts == [[(n, tuple(p.shape)) for n, p in layer.named_parameters()]]\n"
        "print(sorted(m for m in ('sympy', 'torch._dynamo', 'torch.fx.experimental.symbolic_shapes')"
        " if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
