"""Stats: what a step costs, in the terms a user asks about.

``predict`` runs the three stages (compile, run, stats) for one cluster size;
``sweep`` does it for several and adds speedup and scaling efficiency against
one system. ``StepStats.emulated()`` is the ``emulated`` block of a functional
run's JSON.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from core.config import doc
from core.cost.engine import NodeEngine
from core.cost.hardware import Hardware
from core.cost.workload import Workload
from emulator.cost.compile import Cluster, CompiledStep, compile_step
from emulator.cost.timeline import Timeline, run

#: Default scaling efficiency below which a sweep calls scaling non-linear.
LINEAR_SCALING_THRESHOLD = 0.9


@dataclass(frozen=True)
class StepStats:
    """One training step of one workload on one cluster size."""

    model: str = doc("workload name")
    hardware: str = doc("preset name (MemoryX, SwarmX and, for the digital backend, the wafer)")
    node: str = doc("what computes on each node: the wafer, or an analog or photonic engine")
    num_nodes: int = doc("compute systems, count")
    step_time_s: float = doc("one training step, s")
    samples_per_s: float = doc("training throughput, samples/s")
    tokens_per_s: float = doc("training throughput, tokens/s")
    speedup: float | None = doc("throughput / throughput on one system (None if not swept)")
    scaling_efficiency: float | None = doc("speedup / num_nodes, fraction")
    compute_utilization: float = doc("achieved FLOP/s per system / peak FLOP/s, fraction")
    compute_busy_fraction: float = doc("share of the step each wafer computes, fraction")
    stream_bound_fraction: float = doc("share of wafer time set by streams, fraction")
    bound: str = doc("'compute' or 'stream': what sets most of the wafer's time")
    energy_j: float = doc("energy of one step, all components, J")
    energy_by_component_j: dict[str, float] = doc("energy of one step per component, J")
    time_by_component_s: dict[str, float] = doc("busy time per component in one step, s")
    exposed_update_s: float = doc("optimizer time not hidden behind the backward pass, s")
    swarmx_depth: int = doc("SwarmX tree levels, count")
    num_swarmx_nodes: int = doc("SwarmX nodes, count")
    samples_per_node: int = doc("largest share of the batch on one system, samples")
    num_micro_batches: int = doc("micro-batches per system per step, count")
    activation_bytes_per_node: float = doc("activations one micro-batch keeps in SRAM, bytes")
    activation_budget_bytes: float = doc("SRAM available to activations, bytes")
    model_state_bytes: float = doc("model state in MemoryX, bytes")
    memoryx_capacity_bytes: float = doc("MemoryX size used, bytes")
    node_time_by_part_s: dict[str, float] = doc(
        "one node's busy time per step by engine part (program, mvm, digital, ...), s",
        default_factory=dict,
    )
    node_energy_by_part_j: dict[str, float] = doc(
        "all nodes' energy above idle per step by engine part, J", default_factory=dict
    )

    @property
    def memory_fit(self) -> str:
        """'fits' when one pass over the share fits in SRAM, else the micro-batch count."""
        if self.num_micro_batches == 1:
            return "fits"
        return f"{self.num_micro_batches} micro-batches"

    def to_json(self) -> dict:
        data = asdict(self)
        data["memory_fit"] = self.memory_fit
        return data

    def emulated(self) -> dict:
        """The ``emulated`` block a functional run adds to its JSON."""
        return {
            "step_time_s": self.step_time_s,
            "energy_j": self.energy_j,
            "tokens_per_s": self.tokens_per_s,
            "samples_per_s": self.samples_per_s,
            "compute_utilization": self.compute_utilization,
            "bound": self.bound,
            "energy_by_component_j": dict(self.energy_by_component_j),
            "time_by_component_s": dict(self.time_by_component_s),
            "node": self.node,
            "node_time_by_part_s": dict(self.node_time_by_part_s),
            "node_energy_by_part_j": dict(self.node_energy_by_part_j),
        }


def step_stats(compiled: CompiledStep, timeline: Timeline) -> StepStats:
    """Throughput, utilization, energy and memory figures of a run step."""
    workload, cluster = compiled.workload, compiled.cluster
    hardware, num_nodes = cluster.hardware, cluster.config.num_nodes
    step = timeline.step_time_s
    engine = cluster.engine
    samples_per_s = workload.samples_per_step / step
    flops_per_node = workload.effective_flops_per_sample() * workload.samples_per_step / num_nodes
    num_swarmx_nodes = sum(hardware.swarmx.nodes_per_level(num_nodes))
    energy = {
        engine.component: num_nodes * (engine.idle_power_w * step + timeline.node_energy_j),
        "memoryx": hardware.memoryx.config.power_w * step,
        "swarmx": num_swarmx_nodes * hardware.swarmx.config.power_w_per_node * step,
    }
    wafer_time = timeline.stream_bound_s + timeline.compute_bound_s
    stream_fraction = timeline.stream_bound_s / wafer_time if wafer_time > 0 else 0.0
    return StepStats(
        model=workload.name,
        hardware=cluster.config.hardware.name,
        node=engine.name,
        num_nodes=num_nodes,
        step_time_s=step,
        samples_per_s=samples_per_s,
        tokens_per_s=samples_per_s * workload.tokens_per_sample,
        speedup=None,
        scaling_efficiency=None,
        compute_utilization=flops_per_node / step / engine.peak_flops(workload.precision),
        compute_busy_fraction=timeline.compute_busy_s / step,
        stream_bound_fraction=stream_fraction,
        bound="stream" if stream_fraction > 0.5 else "compute",
        energy_j=sum(energy.values()),
        energy_by_component_j=energy,
        time_by_component_s={
            f"{engine.component}_compute": timeline.compute_busy_s,
            "stream_in": timeline.stream_in_busy_s,
            "stream_out": timeline.stream_out_busy_s,
            "memoryx_update": timeline.update_busy_s,
        },
        exposed_update_s=timeline.exposed_update_s,
        swarmx_depth=hardware.swarmx.depth(num_nodes),
        num_swarmx_nodes=num_swarmx_nodes,
        samples_per_node=compiled.samples_per_node,
        num_micro_batches=compiled.num_micro_batches,
        activation_bytes_per_node=compiled.activation_bytes_per_micro_batch,
        activation_budget_bytes=compiled.activation_budget_bytes,
        model_state_bytes=compiled.model_state_bytes,
        memoryx_capacity_bytes=compiled.memoryx_capacity_bytes,
        node_time_by_part_s=dict(timeline.node_time_by_part_s),
        node_energy_by_part_j={
            part: num_nodes * value for part, value in timeline.node_energy_by_part_j.items()
        },
    )


def simulate(
    workload: Workload,
    hardware: Hardware.Config,
    num_nodes: int,
    *,
    memoryx_capacity_bytes: float | None = None,
    engine: NodeEngine | None = None,
    record_events: bool = False,
) -> tuple[StepStats, Timeline]:
    """Compile, run and summarise one step; the timeline carries events if asked.

    ``engine`` costs each node's compute (``Backend.Config.engine``); None is the preset's wafer.
    """
    cluster = Cluster.Config(
        hardware=hardware,
        num_nodes=num_nodes,
        memoryx_capacity_bytes=memoryx_capacity_bytes,
        engine=engine,
    ).build()
    compiled = compile_step(workload, cluster)
    timeline = run(compiled, record_events=record_events)
    return step_stats(compiled, timeline), timeline


def predict(
    workload: Workload,
    hardware: Hardware.Config,
    num_nodes: int,
    *,
    memoryx_capacity_bytes: float | None = None,
    engine: NodeEngine | None = None,
) -> StepStats:
    """Stats of one step on ``num_nodes`` systems (no speedup: see ``sweep``)."""
    stats, _ = simulate(
        workload,
        hardware,
        num_nodes,
        memoryx_capacity_bytes=memoryx_capacity_bytes,
        engine=engine,
    )
    return stats


def sweep(
    workload: Workload,
    hardware: Hardware.Config,
    node_counts: Sequence[int],
    *,
    memoryx_capacity_bytes: float | None = None,
    engine: NodeEngine | None = None,
) -> list[StepStats]:
    """Stats for each node count, with speedup and efficiency against one system."""
    counts = sorted(set(node_counts))
    by_count = {
        n: predict(
            workload, hardware, n, memoryx_capacity_bytes=memoryx_capacity_bytes, engine=engine
        )
        for n in sorted({1, *counts})
    }
    baseline = by_count[1].samples_per_s
    result = []
    for n in counts:
        stats = by_count[n]
        speedup = stats.samples_per_s / baseline
        result.append(dataclasses.replace(stats, speedup=speedup, scaling_efficiency=speedup / n))
    return result


def first_nonlinear(
    stats: Sequence[StepStats], threshold: float = LINEAR_SCALING_THRESHOLD
) -> StepStats | None:
    """The smallest cluster whose scaling efficiency falls below ``threshold``."""
    return next(
        (s for s in stats if s.scaling_efficiency is not None and s.scaling_efficiency < threshold),
        None,
    )


__all__ = [
    "LINEAR_SCALING_THRESHOLD",
    "StepStats",
    "first_nonlinear",
    "predict",
    "simulate",
    "step_stats",
    "sweep",
]
