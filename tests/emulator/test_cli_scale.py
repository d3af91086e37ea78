"""``wafer scale`` as a user runs it: a real process, a real local Ray, real gRPC."""

from __future__ import annotations

import json

import pytest

from tests.emulator.test_cli import _one_paragraph_error, wafer


def test_batch_that_does_not_split_names_the_fix():
    result = wafer("scale", "--model", "mlp-digits", "--nodes", "1,2,3", "--batch-size", "64")
    _one_paragraph_error(result, "--batch-size 64", "[3]", "multiple of 6")


def test_nodes_per_process_must_be_auto_or_a_count():
    result = wafer("scale", "--model", "mlp-digits", "--nodes", "1", "--nodes-per-process", "x")
    _one_paragraph_error(result, "--nodes-per-process 'x'", "auto")


def test_repeats_must_be_a_positive_count():
    result = wafer("scale", "--model", "mlp-digits", "--nodes", "1", "--repeats", "0")
    _one_paragraph_error(result, "--repeats 0", "1 or more")


@pytest.mark.integration
def test_scale_runs_each_size_and_reports_both_curves(tmp_path):
    out, plot = tmp_path / "scale.json", tmp_path / "scale.png"
    result = wafer(
        "scale",
        "--model",
        "mlp-digits",
        "--nodes",
        "1,2",
        "--steps",
        "2",
        "--batch-size",
        "32",
        "--repeats",
        "2",
        "--json",
        str(out),
        "--plot",
        str(plot),
    )
    assert result.returncode == 0, result.stderr
    assert "wafer scale: mlp-digits" in result.stdout
    report = json.loads(out.read_text())
    assert report["failed"] is None and report["repeats"] == 2
    assert [p["nodes"] for p in report["points"]] == [1, 2]
    for point in report["points"]:
        assert point["measured"]["emulated_step_time_s"] > 0
        assert point["predicted"]["step_time_s"] > 0
        # The emulated clock and the analytic model price the same workload.
        ratio = point["measured"]["emulated_step_time_s"] / point["predicted"]["step_time_s"]
        assert 0.5 < ratio < 2, ratio
        assert point["wall_step_time_s"] > 0
        # Both runs of the size (1, 2, then 2, 1); the point is the slower, the upper median.
        assert len(point["wall_step_time_s_runs"]) == 2
        assert point["wall_step_time_s"] == max(point["wall_step_time_s_runs"])
        assert point["time_to_first_step_s"] >= point["launch_time_s"] > 0
        assert point["peak_memory_bytes"] > point["memory_per_emulated_node_bytes"] > 0
    assert plot.stat().st_size > 0
