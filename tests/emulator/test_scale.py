"""emulator.scale without a cluster: repeats, medians, the JSON written as runs finish."""

from __future__ import annotations

import dataclasses
import json

import pytest

from emulator import scale
from emulator.config import load_config

WALLS = {1: [0.30, 0.10, 0.20], 2: [0.50, 0.70, 0.60], 4: [0.90, 1.30, 1.10]}


def _point(nodes: int, wall_s: float) -> scale.ScalePoint:
    return scale.ScalePoint(
        nodes=nodes,
        emulated_step_time_s=1e-5 * nodes,
        emulated_bound="compute",
        predicted_step_time_s=None,
        wall_step_time_s=wall_s,
        time_to_first_step_s=10 * wall_s,  # tells which run a point came from
        launch_time_s=1.0,
        peak_memory_bytes=nodes << 20,
        memory_per_emulated_node_bytes=1 << 20,
        num_processes=3,
        nodes_per_process=1,
        num_emulated_nodes=nodes + 1,
        final_loss=1.0,
        wall_step_time_s_runs=(wall_s,),
    )


@pytest.fixture
def fake_runs(monkeypatch):
    """run_point answers from WALLS (each size's next wall time) and logs the order."""
    order: list[int] = []
    fail_at: dict = {}

    def run_point(config, workload, *, progress):
        n = config.num_nodes
        if fail_at.get("call") == len(order):
            raise RuntimeError(f"{n} nodes do not fit")
        order.append(n)
        return _point(n, WALLS[n][order.count(n) - 1])

    monkeypatch.setattr(scale, "run_point", run_point)
    monkeypatch.setattr(scale, "predicted_workload", lambda config: None)
    return order, fail_at


def _config():
    return load_config(overrides={"model.name": "mlp-digits", "batch_size": 64, "num_steps": 2})


def test_repeats_alternate_the_order_and_keep_each_size_s_median_run(fake_runs, tmp_path):
    order, _ = fake_runs
    out = tmp_path / "scale.json"
    points, failed = scale.run_scale(_config(), [1, 2, 4], repeats=3, json_path=str(out))
    assert failed is None
    assert order == [1, 2, 4, 4, 2, 1, 1, 2, 4]
    assert [p.wall_step_time_s for p in points] == [0.20, 0.60, 1.10]
    assert [p.time_to_first_step_s for p in points] == pytest.approx([2.0, 6.0, 11.0])
    assert [p.wall_step_time_s_runs for p in points] == [tuple(WALLS[n]) for n in (1, 2, 4)]
    report = json.loads(out.read_text())
    assert report["repeats"] == 3 and report["failed"] is None
    assert [p["wall_step_time_s_runs"] for p in report["points"]] == [WALLS[n] for n in (1, 2, 4)]
    table = scale.scale_table(_config(), points)
    assert "600 ms (500-700)" in table
    scale.plot_scale(points, str(tmp_path / "scale.png"))
    assert (tmp_path / "scale.png").stat().st_size > 0


def test_one_run_per_size_by_default(fake_runs):
    order, _ = fake_runs
    points, _ = scale.run_scale(_config(), [1, 2])
    assert order == [1, 2]
    assert [p.wall_step_time_s_runs for p in points] == [(0.30,), (0.50,)]
    assert "ms (" not in scale.scale_table(_config(), points)


def test_a_failure_in_a_later_repeat_keeps_every_run_before_it(fake_runs, tmp_path):
    order, fail_at = fake_runs
    fail_at["call"] = 4  # repeat 1 runs 4 (call 3), then 2 fails
    out = tmp_path / "scale.json"
    points, failed = scale.run_scale(_config(), [1, 2, 4], repeats=2, json_path=str(out))
    assert order == [1, 2, 4, 4]
    assert failed["nodes"] == 2 and failed["repeat"] == 1 and "do not fit" in failed["error"]
    assert [len(p.wall_step_time_s_runs) for p in points] == [1, 1, 2]
    report = json.loads(out.read_text())
    assert report["failed"] == failed and len(report["points"]) == 3


@pytest.mark.parametrize("repeats", [0, -1, True, 1.5])
def test_repeats_must_be_a_positive_count(repeats):
    with pytest.raises(ValueError, match="--repeats"):
        scale.check_repeats(repeats)


def test_median_point_of_an_even_count_is_the_upper_one():
    runs = [_point(2, w) for w in (0.4, 0.1, 0.3, 0.2)]
    middle = scale.median_point(runs)
    assert middle.wall_step_time_s == 0.3
    assert middle.wall_step_time_s_runs == (0.4, 0.1, 0.3, 0.2)
    assert dataclasses.replace(middle, wall_step_time_s_runs=()) == dataclasses.replace(
        runs[2], wall_step_time_s_runs=()
    )
