"""bench_train: one model's row, emulator against torch on the session's Ray: the emulator
trains the same losses as the torch loop, and the row holds what the tables print."""

from __future__ import annotations

import pytest

from benchmarks import bench_train


@pytest.mark.integration
def test_a_model_row_times_both_and_the_losses_agree(ray_session) -> None:
    plan = bench_train.ModelPlan("mlp-digits", (2,), num_steps=4, batch_size=64)
    [row] = bench_train.measure_model(plan, seed=0, threads=1)
    assert (row["model"], row["nodes"], row["steps"]) == ("mlp-digits", 2, 4)
    # Same seed, data and batches: the emulator's losses are torch's (to float rounding).
    assert row["max_abs_loss_diff"] < 1e-5
    assert row["ratio"] == pytest.approx(row["emulator_ms"] / row["torch_ms"])
    assert len(row["emulator_step_times_s"]) == 4
    assert row["emulator_cpu_ms"] == pytest.approx(sum(row["emulator_cpu_ms_by_process"].values()))
    assert {"driver", "memoryx", "node", "swarmx"} <= set(row["emulator_cpu_ms_by_process"])
    assert row["bytes_to_nodes_per_step"] > 0


def test_a_model_it_does_not_know_is_named(capsys) -> None:
    with pytest.raises(SystemExit):
        bench_train.main(["--models", "gpt-11m"])
    assert "unknown model(s) ['gpt-11m']" in capsys.readouterr().err
