"""The emulated clock of a functional run: what the emulated hardware would have done.

A functional run moves real bytes and computes real FLOPs, on whatever
machine it runs on. This module turns what one training step measured
(per layer and pass: payload bytes delivered to the nodes, gradient bytes
sent up, FLOPs summed over the nodes) into a ``Workload`` and runs the same
analytic cost model as ``wafer simulate`` on it, once per run: every step
streams the same bytes and computes the same FLOPs.

Plain numbers in, plain numbers out: nothing here imports Ray, gRPC or torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

from core.config import doc
from core.cost.engine import NodeEngine
from core.cost.hardware import Hardware
from core.cost.workload import LayerProfile, Matmul, OpticalPass, Workload
from core.precision import Precision, precision_format
from emulator.cost.compile import Cluster, compile_step
from emulator.cost.stats import StepStats, simulate
from emulator.cost.timeline import Event
from emulator.cost.trace import write_trace
from nodes.cs2 import WaferEngine


@dataclass(frozen=True)
class PassMeasurement:
    """One layer in one pass of a training step, as the root SwarmX acknowledged it."""

    layer: int = doc("layer index, forward order")
    phase: Literal["forward", "backward"] = doc("forward or backward pass")
    num_nodes: int = doc("compute nodes that ran it, count")
    bytes_to_nodes: int = doc("weight payload delivered, summed over nodes, bytes")
    gradient_bytes: int = doc("gradient payload sent up, summed over nodes, bytes")
    flops: float = doc("FLOPs computed, summed over nodes, FLOP")


@dataclass(frozen=True)
class LayerShape:
    """What the driver knows of a layer without running the cluster."""

    num_params: int = doc("trainable parameters, count")
    input_elements_per_sample: float = doc("elements of the layer input kept for backward, count")
    matmuls: tuple[Matmul, ...] = doc("the layer's weight products, per sample", default=())
    optical_passes: tuple[OpticalPass, ...] = doc("the layer's fixed optical stages", default=())


def measured_workload(
    name: str,
    shapes: Sequence[LayerShape],
    passes: Sequence[PassMeasurement],
    *,
    samples_per_step: int,
    tokens_per_sample: int,
    precision: Precision,
    densities: Sequence[float] | None = None,
) -> Workload:
    """The ``Workload`` of one measured training step, in ``profile_modules``' conventions.

    ``densities`` (per layer, 1.0 = dense) are the weight densities of a
    sparse run: the nodes count dense FLOPs, and the wafer skips the FLOPs of
    pruned weights (``LayerProfile.weight_density``, through the preset's
    sparse efficiency curve). Bytes are measured, so they already shrink.

    Bytes are what one node received (weights) and sent (gradients) per pass;
    FLOPs are summed over the nodes and divided by the global batch, so they
    are per sample. Backward FLOPs are what the nodes counted with the shared
    convention of ``core.cost.profile.block_flops`` (no recomputed
    forward, no gradient of the data input).
    Activations are each layer's input at the operand precision, as the wafer
    keeps them in SRAM.
    """
    by_key = {(p.layer, p.phase): p for p in passes}
    element_bytes = precision_format(precision).bytes_per_element
    layers = []
    for index, shape in enumerate(shapes):
        forward = by_key.get((index, "forward"))
        backward = by_key.get((index, "backward"))
        assert forward is not None and backward is not None, f"layer {index} was not measured"
        # Each pass streams what it measured: a backend that needs no weights in the backward
        # pass (DFA) streams none there, and the emulated clock shows it.
        layers.append(
            LayerProfile(
                name=f"layer{index}",
                num_params=shape.num_params,
                weight_bytes=forward.bytes_to_nodes / forward.num_nodes,
                backward_weight_bytes=backward.bytes_to_nodes / backward.num_nodes,
                grad_bytes=backward.gradient_bytes / backward.num_nodes,
                forward_flops=forward.flops / samples_per_step,
                backward_flops=backward.flops / samples_per_step,
                activation_bytes=shape.input_elements_per_sample * element_bytes,
                weight_density=1.0 if densities is None else densities[index],
                matmuls=shape.matmuls,
                optical_passes=shape.optical_passes,
            )
        )
    return Workload(
        name=name,
        layers=tuple(layers),
        samples_per_step=samples_per_step,
        tokens_per_sample=tokens_per_sample,
        precision=precision,
    )


def check_fits(
    name: str,
    shapes: Sequence[LayerShape],
    hardware: Hardware.Config,
    num_nodes: int,
    *,
    samples_per_step: int,
    tokens_per_sample: int,
    precision: Precision,
    engine: NodeEngine | None = None,
) -> None:
    """Raise ``ValueError`` before a run if the emulated cluster cannot run it at all.

    That is: more nodes than the preset's SwarmX supports, model state larger
    than its largest MemoryX, or one sample's activations larger than the
    wafer's SRAM. FLOPs do not matter for that, so none are counted.
    """
    element_bytes = precision_format(precision).bytes_per_element
    workload = Workload(
        name=name,
        layers=tuple(
            LayerProfile(
                name=f"layer{index}",
                num_params=shape.num_params,
                weight_bytes=shape.num_params * element_bytes,
                grad_bytes=shape.num_params * element_bytes,
                forward_flops=0.0,
                activation_bytes=shape.input_elements_per_sample * element_bytes,
            )
            for index, shape in enumerate(shapes)
        ),
        samples_per_step=samples_per_step,
        tokens_per_sample=tokens_per_sample,
        precision=precision,
    )
    compile_step(
        workload, Cluster.Config(hardware=hardware, num_nodes=num_nodes, engine=engine).build()
    )


def _with_functional_swarmx(events: tuple[Event, ...]) -> tuple[Event, ...]:
    """Add the SwarmX root a one-node functional cluster has and the cost model has not.

    The functional tree hangs even a single node off one SwarmX node; the cost
    model connects one system straight to MemoryX (no tree level, no hop). So
    the trace shows that node as a pass-through: it broadcasts and reduces
    exactly when MemoryX streams.
    """
    if any(e.component.startswith("SwarmX") for e in events):
        return events
    lanes = {"weights": "broadcast", "gradients": "reduce"}
    relayed = tuple(
        Event("SwarmX L1.0", lanes[e.lane], e.name, e.start_s, e.duration_s)
        for e in events
        if e.component == "MemoryX" and e.lane in lanes
    )
    return events + relayed


@dataclass(frozen=True)
class EmulatedStep:
    """One training step of a functional run on the emulated hardware."""

    workload: Workload = doc("what the step measured, as the cost model's input")
    stats: StepStats = doc("the cost model's step")
    events: tuple[Event, ...] = doc("busy intervals of every component, for the trace")
    peak_activation_bytes_per_node: float = doc(
        "largest activation footprint a node measured (NodeStats), bytes"
    )
    engine: NodeEngine = doc("what costed the nodes' compute (the backend's engine)")

    @property
    def activations_fit(self) -> bool:
        return self.peak_activation_bytes_per_node <= self.stats.activation_budget_bytes

    @property
    def model_state_fits(self) -> bool:
        return self.stats.model_state_bytes <= self.stats.memoryx_capacity_bytes

    def to_json(self) -> dict:
        s = self.stats
        return {
            "hardware": s.hardware,
            "num_nodes": s.num_nodes,
            # One-off: putting trained weights on hardware that trained elsewhere (a twin).
            "deployment": asdict(self.engine.deployment(self.workload)),
            "precision": self.workload.precision,
            **s.emulated(),
            "compute_busy_fraction": s.compute_busy_fraction,
            "stream_bound_fraction": s.stream_bound_fraction,
            "exposed_update_s": s.exposed_update_s,
            "swarmx_depth": s.swarmx_depth,
            "num_swarmx_nodes": s.num_swarmx_nodes,
            "memory": {
                "activation_bytes_per_node": self.peak_activation_bytes_per_node,
                "activation_budget_bytes": s.activation_budget_bytes,
                "activation_memory": self.engine.activation_memory,
                "activations_fit": self.activations_fit,
                "num_micro_batches": s.num_micro_batches,
                "model_state_bytes": s.model_state_bytes,
                "memoryx_capacity_bytes": s.memoryx_capacity_bytes,
                "model_state_fits": self.model_state_fits,
            },
            "workload": {
                "flops_per_sample": self.workload.flops_per_sample(),
                "weight_bytes_per_pass": sum(x.weight_bytes for x in self.workload.layers),
                "gradient_bytes_per_pass": sum(x.grad_bytes for x in self.workload.layers),
                "layers": [asdict(layer) for layer in self.workload.layers],
            },
        }

    def write_trace(self, path: str) -> None:
        """Chrome-trace JSON of the step, written atomically: one track per component."""
        write_trace(self.events, path)


def emulate(
    workload: Workload,
    hardware: Hardware.Config,
    num_nodes: int,
    *,
    peak_activation_bytes_per_node: float,
    engine: NodeEngine | None = None,
) -> EmulatedStep:
    """Run the cost model on a measured step (raises ``ValueError`` if the model cannot fit).

    ``engine`` costs the nodes' compute (``Backend.Config.engine``); None is the preset's wafer.
    """
    stats, timeline = simulate(workload, hardware, num_nodes, engine=engine, record_events=True)
    return EmulatedStep(
        workload=workload,
        stats=stats,
        events=_with_functional_swarmx(timeline.events),
        peak_activation_bytes_per_node=float(peak_activation_bytes_per_node),
        engine=engine or WaferEngine(hardware.wafer.build()),
    )


__all__ = [
    "EmulatedStep",
    "LayerShape",
    "PassMeasurement",
    "check_fits",
    "emulate",
    "measured_workload",
]
