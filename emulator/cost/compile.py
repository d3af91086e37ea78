"""Compile: a workload on a cluster becomes a list of per-layer operations.

This is the first of the three stages (compile, run, stats), after Calculon.
Compiling checks that everything fits (model state in MemoryX, activations
in wafer SRAM) and splits each system's share of the batch into as many
micro-batches as SRAM needs. Each micro-batch streams every layer's weights
in again, in the forward and the backward pass, and streams its gradients
out (MemoryX accumulates them); that is the price of a batch that does not
fit on the wafer. Micro-batches are identical, so the compiled step holds
one micro-batch's operations and their count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from core.config import doc
from core.cost.engine import NodeEngine
from core.cost.hardware import Hardware
from core.cost.operation import Operation, Phase
from core.cost.workload import Workload
from core.units import format_bytes, format_count
from nodes.cs2 import WaferEngine


class Cluster:
    """A preset, a number of systems, the MemoryX size chosen for them and the nodes' engine."""

    @dataclass(kw_only=True)
    class Config:
        hardware: Hardware.Config = doc("the hardware preset (see core.presets)")
        num_nodes: int = doc("compute systems, count", default=1)
        memoryx_capacity_bytes: float | None = doc(
            "MemoryX size, bytes; None picks the smallest preset option that holds the model",
            default=None,
        )
        engine: NodeEngine | None = doc(
            "cost of a node's compute (Backend.Config.engine); None: the preset's wafer",
            default=None,
        )

        def __post_init__(self) -> None:
            max_systems = self.hardware.swarmx.max_systems
            if not 1 <= self.num_nodes <= max_systems:
                raise ValueError(
                    f"num_nodes = {self.num_nodes} is not valid for the {self.hardware.name} "
                    f"preset; it supports 1 to {max_systems} systems "
                    f"(swarmx.max_systems = {max_systems})."
                )
            if self.memoryx_capacity_bytes is not None and self.memoryx_capacity_bytes <= 0:
                raise ValueError(
                    f"memoryx_capacity_bytes = {self.memoryx_capacity_bytes!r} is not valid; "
                    "it must be greater than 0 bytes (or None to pick a preset option)."
                )

        def build(self) -> Cluster:
            return Cluster(self)

    def __init__(self, config: Config) -> None:
        self.config = config
        self.hardware = config.hardware.build()
        self.engine = config.engine or WaferEngine(self.hardware.wafer)


@dataclass(frozen=True)
class CompiledStep:
    """Everything the timeline needs, plus the capacity figures the stats report."""

    workload: Workload
    cluster: Cluster
    operations: tuple[Operation, ...] = doc("one micro-batch: forward then backward; repeated")
    samples_per_node: int = doc("largest share of the batch on one system, samples")
    num_micro_batches: int = doc("micro-batches per system per step, count")
    samples_per_micro_batch: int = doc("largest micro-batch, samples")
    activation_bytes_per_sample: float = doc("activations kept per sample, bytes")
    activation_budget_bytes: float = doc("SRAM available to activations, bytes")
    model_state_bytes: float = doc("state MemoryX keeps for the model, bytes")
    memoryx_capacity_bytes: float = doc("MemoryX size used, bytes")
    update_params: tuple[int, ...] = doc("parameters MemoryX updates per layer, forward order")

    @property
    def activation_bytes_per_micro_batch(self) -> float:
        return self.activation_bytes_per_sample * self.samples_per_micro_batch


def _memoryx_capacity(workload: Workload, cluster: Cluster) -> tuple[float, float]:
    memoryx = cluster.hardware.memoryx
    state = memoryx.state_bytes(workload.num_params)
    preset = cluster.config.hardware.name
    per_param = memoryx.config.state_bytes_per_param
    chosen = cluster.config.memoryx_capacity_bytes
    if chosen is not None:
        if state > chosen:
            raise ValueError(
                f"{workload.name} ({format_count(workload.num_params)} parameters) needs "
                f"{format_bytes(state)} of MemoryX state at {per_param:g} B/parameter, "
                f"more than the chosen MemoryX of {format_bytes(chosen)}; pick a larger "
                f"memoryx_capacity_bytes (the {preset} preset offers up to "
                f"{format_bytes(memoryx.largest_capacity_bytes)})."
            )
        return state, chosen
    fitting = [c for c in memoryx.config.capacity_options_bytes if c >= state]
    if not fitting:
        largest = memoryx.largest_capacity_bytes
        raise ValueError(
            f"{workload.name} ({format_count(workload.num_params)} parameters) needs "
            f"{format_bytes(state)} of MemoryX state at {per_param:g} B/parameter; the "
            f"{preset} preset's largest MemoryX holds {format_bytes(largest)}, i.e. at most "
            f"{format_count(largest / per_param)} parameters. Use a smaller model or a preset "
            "with a larger memoryx.capacity_options_bytes."
        )
    return state, fitting[0]


def compile_step(workload: Workload, cluster: Cluster) -> CompiledStep:
    """Per-layer operations of one training step of ``workload`` on ``cluster``."""
    num_nodes = cluster.config.num_nodes
    if workload.samples_per_step < num_nodes:
        raise ValueError(
            f"A batch of {workload.samples_per_step} samples cannot be shared by {num_nodes} "
            f"systems (data parallel needs at least one sample each); use --batch >= "
            f"{num_nodes} or fewer nodes."
        )
    state_bytes, capacity = _memoryx_capacity(workload, cluster)
    engine = cluster.engine
    engine.check(workload)
    budget = engine.activation_budget_bytes
    per_sample = sum(layer.activation_bytes for layer in workload.layers)
    if per_sample > budget:
        raise ValueError(
            f"{workload.name} keeps {format_bytes(per_sample)} of activations per sample, "
            f"more than the {format_bytes(budget)} of {engine.activation_budget_source}; "
            "shorten the sequence (--seq): "
            f"at most about {math.floor(workload.tokens_per_sample * budget / per_sample)} "
            "tokens per sample fit."
        )
    samples_per_node = math.ceil(workload.samples_per_step / num_nodes)
    samples_fitting = math.floor(budget / per_sample) if per_sample > 0 else samples_per_node
    num_micro_batches = math.ceil(samples_per_node / samples_fitting)
    samples_per_micro_batch = math.ceil(samples_per_node / num_micro_batches)

    # Micro-batches differ by at most one sample; the average keeps the total compute exact.
    samples = samples_per_node / num_micro_batches

    def operation(index: int, phase: Phase) -> Operation:
        layer = workload.layers[index]
        forward = phase == "forward"
        return Operation(
            layer=layer.name,
            layer_index=index,
            phase=phase,
            stream_in_bytes=layer.weight_bytes if forward else layer.backward_weight_bytes,
            flops_per_node=(layer.forward_flops if forward else layer.backward_flops) * samples,
            grad_out_bytes=0.0 if forward else layer.grad_bytes,
            samples=samples,
            weight_flops_fraction=layer.weight_flops_fraction,
            weight_density=layer.weight_density,
            matmuls=layer.matmuls,
            optical_passes=layer.optical_passes,
            # The first layer's input is data: nothing upstream needs its gradient.
            has_input_gradient=index > 0,
            is_last_layer=index == num_layers - 1,
            output_width=output_width,
        )

    num_layers = len(workload.layers)
    last_matmuls = workload.layers[-1].matmuls
    output_width = last_matmuls[-1].num_outputs if last_matmuls else 0
    operations = tuple(operation(i, "forward") for i in range(num_layers)) + tuple(
        operation(i, "backward") for i in reversed(range(num_layers))
    )
    return CompiledStep(
        workload=workload,
        cluster=cluster,
        operations=operations,
        samples_per_node=samples_per_node,
        num_micro_batches=num_micro_batches,
        samples_per_micro_batch=samples_per_micro_batch,
        activation_bytes_per_sample=per_sample,
        activation_budget_bytes=budget,
        model_state_bytes=state_bytes,
        memoryx_capacity_bytes=capacity,
        update_params=tuple(layer.num_params for layer in workload.layers),
    )


__all__ = ["Cluster", "CompiledStep", "Operation", "compile_step"]
