"""Serde of the small messages (acks, requests, stats, layouts) and the typed clients' deadlines."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator

import grpc
import pytest

from proto import memoryx_pb2 as mpb
from proto import memoryx_pb2_grpc as mgrpc
from proto import node_pb2 as npb
from proto import swarmx_pb2 as spb
from proto import tensor_pb2 as pb
from proto.clients import (
    CALL_TIMEOUT_S,
    LAYER_TIMEOUT_S,
    MIN_RATE_BYTES_PER_S,
    MemoryXClient,
    RpcError,
    time_left_s,
    timeout_for,
    wire_bytes,
)
from proto.domain import (
    CheckpointInfo,
    Chunk,
    Header,
    LayerAck,
    LayerLayout,
    LayerRequest,
    LinkStats,
    ModelLayout,
    NodeStats,
    Phase,
    SwarmXStats,
    TensorSpec,
    TrafficStats,
)
from proto.frames import WireError
from proto.messages import (
    ack_from_wire,
    ack_to_wire,
    acks_from_wire,
    acks_in_messages,
    acks_to_wire,
    checkpoint_from_wire,
    checkpoint_to_wire,
    layer_request_from_wire,
    layer_request_to_wire,
    layout_from_wire,
    layout_to_wire,
    node_stats_from_wire,
    node_stats_to_wire,
    requests_to_wire,
    swarmx_stats_from_wire,
    swarmx_stats_to_wire,
    traffic_from_wire,
    traffic_to_wire,
    unfolded,
    weights_request_from_wire,
    weights_request_to_wire,
    weights_requests_to_wire,
)
from proto.rpc import Security, channel, start_server

# This module's run credentials (token only: loopback).
SECURITY = Security.generate()

ACK = LayerAck(
    layer=3,
    step=8,
    phase=Phase.BACKWARD,
    num_nodes=4,
    loss_sum=1.25,
    num_targets=64,
    num_correct=17,
    bytes_to_nodes=4096,
    gradient_bytes=1024,
    flops=3.5e9,
    compute_seconds=0.125,
    update_applied=True,
)


def _through_the_wire(message):
    """``message`` serialized and parsed again, as a peer receives it."""
    return type(message).FromString(message.SerializeToString())


@pytest.mark.parametrize(
    ("value", "to_wire", "from_wire"),
    [
        (ACK, ack_to_wire, ack_from_wire),
        (
            LayerRequest(layer=1, step=2, phase=Phase.EVAL, dtype="bfloat16", without_weights=True),
            layer_request_to_wire,
            layer_request_from_wire,
        ),
        (
            LayerRequest(layer=1, step=2, phase=Phase.FORWARD, dtype="float16"),
            weights_request_to_wire,
            weights_request_from_wire,
        ),
        (
            CheckpointInfo(name="step-00000005.pt", step=5, num_bytes=123),
            checkpoint_to_wire,
            checkpoint_from_wire,
        ),
        (
            ModelLayout(
                layers=(
                    LayerLayout(
                        tensors=(TensorSpec("0.weight", (16, 9)), TensorSpec("scale", ())),
                        num_kept=150,
                    ),
                    LayerLayout(tensors=(), num_kept=0),
                ),
                step=4,
            ),
            layout_to_wire,
            layout_from_wire,
        ),
        (
            TrafficStats(
                egress_bytes=10,
                ingress_bytes=5,
                num_weight_streams=2,
                num_gradient_streams=1,
                num_updates=1,
                num_duplicate_gradients=3,
                update_seconds=0.5,
            ),
            traffic_to_wire,
            traffic_from_wire,
        ),
        (
            SwarmXStats(
                name="swarmx-0-0",
                down=(
                    LinkStats("swarmx-0-0 -> node-0", 7, 1),
                    LinkStats("swarmx-0-0 -> node-1", 7, 1),
                ),
                up=LinkStats("swarmx-0-0 -> up", 3, 1),
                reduced_in_bytes=14,
            ),
            swarmx_stats_to_wire,
            swarmx_stats_from_wire,
        ),
        (
            NodeStats(
                rank=2,
                weight_bytes_received=100,
                gradient_bytes_sent=50,
                activation_bytes_held=8,
                peak_activation_bytes=16,
                weight_bytes_held=0,
                flops=2.0e6,
                compute_seconds=0.25,
                backend_stats={"pcm.program_s": 0.5, "pcm.energy_j": 1e-3},
            ),
            node_stats_to_wire,
            node_stats_from_wire,
        ),
    ],
    ids=lambda v: type(v).__name__ if not callable(v) else "",
)
def test_round_trip(value, to_wire, from_wire):
    assert from_wire(_through_the_wire(to_wire(value))) == value


def test_ack_fields_are_the_wire_fields():
    """A field added to LayerAck in tensor.proto but not in the domain type fails here
    (``following`` packs several answers in one message: ``acks_to_wire``)."""
    assert set(ack_to_wire(ACK).DESCRIPTOR.fields_by_name) - {"following"} == set(ACK.__dict__)
    assert set(npb.NodeStats.DESCRIPTOR.fields_by_name) == set(NodeStats(rank=0).__dict__)
    assert set(pb.TrafficStats.DESCRIPTOR.fields_by_name) == set(TrafficStats().__dict__)
    # (``following`` packs several requests in one message: ``requests_to_wire``.)
    assert set(spb.LayerRequest.DESCRIPTOR.fields_by_name) - {"following"} == set(
        LayerRequest(0, 0, Phase.FORWARD, "float32").__dict__
    )


def _acks(count: int, gradient_bytes: int = 0) -> list[LayerAck]:
    """``count`` answers, each carrying a gradient of ``gradient_bytes`` payload bytes (as a
    compute node's answer does) when that is not 0."""
    acks = []
    for layer in range(count):
        gradient: tuple = ()
        if gradient_bytes:
            header = Header(
                layer=layer,
                step=ACK.step,
                phase=Phase.BACKWARD,
                num_tensors=1,
                total_bytes=gradient_bytes,
                sender="node-0",
            )
            chunk = Chunk(
                layer=layer,
                step=ACK.step,
                name="w",
                dtype="float32",
                shape=(gradient_bytes // 4,),
                offset=0,
                tensor_bytes=gradient_bytes,
                data=bytes(gradient_bytes),
            )
            gradient = (header, chunk)
        acks.append(
            dataclasses.replace(ACK, layer=layer, gradient_bytes=gradient_bytes, gradient=gradient)
        )
    return acks


def test_answers_in_one_message_come_back_in_order():
    acks = _acks(3)
    message = _through_the_wire(acks_to_wire(acks))
    assert len(message.following) == 2
    assert acks_from_wire(message) == acks
    assert acks_from_wire(_through_the_wire(ack_to_wire(ACK))) == [ACK]


def test_answers_in_messages_keep_each_message_s_gradients_within_the_limit():
    # Three answers carrying 400 gradient bytes each, at most 1000 per message: two, then one.
    messages = acks_in_messages(_acks(3, gradient_bytes=400), 1000)
    assert [1 + len(m.following) for m in messages] == [2, 1]
    assert [a.layer for m in messages for a in acks_from_wire(m)] == [0, 1, 2]
    # One answer over the limit still goes, alone.
    assert [1 + len(m.following) for m in acks_in_messages(_acks(2, 2000), 1000)] == [1, 1]
    assert acks_in_messages([], 1000) == []


def test_sums_that_carry_no_gradient_go_in_one_message_however_much_they_count():
    # A parent's answers count the bytes its children sent up but carry none of them.
    sums = [dataclasses.replace(ack, gradient=()) for ack in _acks(3, gradient_bytes=4000)]
    (message,) = acks_in_messages(sums, 1000)
    assert [a.gradient_bytes for a in acks_from_wire(message)] == [4000] * 3


def test_a_following_answer_with_answers_of_its_own_is_refused():
    message = acks_to_wire(_acks(2))
    message.following[0].following.append(ack_to_wire(ACK))
    with pytest.raises(WireError, match="carries no answers of its own"):
        acks_from_wire(message)


def _requests(count: int) -> list[LayerRequest]:
    return [
        LayerRequest(
            layer,
            7,
            Phase.FORWARD,
            "bfloat16",
            pass_id=3,
            pass_position=layer + 1,
            pass_length=count,
        )
        for layer in range(count)
    ]


def test_requests_in_one_message_unfold_in_order():
    requests = _requests(3)
    message = _through_the_wire(requests_to_wire(requests))
    assert len(message.following) == 2
    assert [layer_request_from_wire(m) for m in unfolded(message)] == requests
    asked = weights_requests_to_wire(requests)
    assert [weights_request_from_wire(m) for m in unfolded(asked)] == [
        LayerRequest(r.layer, r.step, r.phase, r.dtype) for r in requests
    ]
    # One request alone is itself.
    single = layer_request_to_wire(requests[0])
    assert unfolded(single) == [single]


def test_each_unfolded_answer_is_alone():
    # A SwarmX node passes MemoryX's answer to a layer on to the child whose sum it was:
    # it must not carry the answers to the layers that came with it.
    message = _through_the_wire(acks_to_wire(_acks(3)))
    parts = unfolded(message, "answer")
    assert [p.layer for p in parts] == [0, 1, 2]
    assert all(len(p.following) == 0 for p in parts)
    assert len(message.following) == 2  # (the message itself is left as it came)


def test_a_following_request_with_requests_of_its_own_is_refused():
    message = requests_to_wire(_requests(2))
    message.following[0].following.append(layer_request_to_wire(_requests(1)[0]))
    with pytest.raises(WireError, match="carries no requests of its own"):
        unfolded(message)


def test_a_weights_request_cannot_be_without_weights():
    with pytest.raises(ValueError, match="without weights"):
        weights_request_to_wire(LayerRequest(0, 0, Phase.BACKWARD, "float32", without_weights=True))


def test_ack_total_sums_in_child_order():
    other = LayerAck(layer=3, step=8, phase=Phase.BACKWARD, num_nodes=1, loss_sum=0.5, flops=1.0)
    total = LayerAck.total([ACK, other], layer=3, step=8, phase=Phase.BACKWARD)
    assert (total.num_nodes, total.loss_sum, total.flops) == (5, 1.75, 3.5e9 + 1.0)
    assert total.update_applied is False  # one child did not apply its update
    assert LayerAck.total([], layer=0, step=0, phase=Phase.FORWARD).update_applied is True


def test_timeouts_grow_with_the_bytes_moved():
    assert timeout_for(0) == CALL_TIMEOUT_S
    assert timeout_for(10 * MIN_RATE_BYTES_PER_S) == CALL_TIMEOUT_S + 10
    assert timeout_for(0, LAYER_TIMEOUT_S) == LAYER_TIMEOUT_S
    spec = [("w", (16, 9)), ("s", ())]
    assert wire_bytes(spec) == 145 * 4
    assert wire_bytes(spec, "bfloat16") == 145 * 2


class _SlowMemoryX(mgrpc.MemoryXServicer):
    """Answers Stats only when released; records the time its calls had left."""

    def __init__(self):
        self.release = threading.Event()
        self.time_left: list[float] = []

    def Stats(self, request, context):
        self.release.wait(10)
        return pb.TrafficStats()

    def Layout(self, request, context):
        self.time_left.append(time_left_s(context))
        return mpb.LayoutReply(step=3)


@pytest.fixture
def slow() -> Iterator[tuple[_SlowMemoryX, str]]:
    servicer = _SlowMemoryX()
    server, address = start_server(
        lambda s: mgrpc.add_MemoryXServicer_to_server(servicer, s), "127.0.0.1", security=SECURITY
    )
    yield servicer, address
    servicer.release.set()
    server.stop(grace=None)


def test_client_calls_have_deadlines(slow):
    servicer, address = slow
    client = MemoryXClient(address, SECURITY)
    with pytest.raises(RpcError) as info:
        client.stats(timeout_s=0.2)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert client.layout(timeout_s=7.0).step == 3
    assert 5.0 < servicer.time_left[-1] < 8.0  # 7 s less the trip, give or take rounding


def test_servicers_pass_on_the_time_left_or_a_default(slow):
    servicer, address = slow
    stub = mgrpc.MemoryXStub(channel(address, SECURITY))
    stub.Layout(pb.Empty())  # a caller without a deadline
    assert servicer.time_left[-1] == LAYER_TIMEOUT_S
