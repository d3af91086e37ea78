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

import math
import queue
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

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
from proto.frames import WireError
from proto.kept_streams import OwnedStream, StreamPool
from proto.loop_streams import StreamError
from proto.messages import (
    EMPTY,
    ack_from_wire,
    acks_from_wire,
    checkpoint_from_wire,
    checkpoint_request_to_wire,
    layer_request_to_wire,
    layout_from_wire,
    node_stats_from_wire,
    requests_to_wire,
    step_request_to_wire,
    swarmx_stats_from_wire,
    traffic_from_wire,
    weights_request_to_wire,
)
from proto.rpc import LAYER_TIMEOUT_S, Security, channel, time_left_s
from proto.serde import DEFAULT_CHUNK_BYTES, WIRE_DTYPES, Expected, LayerAssembler, layer_items
from proto.wire import fast_channel

#: What a failed call raises (a gRPC status: code() and details()).
RpcError = grpc.RpcError

#: Deadline of a call that moves no bulk data, and the fixed part of one that does, s.
CALL_TIMEOUT_S = 60.0
#: The slowest transfer a healthy call still makes; loopback on a loaded 2-core machine
#: moves well over 100 MB/s, so only a hung peer falls below this, bytes/s.
MIN_RATE_BYTES_PER_S = 1 << 20
#: A checkpoint holds the weights and up to this many fp32 copies more (optimizer state, masks).
CHECKPOINT_COPIES = 4
#: A pass's requests sent at once go this many to a message (a request is some 30 bytes).
REQUESTS_PER_MESSAGE = 1024


def timeout_for(
    num_bytes: int,
    base_s: float = CALL_TIMEOUT_S,
    min_rate_bytes_per_s: float = MIN_RATE_BYTES_PER_S,
) -> float:
    """Deadline, in seconds, of a call that moves ``num_bytes`` of payload."""
    return base_s + num_bytes / min_rate_bytes_per_s


@dataclass(frozen=True)
class Deadlines:
    """The constants deadlines are derived from (``runtime.rpc_timeout_s`` and friends)."""

    #: Deadline of a call that moves no bulk data, and the fixed part of one that does, s.
    call_timeout_s: float = CALL_TIMEOUT_S
    #: The slowest transfer a healthy call still makes, bytes/s.
    min_rate_bytes_per_s: float = MIN_RATE_BYTES_PER_S
    #: The fixed part of a layer pass through the tree, s.
    layer_timeout_s: float = LAYER_TIMEOUT_S

    def for_bytes(self, num_bytes: int) -> float:
        """Deadline of a call that moves ``num_bytes``, s."""
        return timeout_for(num_bytes, self.call_timeout_s, self.min_rate_bytes_per_s)

    def for_layer(self, num_bytes: int) -> float:
        """Deadline of a layer pass through the tree that delivers ``num_bytes`` in all, s."""
        return timeout_for(num_bytes, self.layer_timeout_s, self.min_rate_bytes_per_s)


DEFAULT_DEADLINES = Deadlines()


def wire_bytes(spec: Sequence[tuple[str, Sequence[int]]], dtype: str = "float32") -> int:
    """Dense payload bytes of tensors of these ``(name, shape)`` in ``dtype`` on the wire."""
    itemsize = WIRE_DTYPES[dtype].itemsize
    return sum(int(torch.Size(shape).numel()) * itemsize for _, shape in spec)


class MemoryXClient:
    """The parameter server, as the driver sees it."""

    def __init__(self, address: str, security: Security, deadlines: Deadlines = DEFAULT_DEADLINES):
        self.address = address
        self.deadlines = deadlines
        self._stub = mgrpc.MemoryXStub(fast_channel(channel(address, security)))

    def load_weights(
        self,
        layers: Iterable[Mapping[str, torch.Tensor]],
        *,
        step: int = 0,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        sender: str = "driver",
        timeout_s: float | None = None,
        first_layer: int = 0,
        num_bytes: int | None = None,
    ) -> None:
        """Load the initial weights, layer ``first_layer + i`` = ``layers[i]`` (sent as fp32),
        valid at ``step``; ``first_layer`` > 0 for a server that holds a later slice.

        ``layers`` is read one layer at a time as the stream goes; with ``num_bytes`` (their
        fp32 bytes, for the deadline) it may be a generator that makes each layer then."""
        if timeout_s is None:
            if num_bytes is None:
                layers = list(layers)
                num_bytes = sum(t.numel() * 4 for layer in layers for t in layer.values())
            timeout_s = self.deadlines.for_bytes(num_bytes)

        def messages():
            for index, tensors in enumerate(layers, start=first_layer):
                yield from layer_items(
                    index,
                    step,
                    Phase.FORWARD,
                    {name: t.detach().float() for name, t in tensors.items()},
                    chunk_bytes=chunk_bytes,
                    sender=sender,
                )

        self._stub.LoadWeights(messages(), timeout=timeout_s)

    def layout(self, *, timeout_s: float | None = None) -> ModelLayout:
        return layout_from_wire(self._stub.Layout(EMPTY, timeout=self._call(timeout_s)))

    def _call(self, timeout_s: float | None) -> float:
        return self.deadlines.call_timeout_s if timeout_s is None else timeout_s

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
            timeout_s = self.deadlines.for_bytes(wire_bytes(spec, dtype))
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

    def commit_step(self, step: int, *, timeout_s: float | None = None) -> TrafficStats:
        """Commit ``step``; the server's counters (as ``stats``) once it is committed."""
        reply = self._stub.CommitStep(step_request_to_wire(step), timeout=self._call(timeout_s))
        return traffic_from_wire(reply)

    def save_checkpoint(self, *, timeout_s: float | None = None) -> CheckpointInfo:
        """Write a checkpoint into the run's checkpoint directory, under a name MemoryX chooses."""
        if timeout_s is None:
            model_bytes = sum(wire_bytes(layer.spec) for layer in self.layout().layers)
            timeout_s = self.deadlines.for_bytes(CHECKPOINT_COPIES * model_bytes)
        reply = self._stub.SaveCheckpoint(checkpoint_request_to_wire(), timeout=timeout_s)
        return checkpoint_from_wire(reply)

    def stats(self, *, timeout_s: float | None = None) -> TrafficStats:
        return traffic_from_wire(self._stub.Stats(EMPTY, timeout=self._call(timeout_s)))

    def reset_stats(self, *, timeout_s: float | None = None) -> None:
        self._stub.ResetStats(EMPTY, timeout=self._call(timeout_s))


class SwarmXClient:
    """A SwarmX node of the tree; ``run_layer`` only at the root."""

    def __init__(self, address: str, security: Security, deadlines: Deadlines = DEFAULT_DEADLINES):
        self.address = address
        self.deadlines = deadlines
        self._stub = sgrpc.SwarmXStub(channel(address, security))
        # The RunPass stream kept between passes (``start_pass``'s ``keep``).
        self._kept = StreamPool(idle_limit_s=security.stream_idle_s / 2)

    def run_layer(self, request: LayerRequest, *, timeout_s: float | None = None) -> LayerAck:
        """Stream one layer from MemoryX through the tree; the sum of the nodes' answers."""
        return self.start_layer(request, timeout_s=timeout_s).result()

    def start_layer(self, request: LayerRequest, *, timeout_s: float | None = None) -> PendingLayer:
        """``run_layer`` without waiting: the caller can watch the cluster's health meanwhile."""
        if timeout_s is None:
            timeout_s = self.deadlines.layer_timeout_s
        return PendingLayer(
            self._stub.RunLayer.future(layer_request_to_wire(request), timeout=timeout_s)
        )

    def start_pass(self, *, timeout_s: float, keep: bool = False) -> PendingPass:
        """A pass on a ``RunPass`` call: send its layer requests as they are due and take
        each layer's answer in order (``PendingPass``); ``timeout_s`` is the whole pass's.

        ``keep``: on the call the last such pass ran on, if it can carry this one (open,
        its deadline far enough, waited less than half ``stream_idle_s``:
        ``proto.kept_streams``), kept for the next once this pass is answered; a call's
        set-up costs more than a small model's pass of messages on it. A root whose
        MemoryX splits layers reads one pass per call: not for it."""

        # Unbounded queues, as before: the driver may send a pass's requests before reading
        # its answers.
        def open_stream(timeout_s: float, wiring: int = 0) -> OwnedStream:
            return OwnedStream(self._stub.RunPass, timeout_s, wiring, depth=math.inf)

        if not keep:
            return PendingPass(open_stream(timeout_s), timeout_s)
        stream = self._kept.take(_RUN_PASS, open_stream, timeout_s)
        return PendingPass(stream, timeout_s, done=lambda s: self._kept.give_back(_RUN_PASS, s))

    def close(self) -> None:
        """End the kept ``RunPass`` stream, if any."""
        self._kept.clear()

    def stats(self, *, timeout_s: float | None = None) -> SwarmXStats:
        return swarmx_stats_from_wire(
            self._stub.Stats(EMPTY, timeout=_or(timeout_s, self.deadlines))
        )

    def reset_stats(self, *, timeout_s: float | None = None) -> None:
        self._stub.ResetStats(EMPTY, timeout=_or(timeout_s, self.deadlines))


class PendingLayer:
    """A layer pass under way; ``result`` waits for its answer."""

    def __init__(self, future: grpc.Future):
        self._future = future

    def result(self, timeout_s: float | None = None) -> LayerAck:
        """The answer; ``TimeoutError`` if it has not come within ``timeout_s`` (the call goes on),
        ``RpcError`` if the call failed."""
        try:
            return ack_from_wire(self._future.result(timeout=timeout_s))
        except grpc.FutureTimeoutError:
            raise TimeoutError from None

    def cancel(self) -> None:
        self._future.cancel()


#: The key of the driver's kept ``RunPass`` stream in its pool (``SwarmXClient``).
_RUN_PASS = "run-pass"

#: Ends a pass's answers (``PendingPass``).
_END = object()


class PendingPass:
    """A pass under way on a ``RunPass`` call: ``send`` each layer's request when it is
    due, ``next_ack`` waits for the next answer (they come in request order). The call
    runs on the process's event loop (``proto.loop_streams``), as every pass stream does.

    On a kept stream (``done`` given) the pass ends with its last answer, which gives the
    stream back for the next pass; ``close`` then leaves it open, and the pass's deadline
    (``timeout_s``) is kept here: ``next_ack`` fails with DEADLINE_EXCEEDED, and cancels
    the stream, once it has passed."""

    def __init__(
        self,
        stream: OwnedStream,
        timeout_s: float,
        done: Callable[[OwnedStream], None] | None = None,
    ):
        self._answers: queue.Queue = queue.Queue()
        self._stream = stream
        self._done = done
        self._deadline = time.monotonic() + timeout_s
        self._pass_length: int | None = None
        self._num_answered = 0
        stream.owner = self

    def _answered(self, message) -> None:
        # The root answers the layers that completed at once in one message.
        try:
            acks = acks_from_wire(message)
        except WireError as exc:
            self._answers.put(exc)
            self._stream.call.cancel()
            return
        self._num_answered += len(acks)
        if self._done is not None and self._num_answered == self._pass_length:
            # Before the last answer is read: the next pass finds the stream.
            self._stream.owner = None
            self._done(self._stream)
        for ack in acks:
            self._answers.put(ack)

    def _ended(self, error: BaseException | None) -> None:
        if error is not None:
            self._answers.put(error)
        self._answers.put(_END)

    def _sending(self, requests: Sequence[LayerRequest]) -> None:
        if self._pass_length is None and requests:
            self._pass_length = requests[0].pass_length

    def send(self, request: LayerRequest) -> None:
        self._sending((request,))
        # (A call that is over: its error comes.)
        self._stream.call.put(layer_request_to_wire(request))

    def send_all(self, requests: Sequence[LayerRequest]) -> None:
        """Requests sent at once, without waiting for answers: a few in each message
        (``LayerRequest.following``), read by the root as if each came alone."""
        self._sending(requests)
        for start in range(0, len(requests), REQUESTS_PER_MESSAGE):
            self._stream.call.put(requests_to_wire(requests[start : start + REQUESTS_PER_MESSAGE]))

    def close(self) -> None:
        """Every request is sent (the root expects no more). A kept stream stays open: the
        root knows a pass's end from its length."""
        if self._done is None:
            self._stream.call.close()

    def next_ack(self, timeout_s: float | None = None) -> LayerAck:
        """The next layer's answer; ``TimeoutError`` if it has not come within ``timeout_s``
        (the pass goes on), ``RpcError`` if the call failed."""
        while True:
            wait_s = timeout_s
            if self._done is not None:
                left_s = self._deadline - time.monotonic()
                if left_s <= 0 and self._answers.empty():
                    self.cancel()
                    raise StreamError(
                        grpc.StatusCode.DEADLINE_EXCEEDED, "the pass's deadline passed"
                    )
                wait_s = max(left_s, 0.0) if timeout_s is None else min(timeout_s, max(left_s, 0.0))
            try:
                answer = self._answers.get(timeout=wait_s)
                break
            except queue.Empty:
                if wait_s == timeout_s:
                    raise TimeoutError from None
                # (The pass's deadline came first: the check above ends it.)
        if isinstance(answer, LayerAck):
            return answer
        self._answers.put(answer)  # every later wait ends the same way
        if answer is _END:
            raise RuntimeError("the root ended the pass before answering every layer")
        raise answer

    def cancel(self) -> None:
        """End the pass's call (not a kept one its last answer gave back)."""
        if self._stream.owner is self:
            self._stream.call.cancel()


def _or(timeout_s: float | None, deadlines: Deadlines) -> float:
    return deadlines.call_timeout_s if timeout_s is None else timeout_s


class NodeClient:
    """A compute node's counters."""

    def __init__(self, address: str, security: Security, deadlines: Deadlines = DEFAULT_DEADLINES):
        self.address = address
        self.deadlines = deadlines
        self._stub = ngrpc.ComputeNodeStub(channel(address, security))

    def stats(self, *, timeout_s: float | None = None) -> NodeStats:
        return node_stats_from_wire(self._stub.Stats(EMPTY, timeout=_or(timeout_s, self.deadlines)))

    def reset_stats(self, *, timeout_s: float | None = None) -> None:
        self._stub.ResetStats(EMPTY, timeout=_or(timeout_s, self.deadlines))


#: How ``PendingHealth.problem`` starts when the answer did not come in time.
HEALTH_TIMED_OUT = "no answer to its health check within the deadline"


class HealthClient:
    """The standard gRPC health check (``grpc.health.v1``) of any of the services."""

    def __init__(self, address: str, security: Security):
        self.address = address
        self._stub = health_pb2_grpc.HealthStub(channel(address, security))

    def start_check(self, timeout_s: float) -> PendingHealth:
        """Ask without waiting, so that many components are probed at once."""
        request = health_pb2.HealthCheckRequest(service="")
        return PendingHealth(self._stub.Check.future(request, timeout=timeout_s))

    def check(self, timeout_s: float) -> str | None:
        """None if the service answers SERVING within ``timeout_s``; else why not."""
        return self.start_check(timeout_s).problem()


class PendingHealth:
    def __init__(self, future: grpc.Future):
        self._future = future

    def problem(self) -> str | None:
        """None if the answer is SERVING, else the reason (no answer in time, refused, ...)."""
        try:
            reply = self._future.result()
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                return f"{HEALTH_TIMED_OUT} (hung or overloaded)"
            return f"health check failed: {exc.code().name}: {exc.details()}"
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            return f"health check answered {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
        return None


__all__ = [
    "CALL_TIMEOUT_S",
    "DEFAULT_DEADLINES",
    "HEALTH_TIMED_OUT",
    "LAYER_TIMEOUT_S",
    "Deadlines",
    "HealthClient",
    "MemoryXClient",
    "NodeClient",
    "PendingLayer",
    "PendingPass",
    "RpcError",
    "SwarmXClient",
    "time_left_s",
    "timeout_for",
    "wire_bytes",
]
