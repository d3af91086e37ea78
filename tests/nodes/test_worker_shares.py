"""Unequal batch shares (heterogeneous clusters): the nodes' gradients still sum exactly."""

from __future__ import annotations

import torch

from emulator.config import load_config
from emulator.prepare import prepare_layers
from nodes.worker import NodeWorker


def _step_gradients(config, layers, dataset, weights, *, rank, num_nodes, share):
    worker = NodeWorker(
        rank=rank,
        num_nodes=num_nodes,
        layers=layers,
        dataset=dataset,
        batch_size=config.batch_size,
        seed=config.seed,
        backend=config.backend.build(),
        share=share,
    )
    for index, params in enumerate(weights):
        worker.forward(index, 5, params)
    return {
        index: worker.backward(index, 5, weights[index])[0]
        for index in reversed(range(len(weights)))
    }


def test_unequal_shares_sum_to_the_global_mean_gradient():
    config = load_config(overrides={"model.name": "mlp-digits", "num_nodes": 1, "batch_size": 60})
    layers, dataset = prepare_layers(config)
    weights = [{n: p.detach().clone() for n, p in layer.named_parameters()} for layer in layers]
    whole = _step_gradients(config, layers, dataset, weights, rank=0, num_nodes=1, share=None)
    spans = [(0, 7), (7, 50), (50, 60)]
    parts = [
        _step_gradients(config, layers, dataset, weights, rank=r, num_nodes=3, share=span)
        for r, span in enumerate(spans)
    ]
    for index, grads in whole.items():
        for name, grad in grads.items():
            summed = sum(part[index][name] for part in parts)
            assert torch.allclose(summed, grad, rtol=1e-5, atol=1e-7), (index, name)
            assert grad.abs().max() > 0


def test_equal_spans_are_bitwise_the_equal_shards():
    config = load_config(overrides={"model.name": "mlp-digits", "num_nodes": 2, "batch_size": 64})
    layers, dataset = prepare_layers(config)
    weights = [{n: p.detach().clone() for n, p in layer.named_parameters()} for layer in layers]
    for rank, span in enumerate([(0, 32), (32, 64)]):
        sharded = _step_gradients(
            config, layers, dataset, weights, rank=rank, num_nodes=2, share=None
        )
        spanned = _step_gradients(
            config, layers, dataset, weights, rank=rank, num_nodes=2, share=span
        )
        for index, grads in sharded.items():
            for name, grad in grads.items():
                assert torch.equal(grad, spanned[index][name])
