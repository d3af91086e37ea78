"""benchmarks/bench_scale.py: growth is judged on each N's median run."""

from __future__ import annotations

import pytest

from benchmarks.bench_scale import growth, medians


def _row(nodes: int, wall_s: float, cpu_s: float, repeat: int) -> dict:
    return {
        "nodes": nodes,
        "wall_step_time_s": wall_s,
        "cpu_per_step_s": {"driver_s": 0.0, "actors_s": cpu_s},
        "repeat": repeat,
    }


def test_each_size_keeps_its_median_run_and_median_cpu():
    rows = [
        _row(2, 1.0, 9.0, 0),
        _row(4, 4.0, 8.0, 0),
        _row(4, 6.0, 2.0, 1),
        _row(2, 3.0, 1.0, 1),
        _row(2, 2.0, 5.0, 2),
        _row(4, 5.0, 4.0, 2),
    ]
    middle = medians(rows)
    assert [m["nodes"] for m in middle] == [2, 4]
    assert [m["wall_step_time_s"] for m in middle] == [2.0, 5.0]
    assert [m["cpu_per_step_s"] for m in middle] == [{"median_s": 5.0}, {"median_s": 4.0}]
    assert [m["repeats"] for m in middle] == [3, 3]
    assert rows[4]["cpu_per_step_s"]["actors_s"] == 5.0  # the runs themselves are unchanged
    grown = growth(middle)
    assert grown["over_linear"] == pytest.approx([1.0, 1.25])
    assert grown["slope"] == pytest.approx(1.3219, abs=1e-4)  # log2(2.5)


def test_per_step_figures_leave_out_the_warm_up():
    from benchmarks.bench_scale import warm_median

    later_steps = [0.9, 0.8, 0.7, 0.2, 0.3, 0.25]  # a slow warm-up, then warm steps
    assert warm_median(later_steps, 3) == pytest.approx(0.25)
    assert warm_median(later_steps, 2) == pytest.approx(0.275)  # even count: the mean of two
    assert warm_median(later_steps, 0) == pytest.approx(0.5)
    # Too few steps for the warm-up: every later step counts rather than none.
    assert warm_median(later_steps[:2], 4) == pytest.approx(0.85)
