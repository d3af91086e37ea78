from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.cost.workload import LayerProfile, Workload
from emulator.cost.stats import simulate
from emulator.cost.trace import write_trace


def _workload() -> Workload:
    layers = tuple(
        LayerProfile(
            name=f"layer{i}",
            num_params=1_000_000,
            weight_bytes=2e6,
            grad_bytes=2e6,
            forward_flops=1e9,
            activation_bytes=0.0,
        )
        for i in range(3)
    )
    return Workload(name="toy", layers=layers, samples_per_step=10)


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def test_trace_has_one_track_per_component(hardware, tmp_path: Path):
    _, timeline = simulate(_workload(), hardware, 5, record_events=True)
    path = write_trace(timeline.events, tmp_path / "trace.json")
    trace = _load(path)["traceEvents"]
    tracks = {e["pid"]: e["args"]["name"] for e in trace if e["name"] == "process_name"}
    # 5 systems under a fan-out-4 tree: 2 SwarmX nodes on level 1, one root on level 2.
    expected = ["MemoryX", "SwarmX L2.0", "SwarmX L1.0", "SwarmX L1.1"] + [
        f"node {i}" for i in range(5)
    ]
    assert [tracks[pid] for pid in sorted(tracks)] == expected
    slices = [e for e in trace if e["ph"] == "X"]
    assert {e["pid"] for e in slices} == set(tracks)
    for pid, name in tracks.items():
        mine = [e for e in slices if e["pid"] == pid]
        if name.startswith("node"):
            assert len(mine) == 6  # three layers forward, three backward
        lanes = {}
        for event in mine:
            lanes.setdefault(event["tid"], []).append(event)
        # Slices on one lane never overlap (a trace viewer could not draw them).
        for lane in lanes.values():
            lane.sort(key=lambda e: e["ts"])
            for a, b in zip(lane, lane[1:], strict=False):
                assert a["ts"] + a["dur"] <= b["ts"] + 1e-6
    updates = [e for e in slices if e["cat"] == "update"]
    assert len(updates) == 3


def test_trace_times_are_microseconds_and_end_at_the_step(hardware, tmp_path: Path):
    stats, timeline = simulate(_workload(), hardware, 1, record_events=True)
    trace = _load(write_trace(timeline.events, tmp_path / "t.json"))["traceEvents"]
    end = max(e["ts"] + e["dur"] for e in trace if e["ph"] == "X")
    assert end == pytest.approx(stats.step_time_s * 1e6)
    assert min(e["ts"] for e in trace if e["ph"] == "X") == 0.0


def test_trace_is_replaced_atomically(hardware, tmp_path: Path):
    path = tmp_path / "trace.json"
    path.write_text("old")
    _, timeline = simulate(_workload(), hardware, 2, record_events=True)
    write_trace(timeline.events, path)
    assert _load(path)["displayTimeUnit"] == "ms"
    assert [p.name for p in tmp_path.iterdir()] == ["trace.json"]
