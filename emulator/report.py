"""The report of a training run: ``TrainReport`` and its JSON, and the sparsity block."""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import asdict, dataclass, field

import torch

from core.config import to_dict
from core.cost.workload import Workload
from core.precision import precision_format, wire_precision
from emulator.config import ClusterConfig
from emulator.coordinator import Coordinator
from emulator.cost.stats import predict
from emulator.cost.trace import write_trace
from emulator.emulated import EmulatedStep
from emulator.faults import RunFailed
from emulator.groups import GroupedStep, stream_dtype
from emulator.steps import EvalRecord, StepRecord


@dataclass
class TrainReport:
    config: ClusterConfig
    num_layers: int
    num_params: int
    model_bytes: int
    steps: list[StepRecord]
    evals: list[EvalRecord]
    wall_time_s: float
    #: None when a run stopped at once (mid-step) and could not ask its actors.
    traffic: dict | None
    #: None when the run stopped early (see ``stopped``).
    final_weights: list[dict[str, torch.Tensor]] | None = field(repr=False)
    #: The measured step on the emulated hardware (config.hardware); None before any step.
    emulated: EmulatedStep | None = field(repr=False)
    #: Sparse runs: weight densities and the emulated step against the same model dense.
    sparsity: dict | None = None
    #: Sparse runs: per layer, the masks (True = pruned) MemoryX held at the end.
    final_masks: list[dict[str, torch.Tensor]] | None = field(default=None, repr=False)
    #: node_groups runs: each group's emulated step (the slowest sets the step time).
    grouped: GroupedStep | None = field(default=None, repr=False)
    #: A run that ended early: why, after how many steps, and its checkpoint (None: it finished).
    stopped: dict | None = None
    #: Components replaced during the run (emulator.faults.Restart as dicts).
    faults: list[dict] = field(default_factory=list)
    #: Failures that needed no replacement (the step or pass was run again): step, error.
    retries: list[dict] = field(default_factory=list)
    #: Launch cost, processes, placement and the emulator's peak memory (RuntimeWatch).
    runtime: dict = field(default_factory=dict)

    @property
    def final_loss(self) -> float | None:
        return self.steps[-1].loss if self.steps else None

    def to_json(self) -> dict:
        last = self.steps[-1] if self.steps else None
        final_eval = self.evals[-1] if self.evals else None

        def per_step(name: str) -> int | None:
            return getattr(last, name) if last is not None else None

        return {
            "config": to_dict(self.config),
            "model": {
                "name": self.config.model.name,
                "num_layers": self.num_layers,
                "num_params": self.num_params,
                "bytes_per_pass_fp32": self.model_bytes,
            },
            "final_loss": self.final_loss,
            "eval": asdict(final_eval) if final_eval else None,
            "wall_time_s": self.wall_time_s,
            # Median after the first step: step 0 pays for connections and FLOP counting.
            "step_wall_time_s": statistics.median(
                s.wall_time_s for s in self.steps[1:] or self.steps
            )
            if self.steps
            else None,
            # Steps MemoryX skipped for NaN/Inf values (optimizer.nonfinite = skip).
            "num_skipped_steps": sum(s.skipped for s in self.steps),
            "stopped": self.stopped,
            "traffic": {
                # Per training step (every step moves the same bytes; the last is reported).
                "memoryx_egress_bytes": per_step("memoryx_egress_bytes"),
                "memoryx_ingress_bytes": per_step("memoryx_ingress_bytes"),
                "weight_bytes_per_pass": self.num_params * self._wire_bytes_per_element,
                "gradient_bytes_per_pass": self.num_params * 4,
                # DFA's backward pass streams no weights.
                "num_passes_streamed": 2 if self.config.backend.needs_weights_in_backward else 1,
                "bytes_delivered_to_nodes": per_step("bytes_to_nodes"),
                "bytes_delivered_per_node": last.bytes_to_nodes // self.config.num_nodes
                if last is not None
                else None,
                "gradient_bytes_from_nodes": per_step("gradient_bytes_from_nodes"),
                "totals": self.traffic,
            },
            "emulated": self._emulated_json() if self.emulated is not None else None,
            "memoryx": self.memoryx_json() if self.traffic is not None and self.steps else None,
            "runtime": self.runtime,
            "sparsity": self.sparsity,
            "steps": [asdict(s) for s in self.steps],
            "evals": [asdict(e) for e in self.evals],
            "faults": self.faults,
            "retries": self.retries,
        }

    def memoryx_json(self) -> dict:
        """Where MemoryX kept the state: servers, RAM at the peak, disk traffic per step."""
        memoryx = self.config.memoryx
        last = self.steps[-1]
        return {
            "num_servers": memoryx.num_servers,
            "ram_budget_bytes": memoryx.ram_budget_bytes,
            "state_bytes": self.traffic["memoryx_state_bytes"],
            "state_bytes_per_server": self.traffic.get("memoryx_state_bytes_per_server"),
            # Tensor bytes held in RAM at each server's peak, summed over the servers.
            "peak_resident_bytes": self.traffic["memoryx_peak_resident_bytes"],
            "disk_read_bytes_per_step": last.memoryx_disk_read_bytes,
            "disk_written_bytes_per_step": last.memoryx_disk_written_bytes,
            # The servers' processes (Python, torch, gRPC included), summed: what the OS sees.
            "process_peak_rss_bytes": self.traffic["memoryx_process_peak_rss_bytes"],
        }

    def _emulated_json(self) -> dict:
        if self.grouped is None:
            return self.emulated.to_json()
        swarmx = self.config.emulated_hardware.build().swarmx
        power_w = (
            sum(swarmx.nodes_per_level(self.config.num_nodes)) * swarmx.config.power_w_per_node
        )
        return self.grouped.to_json(swarmx_power_w=power_w)

    def write_trace(self, path: str) -> None:
        """Chrome-trace JSON of one emulated step: MemoryX, each SwarmX node, each node
        (in a node_groups run, each group's nodes under the group's name)."""
        if self.emulated is None:
            raise ValueError("the run stopped before its first step: there is no step to trace.")
        if self.grouped is None:
            self.emulated.write_trace(path)
        else:
            write_trace(self.grouped.events(), path)

    @property
    def _wire_bytes_per_element(self) -> int:
        return precision_format(wire_precision(stream_dtype(self.config))).bytes_per_element


def sparsity_report(
    workload: Workload,
    densities: list[float],
    emulated: EmulatedStep,
    hardware,
    num_nodes: int,
    *,
    wire_precision: str,
) -> dict:
    """The JSON ``sparsity`` block: densities, bytes and emulated step time vs dense.

    The dense step is the measured workload with every layer's bytes at full
    size (weights in the wire dtype, gradients fp32) and density 1.
    """
    itemsize = precision_format(wire_precision).bytes_per_element
    dense = dataclasses.replace(
        workload,
        layers=tuple(
            dataclasses.replace(
                layer,
                weight_bytes=layer.num_params * itemsize,
                grad_bytes=layer.num_params * 4,
                weight_density=1.0,
            )
            for layer in workload.layers
        ),
    )
    dense_time = predict(dense, hardware, num_nodes, engine=emulated.engine).step_time_s
    sparse_time = emulated.stats.step_time_s
    num_params = [layer.num_params for layer in workload.layers]
    kept = sum(d * n for d, n in zip(densities, num_params, strict=True))
    return {
        "density": kept / sum(num_params),
        "layer_densities": densities,
        "weight_bytes_per_pass": sum(x.weight_bytes for x in workload.layers),
        "dense_weight_bytes_per_pass": sum(x.weight_bytes for x in dense.layers),
        "gradient_bytes_per_pass": sum(x.grad_bytes for x in workload.layers),
        "dense_gradient_bytes_per_pass": sum(x.grad_bytes for x in dense.layers),
        "emulated_step_time_s": sparse_time,
        "dense_emulated_step_time_s": dense_time,
        "emulated_speedup": dense_time / sparse_time,
    }


def partial_report(
    config: ClusterConfig, coordinator: Coordinator, evals: list[EvalRecord], failed: RunFailed
) -> dict:
    """The JSON report of a run that could not finish: the steps done so far and why it stopped."""
    return {
        "config": to_dict(config),
        "completed": False,
        "error": {
            "message": str(failed),
            "component": failed.component,
            "step": failed.step,
            "cause": failed.cause,
        },
        "final_loss": coordinator.steps[-1].loss if coordinator.steps else None,
        "steps": [asdict(s) for s in coordinator.steps],
        "evals": [asdict(e) for e in evals],
        "faults": coordinator.supervisor.report(),
        "retries": coordinator.supervisor.retried,
    }
