"""Analytic cost model of a weight-streaming cluster: compile, run, stats.

- ``workload``: ``LayerProfile`` / ``Workload``, the typed input; ``gpt``:
  analytic GPT sizes; ``profile``: ``profile_modules`` counts the FLOPs of
  torch blocks (imported on its own, so the analytic path needs no torch).
- ``hardware``: the typed presets (``core.presets`` loads the YAML files).
- ``compile``: workload + cluster -> per-layer operations, capacity checks.
- ``timeline``: the event-driven step (prefetch overlap, tree, update).
- ``stats``: step time, throughput, scaling, utilization, energy, memory fit.
- ``trace``: Chrome-trace JSON; ``validate``: published figures.

No numerics run here and nothing imports ray or grpc.
"""

from core.cost.hardware import Hardware, MemoryXCost, SwarmXCost, WaferCost
from core.cost.operation import Operation
from core.cost.workload import LayerProfile, Workload
from emulator.cost.compile import Cluster, CompiledStep, compile_step
from emulator.cost.gpt import GPT_SPECS, GptSpec, gpt_workload
from emulator.cost.stats import StepStats, first_nonlinear, predict, simulate, step_stats, sweep
from emulator.cost.timeline import Event, Timeline, run
from emulator.cost.trace import trace_json, write_trace

__all__ = [
    "GPT_SPECS",
    "Cluster",
    "CompiledStep",
    "Event",
    "GptSpec",
    "Hardware",
    "LayerProfile",
    "MemoryXCost",
    "Operation",
    "StepStats",
    "SwarmXCost",
    "Timeline",
    "WaferCost",
    "Workload",
    "compile_step",
    "first_nonlinear",
    "gpt_workload",
    "predict",
    "run",
    "simulate",
    "step_stats",
    "sweep",
    "trace_json",
    "write_trace",
]
