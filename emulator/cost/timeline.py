"""Run: a small event-driven timeline of one compiled training step.

Four resources, each busy with one thing at a time:

- the inbound stream (MemoryX -> SwarmX broadcast -> every system),
- the wafer's compute,
- the outbound stream (every system -> SwarmX reduce -> MemoryX), full duplex
  with the inbound one,
- MemoryX's optimizer.

Rules, per operation ``k`` in program order (forward layers, then backward
layers in reverse, once per micro-batch):

- the weights of ``k`` start streaming when the link is free and will reach
  the wafer no earlier than operation ``k-1`` starts computing: one layer of
  prefetch buffer on the wafer, so the next layer's weights arrive while the
  current one computes (bytes still crossing the tree need no wafer buffer,
  so tiny layers stream back to back and pay the tree latency only once);
- compute starts when the previous operation is done and the first weight
  chunk has crossed the tree (``depth * hop_latency``); weights are consumed
  as they arrive, so compute cannot end before the last chunk has crossed;
- gradients leave as they are produced and are reduced at line rate on the
  way up; compute cannot end before they have all left, and they reach
  MemoryX one tree latency later;
- after the last micro-batch MemoryX updates each layer as its summed
  gradient arrives (last layer first). The next step's first layer needs its
  update, and that layer's gradient arrives last, so the step ends when the
  last update ends: the one part that cannot be hidden.

Each operation so costs ``max(compute, stream in, stream out)`` plus the fill
of the first one, the tree latency and the exposed update, which is the
per-layer model of docs/hardware.md §1.5, made exact about what overlaps.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.config import doc
from emulator.cost.compile import CompiledStep

#: Relative tolerance for "the pipeline state repeats" between micro-batches.
_PERIODIC_RTOL = 1e-12


@dataclass(frozen=True)
class Event:
    """One busy interval of one component, for traces."""

    component: str = doc(
        "'MemoryX', 'SwarmX L<level>.<i>' (level 1 next to the systems) or 'node <i>'"
    )
    lane: str = doc("what the component is doing: weights, gradients, update, compute")
    name: str = doc("operation label, e.g. 'bwd block3 mb0'")
    start_s: float = doc("start time from the beginning of the step, s")
    duration_s: float = doc("length, s")


@dataclass(frozen=True)
class Timeline:
    """What the step's resources did, summed; events only when asked for."""

    step_time_s: float = doc("one training step, s")
    compute_busy_s: float = doc("time each wafer spends computing, s")
    stream_in_busy_s: float = doc("time the inbound stream is busy, s")
    stream_out_busy_s: float = doc("time the outbound stream is busy, s")
    update_busy_s: float = doc("time MemoryX spends on the optimizer, s")
    exposed_update_s: float = doc("time from the wafer's last operation to the step's end, s")
    stream_bound_s: float = doc("wafer time set by streams rather than compute, s")
    compute_bound_s: float = doc("wafer time set by compute, s")
    node_energy_j: float = doc("energy of one node above idle power, J", default=0.0)
    node_time_by_part_s: dict[str, float] = doc(
        "one node's busy time by engine part (program, mvm, digital, ...), s",
        default_factory=dict,
    )
    node_energy_by_part_j: dict[str, float] = doc(
        "one node's energy above idle by engine part, J", default_factory=dict
    )
    events: tuple[Event, ...] = doc("busy intervals (empty unless record_events)", default=())


class _Pipeline:
    """The inbound/compute/outbound recurrence over one micro-batch's operations."""

    def __init__(self, compiled: CompiledStep) -> None:
        hardware = compiled.cluster.hardware
        bandwidth = hardware.stream_bandwidth_bytes_per_s
        precision = compiled.workload.precision
        self.tree_latency_s = hardware.swarmx.latency_s(compiled.cluster.config.num_nodes)
        engine = compiled.cluster.engine
        self.costs = [engine.op_cost(op, precision) for op in compiled.operations]
        self.durations = [
            (op.stream_in_bytes / bandwidth, cost.time_s, op.grad_out_bytes / bandwidth)
            for op, cost in zip(compiled.operations, self.costs, strict=True)
        ]
        self.in_end = 0.0
        self.compute_start = 0.0
        self.compute_end = 0.0
        self.stream_bound_s = 0.0
        self.compute_bound_s = 0.0

    def state(self) -> tuple[float, float]:
        return (self.in_end - self.compute_end, self.compute_start - self.compute_end)

    def run_micro_batch(self, record: list | None) -> list[float]:
        """Advance through one micro-batch; return gradient arrival times per operation."""
        tree = self.tree_latency_s
        arrivals = []
        for t_in, t_compute, t_out in self.durations:
            in_start = max(self.in_end, self.compute_start - tree)
            self.in_end = in_start + t_in
            start = max(self.compute_end, in_start + tree)
            compute_done = start + t_compute
            end = max(compute_done, self.in_end + tree, start + t_out)
            if compute_done >= end:
                self.compute_bound_s += end - self.compute_end
            else:
                self.stream_bound_s += end - self.compute_end
            if record is not None:
                record.append((in_start, t_in, start, end))
            self.compute_start, self.compute_end = start, end
            arrivals.append(end + tree if t_out > 0 else end)
        return arrivals


def _same(state: tuple[float, ...], previous: tuple[float, ...], clock_s: float) -> bool:
    # State entries are differences of clock readings, so rounding scales with the clock.
    tolerance = _PERIODIC_RTOL * max(1.0, clock_s)
    return all(abs(a - b) <= tolerance for a, b in zip(state, previous, strict=True))


def run(compiled: CompiledStep, *, record_events: bool = False) -> Timeline:
    """Evaluate one step of ``compiled``; ``record_events`` keeps intervals for a trace."""
    pipeline = _Pipeline(compiled)
    num_micro_batches = compiled.num_micro_batches
    records: list[list] | None = [] if record_events else None
    previous_state = None
    micro_batch = 0
    while micro_batch < num_micro_batches:
        record = [] if records is not None else None
        before = (pipeline.compute_end, pipeline.stream_bound_s, pipeline.compute_bound_s)
        arrivals = pipeline.run_micro_batch(record)
        if records is not None:
            records.append(record)
        micro_batch += 1
        state = pipeline.state()
        if (
            records is None
            and previous_state is not None
            and _same(state, previous_state, pipeline.compute_end)
        ):
            # The pipeline is periodic: every further micro-batch repeats this one.
            remaining = num_micro_batches - micro_batch
            period = pipeline.compute_end - before[0]
            pipeline.stream_bound_s += remaining * (pipeline.stream_bound_s - before[1])
            pipeline.compute_bound_s += remaining * (pipeline.compute_bound_s - before[2])
            pipeline.compute_end += remaining * period
            arrivals = [t + remaining * period for t in arrivals]
            break
        previous_state = state

    memoryx = compiled.cluster.hardware.memoryx
    update_end = 0.0
    updates = []
    for op, arrival in zip(compiled.operations, arrivals, strict=True):
        if op.phase != "backward":
            continue
        duration = memoryx.update_time_s(compiled.update_params[op.layer_index])
        start = max(update_end, arrival)
        update_end = start + duration
        updates.append((op.layer, start, duration))
    step_time = max(pipeline.compute_end, update_end)
    bandwidth = compiled.cluster.hardware.stream_bandwidth_bytes_per_s
    ops = compiled.operations
    events = ()
    if records is not None:
        events = _events(compiled, records, updates, pipeline.tree_latency_s)
    time_by_part: dict[str, float] = {}
    energy_by_part: dict[str, float] = {}
    for cost in pipeline.costs:
        for part, value in cost.time_by_part_s.items():
            time_by_part[part] = time_by_part.get(part, 0.0) + num_micro_batches * value
        for part, value in cost.energy_by_part_j.items():
            energy_by_part[part] = energy_by_part.get(part, 0.0) + num_micro_batches * value
    return Timeline(
        node_energy_j=num_micro_batches * sum(cost.energy_j for cost in pipeline.costs),
        node_time_by_part_s=time_by_part,
        node_energy_by_part_j=energy_by_part,
        step_time_s=step_time,
        compute_busy_s=num_micro_batches * sum(d[1] for d in pipeline.durations),
        stream_in_busy_s=num_micro_batches * sum(op.stream_in_bytes for op in ops) / bandwidth,
        stream_out_busy_s=num_micro_batches * sum(op.grad_out_bytes for op in ops) / bandwidth,
        update_busy_s=sum(u[2] for u in updates),
        exposed_update_s=step_time - pipeline.compute_end,
        stream_bound_s=pipeline.stream_bound_s,
        compute_bound_s=pipeline.compute_bound_s,
        events=events,
    )


def _events(
    compiled: CompiledStep,
    records: list[list],
    updates: list[tuple[str, float, float]],
    tree_latency_s: float,
) -> tuple[Event, ...]:
    """Busy intervals of MemoryX, every SwarmX node and every compute node.

    Data parallelism makes all systems identical, and all SwarmX nodes of one
    level too (a level closer to the root sees weights one hop earlier and
    gradients one hop later), so one record per operation expands to all of them.
    """
    swarmx = compiled.cluster.hardware.swarmx
    num_nodes = compiled.cluster.config.num_nodes
    levels = swarmx.nodes_per_level(num_nodes)
    depth, hop = len(levels), swarmx.config.hop_latency_s
    nodes = [f"node {i}" for i in range(num_nodes)]
    switches = [
        (level, [f"SwarmX L{level}.{i}" for i in range(count)])
        for level, count in enumerate(levels, start=1)
    ]
    events = []
    for micro_batch, record in enumerate(records):
        for op, (in_start, t_in, start, end) in zip(compiled.operations, record, strict=True):
            label = f"{'fwd' if op.phase == 'forward' else 'bwd'} {op.layer} mb{micro_batch}"
            has_grads = op.grad_out_bytes > 0
            events.append(Event("MemoryX", "weights", label, in_start, t_in))
            events.extend(Event(node, "compute", label, start, end - start) for node in nodes)
            for level, names in switches:
                broadcast_start = in_start + (depth - level) * hop
                events.extend(Event(n, "broadcast", label, broadcast_start, t_in) for n in names)
                if has_grads:
                    reduce_start = start + (level - 1) * hop
                    events.extend(
                        Event(n, "reduce", label, reduce_start, end - start) for n in names
                    )
            if has_grads:
                events.append(
                    Event("MemoryX", "gradients", label, start + tree_latency_s, end - start)
                )
    for layer, start, duration in updates:
        events.append(Event("MemoryX", "update", f"update {layer}", start, duration))
    return tuple(events)


__all__ = ["Event", "Timeline", "run"]
