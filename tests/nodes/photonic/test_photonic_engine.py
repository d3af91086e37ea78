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


def _taichi_costs(training: str, batch: int = 1):
    from core.cost.profile import profile_modules
    from emulator.cost.compile import Cluster, compile_step
    from emulator.zoo import ModelConfig

    config = _config(training)
    model = ModelConfig(name="taichi-digits").build(seed=0)
    workload = profile_modules(
        "taichi-digits",
        [(f"layer{i}", block) for i, block in enumerate(model)],
        torch.zeros(2, 64),
        samples_per_step=batch,
    )
    engine = config.backend.engine(config.emulated_hardware)
    cluster = Cluster.Config(hardware=config.emulated_hardware, engine=engine).build()
    compiled = compile_step(workload, cluster)
    return engine, workload, [engine.op_cost(op, "fp16") for op in compiled.operations]


def test_taichi_stages_reproduce_the_calibrated_unit_pass():
    from nodes.photonic.cost import TaichiReference

    engine, workload, costs = _taichi_costs("ffm")
    num_paths = workload.layers[0].optical_passes[0].num_paths
    forward = costs[: len(costs) // 2]
    energy_per_path = sum(c.energy_by_part_j["optics"] for c in forward) / num_paths
    reference = TaichiReference(engine.cost.config.calibration)
    calibrated = reference.ops_per_pass / (reference.config.tops_per_w * 1e12)
    # The zoo's unit has the reference's couplers, channels and detectors: one sample through
    # the three stages of a path costs exactly what Taichi's efficiency allows.
    assert energy_per_path == pytest.approx(calibrated, rel=1e-12)
    # ffm's backward re-sets the phases, recomputes and sends the error through each stage.
    backward = costs[len(costs) // 2 :]
    assert all({"program", "optics", "ffm_error"} <= set(c.time_by_part_s) for c in backward)
    deployment = engine.deployment(workload)
    c = engine.cost.config
    assert deployment.energy_j == pytest.approx(
        num_paths * (576 + 144 + 64) * c.heater_power_per_pi_w * c.thermal_tuning_time_s
    )


def test_taichi_on_the_twin_is_digital_and_scales_with_the_batch():
    _, _, small = _taichi_costs("backprop", batch=1)
    _, _, large = _taichi_costs("backprop", batch=8)
    assert all(set(c.time_by_part_s) == {"digital"} for c in small)
    assert sum(c.time_s for c in large) == pytest.approx(8 * sum(c.time_s for c in small))
