"""Chrome-trace JSON (opens in https://ui.perfetto.dev and chrome://tracing).

Every component (MemoryX, each SwarmX node, each compute node) is one track:
a trace "process" named after it. What a component does at the same time
(MemoryX streams weights, accumulates gradients and updates; a SwarmX node
broadcasts and reduces) goes on separate lanes (trace "threads") inside its
track, because a trace viewer cannot draw overlapping slices on one lane.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from emulator.cost.timeline import Event

_MICROSECONDS_PER_SECOND = 1e6


def _component_order(name: str) -> tuple[int, int, int]:
    """MemoryX first, then SwarmX from the root down, then the compute nodes."""
    if name == "MemoryX":
        return (0, 0, 0)
    if name.startswith("SwarmX L"):
        level, _, index = name.removeprefix("SwarmX L").partition(".")
        return (1, -int(level), int(index or 0))
    return (2, int(name.rsplit(" ", 1)[-1]), 0)


def trace_json(events: Sequence[Event]) -> dict:
    """The Chrome-trace document of ``events``: one process per component."""
    components = sorted({e.component for e in events}, key=_component_order)
    pids = {name: pid for pid, name in enumerate(components, start=1)}
    lanes: dict[tuple[str, str], int] = {}
    trace = []
    for name, pid in pids.items():
        trace.append({"ph": "M", "name": "process_name", "pid": pid, "args": {"name": name}})
        trace.append(
            {"ph": "M", "name": "process_sort_index", "pid": pid, "args": {"sort_index": pid}}
        )
    for event in events:
        key = (event.component, event.lane)
        if key not in lanes:
            lanes[key] = len(lanes) + 1
            trace.append(
                {
                    "ph": "M",
                    "name": "thread_name",
                    "pid": pids[event.component],
                    "tid": lanes[key],
                    "args": {"name": event.lane},
                }
            )
        trace.append(
            {
                "ph": "X",
                "name": event.name,
                "cat": event.lane,
                "pid": pids[event.component],
                "tid": lanes[key],
                "ts": event.start_s * _MICROSECONDS_PER_SECOND,
                "dur": event.duration_s * _MICROSECONDS_PER_SECOND,
            }
        )
    return {"traceEvents": trace, "displayTimeUnit": "ms"}


def write_trace(events: Sequence[Event], path: str | Path) -> Path:
    """Write ``events`` as Chrome-trace JSON atomically (temp file, then ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(trace_json(events), f, separators=(",", ":"))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


__all__ = ["trace_json", "write_trace"]
