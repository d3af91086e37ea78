"""Typed clients of the services: domain arguments in, domain answers out.

The coordinator talks to MemoryX, the SwarmX root and the compute nodes
through these; protobuf messages and stubs stay behind them. Every call has a
deadline: ``CALL_TIMEOUT_S`` for a call that moves no bulk data, plus
``1 / MIN_RATE_BYTES_PER_S`` seconds per byte for one that does; a layer pass
through the tree gets ``LAYER_TIMEOUT_S`` on top, as the nodes compute too.
A call past its deadline raises ``RpcError`` (DEADLINE_EXCEEDED).

Channels come from ``proto.rpc.channel``, the one place a channel is made;
each client takes the run's ``Security`` (token, TLS) for it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import grpc
import torch

from proto import memoryx_pb2_grpc as mgrpc
from proto import node_pb2_grpc as ngrpc
from proto import swarmx_pb2_grpc as sgrpc
from proto.domain import (
    CheckpointInfo,
    LayerAck,
    LayerRequest,
    ModelLayout,
    NodeStats,
    Phase,
    SwarmXStats,
    TrafficStats,
)
from proto.messages import (
    EMPTY,
    ack_from_wire,
    checkpoint_from_wire,
    checkpoint_request_to_wire,
    layer_request_to_wire,
    layout_from_wire,
    node_stats_from_wire,
    step_request_to_wire,
    swarmx_stats_from_wire,
    traffic_from_wire,
    weights_request_to_wire,
)
from proto.rpc import Security, channel
from proto.serde import DEFAULT_CHUNK_BYTES, WIRE_DTYPES, Expected, LayerAssembler, encode_layer

#: What a failed call raises (a gRPC status: code() and details()).
RpcError = grpc.RpcError

#: Deadline of a call that moves no bulk data, and the fixed part of one that does, s.
CALL_TIMEOUT_S = 60.0
#: The slowest transfer a healthy call still makes; loopback on a loaded 2-core machine
#: moves well over 100 MB/s, so only a hung peer falls below this, bytes/s.
MIN_RATE_BYTES_PER_S = 1 << 20
#: The fixed part of a layer pass through the tree, which also waits for the nodes'
#: compute (forward, backward, optimizer update), s.
LAYER_TIMEOUT_S = 600.0
#: A checkpoint holds the weights and up to this many fp32 copies more (optimizer state, masks).
CHECKPOINT_COPIES = 4
#: A caller's time left beyond this means it set no deadline, s.
_NO_DEADLINE_S = 1e9


def timeout_for(num_bytes: int, base_s: float = CALL_TIMEOUT_S) -> float:
    """Deadline, in seconds, of a call that moves ``num_bytes`` of payload."""
    return base_s + num_bytes / MIN_RATE_BYTES_PER_S


def wire_bytes(spec: Sequence[tuple[str, Sequence[int]]], dtype: str = "float32") -> int:
    """Dense payload bytes of tensors of these ``(name, shape)`` in ``dtype`` on the wire."""
    itemsize = WIRE_DTYPES[dtype].itemsize
    return sum(int(torch.Size(shape).numel()) * itemsize for _, shape in spec)


def time_left_s(context: grpc.ServicerContext) -> float:
    """Deadline for a call a servicer makes on behalf of ``context``'s call: what it has left.

    A caller that set no deadline gets ``LAYER_TIMEOUT_S``: every call still has one.
    """
    left = context.time_remaining()
    # Without a deadline gRPC reports None or the distance to the end of time (~292 years).
    return LAYER_TIMEOUT_S if left is None or left > _NO_DEADLINE_S else left


class MemoryXClient:
    """The parameter server, as the driver sees it."""

    def __init__(self, address: str, security: Security):
        self.address = address
        self._stub = mgrpc.MemoryXStub(channel(address, security))

    def load_weights(
        self,
        layers: Sequence[Mapping[str, torch.Tensor]],
        *,
        step: int = 0,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        sender: str = "driver",
        timeout_s: float | None = None,
        first_layer: int = 0,
    ) -> None:
        """Load the initial weights, layer ``first_layer + i`` = ``layers[i]`` (sent as fp32),
        valid at ``step``; ``first_layer`` > 0 for a server that holds a later slice."""
        if timeout_s is None:
            timeout_s = timeout_for(sum(t.numel() * 4 for layer in layers for t in layer.values()))

        def messages():
            for index, tensors in enumerate(layers, start=first_layer):
                yield from encode_layer(
                    index,
                    step,
                    Phase.FORWARD,
                    {name: t.detach().float() for name, t in tensors.items()},
                    chunk_bytes=chunk_bytes,
                    sender=sender,
                )

        self._stub.LoadWeights(messages(), timeout=timeout_s)

    def layout(self, *, timeout_s: float = CALL_TIMEOUT_S) -> ModelLayout:
        return layout_from_wire(self._stub.Layout(EMPTY, timeout=timeout_s))

    def fetch_layer(
        self,
        layer: int,
        step: int,
        spec: Sequence[tuple[str, tuple[int, ...]]],
        *,
        phase: int = Phase.EVAL,
        dtype: str = "float32",
        timeout_s: float | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The weights of ``layer`` at version ``step`` (tensors ``spec``), and the masks
        (True = pruned) of those that came as values + index."""
        if timeout_s is None:
            timeout_s = timeout_for(wire_bytes(spec, dtype))
        stream = self._stub.StreamWeights(
            weights_request_to_wire(LayerRequest(layer, step, phase, dtype)), timeout=timeout_s
        )
        assembler = LayerAssembler(Expected(layer, step, phase, spec, dtype, sparse=True))
        try:
            for message in stream:
                assembler.add(message)
        finally:
            stream.cancel()  # a no-op once the stream is complete
        return assembler.finish(), assembler.masks

    def commit_step(self, step: int, *, timeout_s: float = CALL_TIMEOUT_S) -> None:
        self._stub.CommitStep(step_request_to_wire(step), timeout=timeout_s)

    def save_checkpoint(self, *, timeout_s: float | None = None) -> CheckpointInfo:
        """Write a checkpoint into the run's checkpoint directory, under a name MemoryX chooses."""
        if timeout_s is None:
            model_bytes = sum(wire_bytes(layer.spec) for layer in self.layout().layers)
            timeout_s = timeout_for(CHECKPOINT_COPIES * model_bytes)
        reply = self._stub.SaveCheckpoint(checkpoint_request_to_wire(), timeout=timeout_s)
        return checkpoint_from_wire(reply)

    def stats(self, *, timeout_s: float = CALL_TIMEOUT_S) -> TrafficStats:
        return traffic_from_wire(self._stub.Stats(EMPTY, timeout=timeout_s))

    def reset_stats(self, *, timeout_s: float = CALL_TIMEOUT_S) -> None:
        self._stub.ResetStats(EMPTY, timeout=timeout_s)


class SwarmXClient:
    """A SwarmX node of the tree; ``run_layer`` only at the root."""

    def __init__(self, address: str, security: Security):
        self.address = address
        self._stub = sgrpc.SwarmXStub(channel(address, security))

    def run_layer(self, request: LayerRequest, *, timeout_s: float = LAYER_TIMEOUT_S) -> LayerAck:
        """Stream one layer from MemoryX through the tree; the sum of the nodes' answers."""
        return ack_from_wire(self._stub.RunLayer(layer_request_to_wire(request), timeout=timeout_s))

    def stats(self, *, timeout_s: float = CALL_TIMEOUT_S) -> SwarmXStats:
        return swarmx_stats_from_wire(self._stub.Stats(EMPTY, timeout=timeout_s))

    def reset_stats(self, *, timeout_s: float = CALL_TIMEOUT_S) -> None:
        self._stub.ResetStats(EMPTY, timeout=timeout_s)


class NodeClient:
    """A compute node's counters."""

    def __init__(self, address: str, security: Security):
        self.address = address
        self._stub = ngrpc.ComputeNodeStub(channel(address, security))

    def stats(self, *, timeout_s: float = CALL_TIMEOUT_S) -> NodeStats:
        return node_stats_from_wire(self._stub.Stats(EMPTY, timeout=timeout_s))

    def reset_stats(self, *, timeout_s: float = CALL_TIMEOUT_S) -> None:
        self._stub.ResetStats(EMPTY, timeout=timeout_s)


__all__ = [
    "CALL_TIMEOUT_S",
    "LAYER_TIMEOUT_S",
    "MemoryXClient",
    "NodeClient",
    "RpcError",
    "SwarmXClient",
    "time_left_s",
    "timeout_for",
    "wire_bytes",
]
