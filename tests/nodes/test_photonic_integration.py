"""Photonic nodes on the real cluster: the in-silico vs in-situ gap, and DFA's missing backward stream."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from emulator.compare import _worker
from emulator.config import load_config
from emulator.prepare import prepare_layers
from emulator.train import train

MESH = 16


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Sequential(nn.Linear(64, 16), nn.ReLU()), nn.Linear(16, 10))


def _config(training: str, steps: int, **extra):
    # The uncalibrated device (the worst case, as the FFM paper's in-silico designs met it).
    backend = {"kind": "photonic", "training": training, "mesh_size": MESH}
    backend["device"] = {"calibration": None}
    return load_config(
        overrides={
            "backend": backend,
            "num_nodes": 1,
            "batch_size": 128,
            "num_steps": steps,
            "optimizer": {"name": "adam", "lr": 0.02},
            **extra,
        }
    )


def _twin_accuracy(config, weights) -> float:
    """The trained phases evaluated on the ideal twin (in-process, the node's own code path)."""
    twin = config.backend.twin()
    layers, dataset = prepare_layers(config, _mlp())
    worker = _worker(config, layers, dataset, twin.build(), rank=0, num_nodes=1)
    for index, params in enumerate(weights):
        result = worker.evaluate(index, 0, params)
    return result.num_correct / result.num_targets


@pytest.mark.integration
def test_twin_trained_network_loses_on_the_hardware_and_ffm_recovers(ray_session):
    torch.set_num_threads(1)
    backprop = train(_config("backprop", 80), model=_mlp(), progress=False)
    twin = _twin_accuracy(backprop.config, backprop.final_weights)
    deployed = backprop.evals[-1].accuracy  # backprop evaluates on the physical node
    in_situ = train(_config("ffm", 80), model=_mlp(), progress=False).evals[-1].accuracy
    assert twin > 0.85
    assert twin - deployed >= 0.10, (twin, deployed)
    assert in_situ >= twin - 0.03, (twin, in_situ)


@pytest.mark.integration
def test_dfa_streams_no_backward_weights_and_the_emulated_clock_shows_it(ray_session):
    runs = {
        kind: train(config, model=_mlp(), progress=False).to_json()
        for kind, config in (
            ("dfa", _config("dfa", 3)),
            ("cs2", load_config(overrides={"num_nodes": 1, "batch_size": 128, "num_steps": 3})),
        )
    }
    dfa, cs2 = runs["dfa"]["traffic"], runs["cs2"]["traffic"]
    assert dfa["weight_bytes_per_pass"] == cs2["weight_bytes_per_pass"]
    # MemoryX egress: one pass of weights instead of two; gradients unchanged.
    assert dfa["memoryx_egress_bytes"] == dfa["weight_bytes_per_pass"]
    assert cs2["memoryx_egress_bytes"] == 2 * cs2["weight_bytes_per_pass"]
    assert dfa["memoryx_ingress_bytes"] == cs2["memoryx_ingress_bytes"]
    assert dfa["num_passes_streamed"] == 1
    layers = runs["dfa"]["emulated"]["workload"]["layers"]
    assert all(layer["backward_weight_bytes"] == 0 for layer in layers)
    assert all(layer["weight_bytes"] > 0 for layer in layers)
    stream_in = {k: r["emulated"]["time_by_component_s"]["stream_in"] for k, r in runs.items()}
    assert stream_in["dfa"] == pytest.approx(stream_in["cs2"] / 2)
    assert runs["dfa"]["traffic"]["totals"]["nodes"][0]["backend"]["photonic.programmings"] > 0
