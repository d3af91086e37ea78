"""The photonic engine of the emulated clock counts what a photonic node's counters count."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from emulator.config import load_config
from emulator.cost.gpt import gpt_workload
from emulator.cost.stats import predict
from tests.nodes.replay import replay, summed


def _config(training: str):
    overrides = {"backend.kind": "photonic", "backend.training": training}
    overrides |= {"backend.mesh_size": 8, "backend.num_cores": 3}
    overrides |= {"model.name": "mlp-digits", "num_nodes": 1, "batch_size": 8}
    return load_config(overrides=overrides)


def _small_mlp() -> nn.Sequential:
    """64-20-10 on the digits: a few tiles of 8 modes, so the physics runs in a second."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Sequential(nn.Linear(64, 20), nn.ReLU()), nn.Linear(20, 10))


@pytest.mark.parametrize(
    ("training", "parts"),
    [("ffm", ("mvm", "ffm_error")), ("dfa", ("mvm", "dfa_projection"))],
)
def test_engine_matches_the_node_counters_of_a_training_step(training, parts):
    counters, costs = replay(_config(training), _small_mlp())
    for part in parts:
        time_s, energy_j = summed(costs, part)
        assert time_s == pytest.approx(counters[f"photonic.{part}_time_s"], rel=1e-9), part
        assert energy_j == pytest.approx(counters[f"photonic.{part}_energy_j"], rel=1e-9), part
    # Programming time is exact; its heater energy is at the mean phase (pi), the node's at
    # the actual phases, which are spread over [0, 2 pi).
    time_s, energy_j = summed(costs, "program")
    assert time_s == pytest.approx(counters["photonic.program_time_s"], rel=1e-9)
    assert 0.5 < energy_j / counters["photonic.program_energy_j"] < 2


def test_backprop_trains_digitally_and_pays_deployment_once():
    config = _config("backprop")
    hardware = config.emulated_hardware
    engine = config.backend.engine(hardware)
    workload = gpt_workload("gpt3-125m", batch_size=16)
    stats = predict(workload, hardware, 2, engine=engine)
    assert set(stats.node_time_by_part_s) == {"digital"}
    deployment = engine.deployment(workload)
    assert deployment.time_by_part_s["program"] > 0 and deployment.energy_j > 0


def test_dfa_backward_streams_no_weights_and_uses_no_mesh_weights():
    config = _config("dfa")
    counters, costs = replay(config, _small_mlp())
    backward = costs[len(costs) // 2 :]
    # The output layer's error is its delta: only hidden layers project it.
    assert "dfa_projection" not in backward[0].time_by_part_s
    assert all("dfa_projection" in c.time_by_part_s for c in backward[1:])
    assert all("program" not in c.time_by_part_s for c in backward)
