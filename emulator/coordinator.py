"""The step coordinator: drives weight-streamed training over gRPC.

One step k:
  forward   for each layer l = 0..L-1: the root SwarmX pulls layer l (version
            k) from MemoryX and broadcasts it; every node computes its shard.
  backward  for each layer l = L-1..0: the weights stream in again; every
            node computes its gradients and sends them up; SwarmX sums them;
            MemoryX applies the update for layer l as soon as it arrives.
  commit    MemoryX drops its snapshots of version k.
A step that fails part-way is run again from its forward pass: MemoryX
serves version-k weights and ignores gradients it has already applied.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from emulator.config import ClusterConfig
from emulator.emulated import PassMeasurement
from emulator.launch import Cluster
from emulator.shards import MemoryXServers
from memoryx.checkpoint import confined_path, write_manifest
from proto.clients import (
    LAYER_TIMEOUT_S,
    NodeClient,
    RpcError,
    SwarmXClient,
    timeout_for,
    wire_bytes,
)
from proto.domain import CheckpointInfo, LayerAck, LayerRequest, Phase
from proto.rpc import NONFINITE_STATUS


def group_layers(blocks: list[nn.Module]) -> list[nn.Module]:
    """Streamed layers: each block with parameters, with parameterless blocks folded in.

    A block without weights (an activation, a reshape) streams nothing, so
    it runs as part of the layer before it (or after it, at the start).
    """
    groups: list[list[nn.Module]] = []
    pending: list[nn.Module] = []
    for block in blocks:
        has_params = any(True for _ in block.parameters())
        if has_params:
            groups.append([*pending, block])
            pending = []
        elif groups:
            groups[-1].append(block)
        else:
            pending.append(block)
    if not groups:
        raise ValueError("the model has no parameters to train; at least one block needs weights.")
    groups[-1].extend(pending)
    return [g[0] if len(g) == 1 else nn.Sequential(*g) for g in groups]


@dataclass
class StepRecord:
    step: int
    loss: float
    accuracy: float | None
    memoryx_egress_bytes: int
    memoryx_ingress_bytes: int
    bytes_to_nodes: int
    gradient_bytes_from_nodes: int
    flops: float
    node_compute_seconds: float
    wall_time_s: float
    num_attempts: int
    #: Disk tier traffic of all MemoryX servers in this step (0 when the state is in RAM).
    memoryx_disk_read_bytes: int = 0
    memoryx_disk_written_bytes: int = 0
    #: MemoryX refused a NaN/Inf update and skipped the step (optimizer.nonfinite = skip).
    skipped: bool = False


@dataclass
class EvalRecord:
    step: int
    loss: float
    accuracy: float | None
    num_samples: int


@dataclass
class Coordinator:
    config: ClusterConfig
    cluster: Cluster
    num_layers: int
    wire_dtype: str
    task: str
    tokens_per_sample: int
    #: Test seam: called before each layer phase; raising simulates a failure there.
    fault: Callable[[int, int, str], None] | None = None
    steps: list[StepRecord] = field(default_factory=list)
    #: Per layer and pass, what the last training step moved and computed (see emulator.emulated).
    measured: list[PassMeasurement] = field(default_factory=list)

    def __post_init__(self) -> None:
        security = self.cluster.security
        self.memoryx = MemoryXServers(
            self.cluster.memoryx_addresses, self.cluster.memoryx_layers, security
        )
        self.root = SwarmXClient(self.cluster.root_address, security)
        # A backend whose backward needs no weights (DFA) gets a header-only backward stream.
        self.backward_weights = self.config.backend.needs_weights_in_backward
        self._layer_timeouts_s: list[float] | None = None

    def load_weights(self, layers: list[nn.Module], step: int = 0) -> None:
        self.memoryx.load_weights(
            [{n: p.detach().float() for n, p in layer.named_parameters()} for layer in layers],
            step=step,
            chunk_bytes=self.config.swarmx.chunk_bytes,
            sender="driver",
        )

    @property
    def start_step(self) -> int:
        return self.memoryx.layout().step

    def _layer_timeout_s(self, layer: int) -> float:
        """Deadline of a pass of ``layer``: its fixed part plus the bytes broadcast to every node."""
        if self._layer_timeouts_s is None:
            num_nodes = len(self.cluster.node_addresses)
            self._layer_timeouts_s = [
                timeout_for(num_nodes * wire_bytes(spec.spec, self.wire_dtype), LAYER_TIMEOUT_S)
                for spec in self.memoryx.layout().layers
            ]
        return self._layer_timeouts_s[layer]

    def _run_layer(self, layer: int, step: int, phase: Phase, name: str) -> LayerAck:
        if self.fault is not None:
            self.fault(step, layer, name)
        without_weights = phase == Phase.BACKWARD and not self.backward_weights
        return self.root.run_layer(
            LayerRequest(
                layer=layer,
                step=step,
                phase=phase,
                dtype=self.wire_dtype,
                without_weights=without_weights,
            ),
            timeout_s=self._layer_timeout_s(layer),
        )

    def _attempt(self, step: int) -> tuple[LayerAck, list[LayerAck]]:
        acks = [
            self._run_layer(layer, step, Phase.FORWARD, "forward")
            for layer in range(self.num_layers)
        ]
        last = acks[-1]
        for layer in reversed(range(self.num_layers)):
            acks.append(self._run_layer(layer, step, Phase.BACKWARD, "backward"))
        self.memoryx.commit_step(step)
        return last, acks

    def train_step(self, step: int) -> StepRecord:
        started = time.perf_counter()
        before = self.memoryx.stats()
        for attempt in range(1, self.config.runtime.max_step_retries + 2):
            try:
                last, acks = self._attempt(step)
                break
            except (RpcError, StepFault) as exc:
                if isinstance(exc, RpcError) and exc.code() == NONFINITE_STATUS:
                    raise NonFiniteError(exc.details()) from None  # a re-run computes the same
                if attempt > self.config.runtime.max_step_retries:
                    raise
                self.last_error = exc
        after = self.memoryx.stats()
        record = StepRecord(
            step=step,
            loss=last.loss_sum / last.num_targets,
            accuracy=last.num_correct / last.num_targets if self._is_classifier else None,
            memoryx_egress_bytes=after.egress_bytes - before.egress_bytes,
            memoryx_ingress_bytes=after.ingress_bytes - before.ingress_bytes,
            bytes_to_nodes=sum(a.bytes_to_nodes for a in acks),
            gradient_bytes_from_nodes=sum(a.gradient_bytes for a in acks),
            flops=sum(a.flops for a in acks),
            node_compute_seconds=sum(a.compute_seconds for a in acks),
            wall_time_s=time.perf_counter() - started,
            num_attempts=attempt,
            memoryx_disk_read_bytes=after.disk_read_bytes - before.disk_read_bytes,
            memoryx_disk_written_bytes=after.disk_written_bytes - before.disk_written_bytes,
            skipped=after.num_skipped_steps > before.num_skipped_steps,
        )
        self.steps.append(record)
        self.measured = [_measurement(a) for a in acks]
        return record

    @property
    def _is_classifier(self) -> bool:
        return self.task == "classification"

    def evaluate(self, step: int) -> EvalRecord:
        for layer in range(self.num_layers):
            ack = self.root.run_layer(
                LayerRequest(layer=layer, step=step, phase=Phase.EVAL, dtype=self.wire_dtype),
                timeout_s=self._layer_timeout_s(layer),
            )
        return EvalRecord(
            step=step,
            loss=ack.loss_sum / ack.num_targets,
            accuracy=ack.num_correct / ack.num_targets if self._is_classifier else None,
            num_samples=ack.num_targets // self.tokens_per_sample,
        )

    def fetch_weights(self, step: int) -> list[dict[str, torch.Tensor]]:
        """fp32 master weights of every layer at version ``step``, read back over gRPC."""
        layout = self.memoryx.layout()
        weights = []
        self.fetched_masks: list[dict[str, torch.Tensor]] = []
        for index, layer in enumerate(layout.layers):
            tensors, masks = self.memoryx.fetch_layer(index, step, layer.spec, dtype="float32")
            weights.append(tensors)
            # Masks of the tensors that came sparse (values + index): what MemoryX prunes.
            self.fetched_masks.append(masks)
        return weights

    def weight_densities(self) -> list[float]:
        """Per layer, the share of its weights that no sparsity mask prunes (1.0: dense)."""
        densities = []
        for layer in self.memoryx.layout().layers:
            numel = sum(int(torch.Size(t.shape).numel()) for t in layer.tensors)
            densities.append(layer.num_kept / numel if numel else 1.0)
        return densities

    def save_checkpoint(self, path: str) -> list[CheckpointInfo]:
        """MemoryX saves into the run's checkpoint directory; the driver copies it to ``path``."""
        saved = self.memoryx.save_checkpoint()
        names = {info.name for info in saved}
        if len(names) != 1:
            raise RuntimeError(f"the MemoryX servers saved different checkpoints {sorted(names)}.")
        name = saved[0].name
        if self.config.memoryx.directory_checkpoints:
            # Every server wrote its layers and part there; the manifest, last, makes it whole.
            directory = confined_path(self.cluster.checkpoint_dir, name)
            write_manifest(
                directory, sorted(directory.glob("part-*.json")), optimizer=self.config.optimizer
            )
        self.cluster.export_checkpoint(name, path)
        return saved

    def traffic(self) -> dict:
        stats = self.memoryx.stats()
        links = []
        for address in self.cluster.swarmx_addresses.values():
            s = SwarmXClient(address, self.cluster.security).stats()
            links += [{"link": d.link, "payload_bytes": d.payload_bytes} for d in s.down]
            links.append({"link": s.up.link, "payload_bytes": s.up.payload_bytes})
        nodes = [NodeClient(a, self.cluster.security).stats() for a in self.cluster.node_addresses]
        return {
            "memoryx_total_egress_bytes": stats.egress_bytes,
            "memoryx_total_ingress_bytes": stats.ingress_bytes,
            "num_updates": stats.num_updates,
            "num_duplicate_gradients": stats.num_duplicate_gradients,
            # Summed over the MemoryX servers (each server's own peak).
            "memoryx_state_bytes": stats.state_bytes,
            "memoryx_peak_resident_bytes": stats.peak_resident_bytes,
            "memoryx_disk_read_bytes": stats.disk_read_bytes,
            "memoryx_disk_written_bytes": stats.disk_written_bytes,
            "memoryx_process_peak_rss_bytes": stats.process_peak_rss_bytes,
            "links": links,
            "nodes": [
                {
                    "rank": n.rank,
                    "weight_bytes_received": n.weight_bytes_received,
                    "gradient_bytes_sent": n.gradient_bytes_sent,
                    "peak_activation_bytes": n.peak_activation_bytes,
                    "weight_bytes_held": n.weight_bytes_held,
                    "backend": dict(n.backend_stats),
                }
                for n in nodes
            ],
        }


_PASS_NAMES = {Phase.FORWARD: "forward", Phase.BACKWARD: "backward"}


def _measurement(ack: LayerAck) -> PassMeasurement:
    return PassMeasurement(
        layer=ack.layer,
        phase=_PASS_NAMES[ack.phase],
        num_nodes=ack.num_nodes,
        bytes_to_nodes=ack.bytes_to_nodes,
        gradient_bytes=ack.gradient_bytes,
        flops=ack.flops,
    )


class StepFault(Exception):
    """Raised by a ``Coordinator.fault`` hook to simulate a failure mid-step."""


class NonFiniteError(Exception):
    """MemoryX refused a NaN/Inf update (optimizer.nonfinite = error); the message names layer and step."""
