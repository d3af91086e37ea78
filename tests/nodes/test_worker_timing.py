"""What a node's ``LayerResult`` says about a layer's time: wall time and CPU time.

``compute_seconds`` is the wall time the layer took (what the run reports);
``cpu_seconds`` the CPU time of the thread that computed it, which a thread descheduled
mid-layer does not inflate (``nodes.service`` decides by it whether a layer is short).
"""

from __future__ import annotations

import time

import pytest

from emulator.config import load_config
from emulator.prepare import prepare_layers
from nodes.worker import NodeWorker

PAUSE_S = 0.2


@pytest.fixture
def worker_and_weights():
    config = load_config(overrides={"model.name": "mlp-digits", "num_nodes": 2, "batch_size": 8})
    layers, dataset = prepare_layers(config)
    weights = [{n: p.detach().clone() for n, p in layer.named_parameters()} for layer in layers]
    worker = NodeWorker(
        rank=0,
        num_nodes=2,
        layers=layers,
        dataset=dataset,
        batch_size=config.batch_size,
        seed=config.seed,
        backend=config.backend.build(),
    )
    return worker, weights


def test_cpu_seconds_leave_out_time_the_thread_did_not_run(worker_and_weights, monkeypatch):
    worker, weights = worker_and_weights
    backend = worker.backend
    train_forward = type(backend).train_forward

    def paused_forward(*args, **kwargs):  # as if descheduled mid-layer
        time.sleep(PAUSE_S)
        return train_forward(backend, *args, **kwargs)

    monkeypatch.setattr(backend, "train_forward", paused_forward)
    results = [worker.forward(i, 0, params) for i, params in enumerate(weights)]
    for result in results:
        assert result.compute_seconds >= PAUSE_S
        assert 0 < result.cpu_seconds < PAUSE_S / 2


def test_cpu_seconds_of_a_backward_count_its_compute(worker_and_weights):
    worker, weights = worker_and_weights
    for i, params in enumerate(weights):
        worker.forward(i, 0, params)
    for i in reversed(range(len(weights))):
        _, result = worker.backward(i, 0, weights[i])
        assert 0 < result.cpu_seconds <= result.compute_seconds + 1e-3
