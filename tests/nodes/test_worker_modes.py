"""A node's layers train in training mode (dropout on), whatever mode they came in, and
an evaluation runs its layer in eval mode and gives training mode back."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from core.data import DataConfig
from nodes.cs2.backend import Cs2Backend
from nodes.worker import NodeWorker


def _worker(layers: list[nn.Module]) -> NodeWorker:
    """One cs2 node on the digits, as a cluster of one node would run it."""
    return NodeWorker(
        rank=0,
        num_nodes=1,
        layers=layers,
        dataset=DataConfig(name="digits").build(seed=0),
        batch_size=16,
        seed=0,
        backend=Cs2Backend.Config().build(),
        max_eval_samples=8,
    )


def _modes(worker: NodeWorker) -> list[bool]:
    return [module.training for layer in worker.layers for module in layer.modules()]


def test_layers_that_came_in_eval_mode_train_in_training_mode():
    torch.manual_seed(0)
    layers = [nn.Sequential(nn.Linear(64, 32), nn.Dropout(0.5)).eval(), nn.Linear(32, 10).eval()]
    weights = [{n: p.detach().clone() for n, p in layer.named_parameters()} for layer in layers]
    worker = _worker(layers)
    assert all(_modes(worker))
    seen: list[bool] = []
    dropout = worker.layers[0][1]

    def watch(module, args, out):
        if out.device.type != "meta":  # (not the FLOP count's run)
            seen.append(module.training)

    dropout.register_forward_hook(watch)
    for index, params in enumerate(weights):
        worker.evaluate(index, 0, params)
    assert seen == [False] and all(_modes(worker))
    worker.forward(0, 0, weights[0])
    assert seen == [False, True]


def test_an_evaluation_that_fails_gives_training_mode_back():
    worker = _worker([nn.Linear(64, 10)])
    with pytest.raises(RuntimeError):
        worker.evaluate(0, 0, {"weight": torch.zeros(10, 63), "bias": torch.zeros(10)})
    assert all(_modes(worker))


def _dropout_step(worker: NodeWorker, weights: list[dict], draw_between: bool) -> list[dict]:
    for index, params in enumerate(weights):
        worker.forward(index, 3, params)
        if draw_between:
            torch.rand(1000)  # other work of the process, drawing from the global generator
    grads = []
    for index in reversed(range(len(weights))):
        if draw_between:
            torch.randn(77)
        layer_grads, _ = worker.backward(index, 3, weights[index])
        grads.append(layer_grads)
    return grads


def test_dropout_masks_depend_on_the_layer_alone_not_on_draws_between_layers():
    """A node seeds torch's generator per (seed, rank, step, layer) before each layer and
    does not restore it afterwards (``nodes.worker._seed_cpu``): what the process drew
    before or between the layers must not change a step's gradients."""
    torch.manual_seed(0)
    layers = [nn.Sequential(nn.Linear(64, 32), nn.Dropout(0.5)), nn.Linear(32, 10)]
    weights = [{n: p.detach().clone() for n, p in layer.named_parameters()} for layer in layers]
    quiet = _dropout_step(_worker(layers), weights, draw_between=False)
    torch.manual_seed(123)
    busy = _dropout_step(_worker(layers), weights, draw_between=True)
    for a, b in zip(quiet, busy, strict=True):
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), name
    # The dropout did drop (equal gradients above are not those of a run without masks).
    worker = _worker(layers)
    worker.forward(0, 3, weights[0])
    assert 0.3 < (worker._next_input == 0).float().mean() < 0.7
