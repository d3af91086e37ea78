"""The PCM engine of the emulated clock counts what a PCM node's counters count."""

from __future__ import annotations

import pytest

from emulator.config import load_config
from tests.nodes.replay import replay, summed


def _config(**backend):
    overrides = {"backend.kind": "pcm", "model.name": "mlp-digits", "num_nodes": 1}
    overrides |= {"batch_size": 16} | {f"backend.{k}": v for k, v in backend.items()}
    return load_config(overrides=overrides)


@pytest.mark.parametrize("mode", ["streaming", "weight-stationary"])
def test_engine_matches_the_node_counters_of_a_training_step(mode):
    counters, costs = replay(_config(mode=mode))
    for part in ("program", "calibration", "mvm"):
        time_s, energy_j = summed(costs, part)
        assert time_s == pytest.approx(counters[f"pcm.{part}_time_s"], rel=1e-9), part
        assert energy_j == pytest.approx(counters[f"pcm.{part}_energy_j"], rel=1e-9), part
    # Hardware-aware training: the backward pass is digital, so no array work in it.
    backward = costs[len(costs) // 2 :]
    assert all(set(c.time_by_part_s) == {"digital"} for c in backward)


@pytest.mark.parametrize("tile_cols", [256, 96])
def test_analog_backward_counts_recompute_transposed_reads_and_reprogramming(tile_cols):
    counters, costs = replay(_config(**{"training.backward": "analog", "tile.cols": tile_cols}))
    for part in ("program", "calibration", "mvm", "mvm_recompute", "mvm_transposed"):
        time_s, energy_j = summed(costs, part)
        assert time_s == pytest.approx(counters[f"pcm.{part}_time_s"], rel=1e-9), part
        assert energy_j == pytest.approx(counters[f"pcm.{part}_energy_j"], rel=1e-9), part
    # Streaming: each layer is programmed again for its backward.
    forward_program, _ = summed(costs[: len(costs) // 2], "program")
    assert summed(costs, "program")[0] == pytest.approx(2 * forward_program)


def test_sparsity_does_not_speed_up_the_arrays():
    from emulator.cost.gpt import gpt_workload
    from emulator.cost.sparsity import with_sparsity
    from emulator.cost.stats import predict

    config = _config()
    hardware = config.emulated_hardware
    workload = gpt_workload("gpt3-125m", batch_size=64)
    sparse = with_sparsity(workload, 0.9)
    pcm = config.backend.engine(hardware)
    dense_pcm = predict(workload, hardware, 4, engine=pcm)
    sparse_pcm = predict(sparse, hardware, 4, engine=pcm)
    assert sparse_pcm.node_time_by_part_s["mvm"] == pytest.approx(
        dense_pcm.node_time_by_part_s["mvm"]
    )
    # The digital wafer skips zero weights.
    assert predict(sparse, hardware, 4).step_time_s < predict(workload, hardware, 4).step_time_s


def test_streaming_a_large_model_is_programming_bound_and_reports_endurance():
    from emulator.cost.gpt import gpt_workload
    from emulator.cost.stats import predict

    config = _config()
    hardware = config.emulated_hardware
    engine = config.backend.engine(hardware)
    stats = predict(gpt_workload("gpt3-1.3b"), hardware, 4, engine=engine)
    parts = stats.node_time_by_part_s
    assert parts["program"] > 0 and parts["mvm"] > 0 and parts["digital"] > 0
    assert stats.step_time_s >= sum(parts.values())
    assert stats.energy_by_component_j["pcm"] > 0
    details = engine.details(stats.step_time_s)
    assert details["endurance_steps"] == pytest.approx(1e8 / 10)
    assert details["endurance_lifetime_s"] == pytest.approx(1e7 * stats.step_time_s)


def test_weight_stationary_refuses_a_model_beyond_its_chips():
    from emulator.cost.gpt import gpt_workload
    from emulator.cost.stats import predict

    config = _config(mode="weight-stationary")
    hardware = config.emulated_hardware
    engine = config.backend.engine(hardware)
    with pytest.raises(ValueError, match=r"needs 1887 arrays .* raise num_chips to at least 30"):
        predict(gpt_workload("gpt3-125m"), hardware, 1, engine=engine)
    # mlp-digits (3 matrices, 3 arrays) fits one chip.
    config = _config(mode="weight-stationary")
    counters, _costs = replay(config)
    assert counters["pcm.arrays_in_use"] == 3
