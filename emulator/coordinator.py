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

import grpc
import torch
from torch import nn

from emulator.config import ClusterConfig
from emulator.emulated import PassMeasurement
from emulator.launch import Cluster
from proto import memoryx_pb2 as mpb
from proto import memoryx_pb2_grpc as mgrpc
from proto import node_pb2_grpc as ngrpc
from proto import swarmx_pb2 as spb
from proto import swarmx_pb2_grpc as sgrpc
from proto import tensor_pb2 as pb
from proto.rpc import channel
from proto.serde import Expected, LayerAssembler, encode_layer


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
        self.memoryx = mgrpc.MemoryXStub(channel(self.cluster.memoryx_address))
        self.root = sgrpc.SwarmXStub(channel(self.cluster.root_address))
        # A backend whose backward needs no weights (DFA) gets a header-only backward stream.
        self.backward_weights = self.config.backend.build().needs_weights_in_backward

    def load_weights(self, layers: list[nn.Module], step: int = 0) -> None:
        def messages():
            for index, layer in enumerate(layers):
                tensors = {n: p.detach().float() for n, p in layer.named_parameters()}
                yield from encode_layer(
                    index,
                    step,
                    pb.FORWARD,
                    tensors,
                    chunk_bytes=self.config.swarmx.chunk_bytes,
                    sender="driver",
                )

        self.memoryx.LoadWeights(messages())

    @property
    def start_step(self) -> int:
        return self.memoryx.Layout(pb.Empty()).step

    def _run_layer(self, layer: int, step: int, phase: int, name: str) -> pb.LayerAck:
        if self.fault is not None:
            self.fault(step, layer, name)
        without_weights = phase == pb.BACKWARD and not self.backward_weights
        return self.root.RunLayer(
            spb.LayerRequest(
                layer=layer,
                step=step,
                phase=phase,
                dtype=self.wire_dtype,
                without_weights=without_weights,
            )
        )

    def _attempt(self, step: int) -> tuple[pb.LayerAck, list[pb.LayerAck]]:
        acks = [
            self._run_layer(layer, step, pb.FORWARD, "forward") for layer in range(self.num_layers)
        ]
        last = acks[-1]
        for layer in reversed(range(self.num_layers)):
            acks.append(self._run_layer(layer, step, pb.BACKWARD, "backward"))
        self.memoryx.CommitStep(mpb.StepRequest(step=step))
        return last, acks

    def train_step(self, step: int) -> StepRecord:
        started = time.perf_counter()
        before = self.memoryx.Stats(pb.Empty())
        for attempt in range(1, self.config.runtime.max_step_retries + 2):
            try:
                last, acks = self._attempt(step)
                break
            except (grpc.RpcError, StepFault) as exc:
                if attempt > self.config.runtime.max_step_retries:
                    raise
                self.last_error = exc
        after = self.memoryx.Stats(pb.Empty())
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
        )
        self.steps.append(record)
        self.measured = [_measurement(a) for a in acks]
        return record

    @property
    def _is_classifier(self) -> bool:
        return self.task == "classification"

    def evaluate(self, step: int) -> EvalRecord:
        for layer in range(self.num_layers):
            ack = self.root.RunLayer(
                spb.LayerRequest(layer=layer, step=step, phase=pb.EVAL, dtype=self.wire_dtype)
            )
        return EvalRecord(
            step=step,
            loss=ack.loss_sum / ack.num_targets,
            accuracy=ack.num_correct / ack.num_targets if self._is_classifier else None,
            num_samples=ack.num_targets // self.tokens_per_sample,
        )

    def fetch_weights(self, step: int) -> list[dict[str, torch.Tensor]]:
        """fp32 master weights of every layer at version ``step``, read back over gRPC."""
        layout = self.memoryx.Layout(pb.Empty())
        weights = []
        self.fetched_masks: list[dict[str, torch.Tensor]] = []
        for index, layer in enumerate(layout.layers):
            stream = self.memoryx.StreamWeights(
                mpb.WeightsRequest(layer=index, step=step, phase=pb.EVAL, dtype="float32")
            )
            spec = [(t.name, tuple(t.shape)) for t in layer.tensors]
            assembler = LayerAssembler(Expected(index, step, pb.EVAL, spec, "float32", sparse=True))
            for message in stream:
                assembler.add(message)
            weights.append(assembler.finish())
            # Masks of the tensors that came sparse (values + index): what MemoryX prunes.
            self.fetched_masks.append(assembler.masks)
        return weights

    def weight_densities(self) -> list[float]:
        """Per layer, the share of its weights that no sparsity mask prunes (1.0: dense)."""
        layout = self.memoryx.Layout(pb.Empty())
        densities = []
        for layer in layout.layers:
            numel = sum(int(torch.Size(t.shape).numel()) for t in layer.tensors)
            densities.append(layer.num_kept / numel if numel else 1.0)
        return densities

    def save_checkpoint(self, path: str) -> mpb.CheckpointReply:
        return self.memoryx.SaveCheckpoint(mpb.CheckpointRequest(path=path))

    def traffic(self) -> dict:
        stats = self.memoryx.Stats(pb.Empty())
        links = []
        for address in self.cluster.swarmx_addresses.values():
            s = sgrpc.SwarmXStub(channel(address)).Stats(pb.Empty())
            links += [{"link": d.link, "payload_bytes": d.payload_bytes} for d in s.down]
            links.append({"link": s.up.link, "payload_bytes": s.up.payload_bytes})
        nodes = [
            ngrpc.ComputeNodeStub(channel(a)).Stats(pb.Empty()) for a in self.cluster.node_addresses
        ]
        return {
            "memoryx_total_egress_bytes": stats.egress_bytes,
            "memoryx_total_ingress_bytes": stats.ingress_bytes,
            "num_updates": stats.num_updates,
            "num_duplicate_gradients": stats.num_duplicate_gradients,
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


_PASS_NAMES = {pb.FORWARD: "forward", pb.BACKWARD: "backward"}


def _measurement(ack: pb.LayerAck) -> PassMeasurement:
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
