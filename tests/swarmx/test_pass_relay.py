"""A SwarmX node below the root relays a pass (``DeliverPass``) on its event loop, over
real gRPC on loopback: every child gets every layer, the answers are summed per layer, a
child's failure or the caller's cancel ends the pass everywhere, and no thread is started.

The children are fake ``LayerSink`` servicers that record what they receive.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import pytest
import torch

from proto import swarmx_pb2_grpc as sgrpc
from proto import tensor_pb2 as pb
from proto import threads
from proto.frames import BUNDLE_MAX_BYTES
from proto.rpc import Security, channel, start_server
from proto.serde import encode_layer
from swarmx.service import SwarmXServicer
from swarmx.service import serve as serve_swarmx
from tests.swarmx.test_swarmx_service import SECURITY, TIMEOUT_S, WAIT_S

CHUNK_BYTES = 64 * 1024
PASS_ID = 7


def _layers() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    big = {"w": torch.randn(320, 1024, generator=gen), "b": torch.randn(320, generator=gen)}
    # Larger than a message's bundle: relayed chunk by chunk (21 chunks), cut-through.
    assert sum(t.numel() * 4 for t in big.values()) > BUNDLE_MAX_BYTES
    return [
        big,
        # Small: gathered into one message.
        {"w": torch.randn(3, 5, generator=gen), "b": torch.randn(3, generator=gen)},
    ]


def _pass_messages(pass_id: int = PASS_ID) -> list[pb.LayerMessage]:
    messages, layers = [], _layers()
    for position, tensors in enumerate(layers, start=1):
        layer = list(encode_layer(position - 1, 3, pb.FORWARD, tensors, chunk_bytes=CHUNK_BYTES))
        header = layer[0].header
        header.pass_id, header.pass_position, header.pass_length = pass_id, position, len(layers)
        messages += layer
    return messages


class PassSink(sgrpc.LayerSinkServicer):
    """A child that records a pass's messages and answers each layer once it is whole."""

    def __init__(self, name: str):
        self.name = name
        self.messages: list[pb.LayerMessage] = []
        self.fail_at_layer: int | None = None  # abort when this layer is whole
        self.hold_at_layer: int | None = None  # wait for the call's end when it is whole
        self.answer_layer: int | None = None  # answer with this layer instead
        self.end_without_answers = False
        self.ended = threading.Event()  # the call is over (however)
        self.kinds: list[str] = []  # what each message on the wire was
        self.calls = 0  # DeliverPass calls made to it

    def DeliverPass(self, request_iterator, context):
        self.calls += 1
        context.add_callback(self.ended.set)
        header, remaining, received = None, 0, 0
        for message in _items(request_iterator, self.kinds):
            self.messages.append(message)
            if message.HasField("header"):
                header, remaining, received = message.header, message.header.num_tensors, 0
            else:
                received += len(message.chunk.data)
                if message.chunk.offset + len(message.chunk.data) >= message.chunk.tensor_bytes:
                    remaining -= 1
            if remaining:
                continue
            if self.end_without_answers:
                # (The parent keeps the stream open after a pass: ended at its last layer.)
                if header.pass_position == header.pass_length:
                    return
                continue
            if header.layer == self.fail_at_layer:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{self.name} failed")
            if header.layer == self.hold_at_layer:
                self.ended.wait(TIMEOUT_S)
                return
            yield pb.LayerAck(
                layer=header.layer if self.answer_layer is None else self.answer_layer,
                step=header.step,
                phase=header.phase,
                num_nodes=1,
                bytes_to_nodes=received,
            )


def _items(messages, kinds: list[str] | None = None) -> Iterator[pb.LayerMessage]:
    """The messages of a stream, a bundle's one by one (each message's kind on ``kinds``)."""
    for message in messages:
        if kinds is not None:
            kinds.append(message.WhichOneof("kind"))
        if message.HasField("bundle"):
            yield from message.bundle.items
        else:
            yield message


class Relay:
    """A SwarmX node below the root with fake children (its parent is never called)."""

    def __init__(
        self,
        num_children: int = 2,
        child_dtypes: dict[str, str] | None = None,
        security: Security = SECURITY,
    ):
        self.servers: list = []
        self.sinks = [PassSink(f"node-{i}") for i in range(num_children)]
        addresses = {}
        for sink in self.sinks:
            server, addresses[sink.name] = start_server(
                lambda s, sink=sink: sgrpc.add_LayerSinkServicer_to_server(sink, s),
                "127.0.0.1",
                security=security,
            )
            self.servers.append(server)
        self.servicer = SwarmXServicer("swarmx-1-0", security=security)
        server, address = serve_swarmx(self.servicer, "127.0.0.1", security=security)
        self.servers.append(server)
        self.addresses = addresses
        self.child_dtypes = child_dtypes
        self.connect()
        self.stub = sgrpc.LayerSinkStub(channel(address, security))

    def connect(self) -> None:
        self.servicer.connect(
            children=self.addresses,
            parent="127.0.0.1:1",
            memoryx=None,
            dtype="float32" if self.child_dtypes else None,
            child_dtypes=self.child_dtypes,
        )

    def stop(self) -> None:
        for server in self.servers:
            server.stop(grace=None)


@pytest.fixture
def relay() -> Iterator[Relay]:
    r = Relay()
    yield r
    r.stop()


def _payload(messages) -> list[tuple[str, bytes]]:
    return [(m.chunk.name, m.chunk.data) for m in _items(messages) if m.HasField("chunk")]


def test_every_child_gets_every_layer_and_each_answer_sums_them(relay, monkeypatch):
    started = []
    real_start = threads.start
    monkeypatch.setattr(
        threads, "start", lambda *a, **k: started.append(k.get("name")) or real_start(*a, **k)
    )
    sent = _pass_messages()
    acks = list(relay.stub.DeliverPass(iter(sent), timeout=TIMEOUT_S))
    assert [(a.layer, a.num_nodes) for a in sorted(acks, key=lambda a: a.layer)] == [(0, 2), (1, 2)]
    payload_bytes = sum(len(data) for _, data in _payload(sent))
    assert sum(a.bytes_to_nodes for a in acks) == 2 * payload_bytes
    for sink in relay.sinks:
        assert _payload(sink.messages) == _payload(sent)
        # The large layer cut-through, chunk by chunk; the small one as one message.
        assert sink.kinds == ["header"] + ["chunk"] * 21 + ["bundle"]
        headers = [m.header for m in sink.messages if m.HasField("header")]
        assert [(h.layer, h.pass_id, h.pass_position) for h in headers] == [
            (0, PASS_ID, 1),
            (1, PASS_ID, 2),
        ]
    stats = relay.servicer.stats()
    assert [link.payload_bytes for link in stats.down] == [payload_bytes] * 2
    # The relay runs on the event loop: no thread per layer, nor one to read the stream.
    assert started == []


def test_a_child_that_fails_ends_the_pass_with_its_code_and_cancels_its_sibling(relay):
    relay.sinks[0].fail_at_layer = 0
    relay.sinks[1].hold_at_layer = 0
    with pytest.raises(grpc.RpcError) as info:
        list(relay.stub.DeliverPass(iter(_pass_messages()), timeout=TIMEOUT_S))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "node-0 failed" in info.value.details()
    assert relay.sinks[1].ended.wait(WAIT_S)  # its stream was cancelled, not left to time out


@pytest.mark.parametrize(
    "misbehave, error",
    [
        ({"answer_layer": 9}, "layer 9 phase 1, which was not sent"),
        ({"end_without_answers": True}, "ended its pass stream before answering"),
    ],
)
def test_a_child_that_answers_wrong_fails_the_pass(relay, misbehave, error):
    for name, value in misbehave.items():
        setattr(relay.sinks[1], name, value)
    with pytest.raises(grpc.RpcError) as info:
        list(relay.stub.DeliverPass(iter(_pass_messages()), timeout=TIMEOUT_S))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error in info.value.details()


def test_a_layer_cut_short_by_the_end_of_the_stream_is_refused(relay):
    messages = _pass_messages()[:5]  # layer 0's header and a few of its 21 chunks
    with pytest.raises(grpc.RpcError) as info:
        list(relay.stub.DeliverPass(iter(messages), timeout=TIMEOUT_S))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "tensors still to come" in info.value.details()


def test_the_callers_cancel_ends_the_childrens_streams(relay):
    release = threading.Event()
    messages = _pass_messages()
    first_layer = messages[: next(i for i, m in enumerate(messages[1:], 1) if m.HasField("header"))]

    def requests():
        yield from first_layer
        release.wait(TIMEOUT_S)  # the second layer never comes

    call = relay.stub.DeliverPass(requests(), timeout=TIMEOUT_S)
    assert next(call).layer == 0
    call.cancel()
    for sink in relay.sinks:
        assert sink.ended.wait(WAIT_S)
    release.set()


def test_mixed_children_each_get_their_own_dtype():
    relay = Relay(child_dtypes={"node-0": "float32", "node-1": "bfloat16"})
    try:
        sent = _pass_messages()
        acks = list(relay.stub.DeliverPass(iter(sent), timeout=TIMEOUT_S))
        assert sorted(a.layer for a in acks) == [0, 1]
        assert _payload(relay.sinks[0].messages) == _payload(sent)
        rounded = [m.chunk for m in _items(relay.sinks[1].messages) if m.HasField("chunk")]
        assert {c.dtype for c in rounded} == {"bfloat16"}
        down = [link.payload_bytes for link in relay.servicer.stats().down]
        assert down[1] * 2 == down[0]
    finally:
        relay.stop()


def test_a_run_of_small_layers_that_came_in_one_message_goes_on_as_one(relay):
    # The root sends a pass of small layers as one bundle; a relay sends it on as one
    # message to each child (not one per layer), and every layer is answered.
    gen = torch.Generator().manual_seed(1)
    small = [{"w": torch.randn(3, 5, generator=gen)} for _ in range(3)]
    items: list[pb.LayerMessage] = []
    for position, tensors in enumerate(small, start=1):
        layer = list(encode_layer(position - 1, 3, pb.FORWARD, tensors, chunk_bytes=CHUNK_BYTES))
        header = layer[0].header
        header.pass_id, header.pass_position, header.pass_length = PASS_ID, position, len(small)
        items += layer
    sent = [pb.LayerMessage(bundle=pb.LayerBundle(items=items))]
    messages = list(relay.stub.DeliverPass(iter(sent), timeout=TIMEOUT_S))
    acks = [answer for message in messages for answer in (message, *message.following)]
    assert [(a.layer, a.num_nodes) for a in acks] == [(0, 2), (1, 2), (2, 2)]
    for sink in relay.sinks:
        assert sink.kinds == ["bundle"]
        assert _payload(sink.messages) == _payload(sent)


def _answered(messages) -> list[tuple[int, int]]:
    return sorted((a.layer, a.num_nodes) for a in messages)


def test_a_stream_from_the_parent_carries_one_pass_after_another(relay):
    # The parent keeps its stream from pass to pass; so does this relay to its children.
    sent = _pass_messages(7) + _pass_messages(8) + _pass_messages(9)
    acks = list(relay.stub.DeliverPass(iter(sent), timeout=TIMEOUT_S))
    assert _answered(acks) == [(0, 2), (0, 2), (0, 2), (1, 2), (1, 2), (1, 2)]
    for sink in relay.sinks:
        assert sink.calls == 1
        assert _payload(sink.messages) == _payload(sent)
        headers = [m.header for m in sink.messages if m.HasField("header")]
        assert [h.pass_id for h in headers] == [7, 7, 8, 8, 9, 9]


def test_the_next_pass_goes_on_the_streams_of_the_last(relay):
    for pass_id in (7, 8, 9):
        acks = list(relay.stub.DeliverPass(iter(_pass_messages(pass_id)), timeout=TIMEOUT_S))
        assert _answered(acks) == [(0, 2), (1, 2)]
    assert [sink.calls for sink in relay.sinks] == [1, 1]
    assert relay.servicer.stream_pool.num_opened == 2


def test_a_failed_pass_leaves_no_stream_to_the_next(relay):
    relay.sinks[0].fail_at_layer = 1
    with pytest.raises(grpc.RpcError) as info:
        list(relay.stub.DeliverPass(iter(_pass_messages(7)), timeout=TIMEOUT_S))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert relay.sinks[1].ended.wait(WAIT_S)  # cancelled, not kept for the next pass
    relay.sinks[0].fail_at_layer = None
    acks = list(relay.stub.DeliverPass(iter(_pass_messages(8)), timeout=TIMEOUT_S))
    assert _answered(acks) == [(0, 2), (1, 2)]
    assert [sink.calls for sink in relay.sinks] == [2, 2]


def test_a_rewired_relay_opens_new_streams(relay):
    list(relay.stub.DeliverPass(iter(_pass_messages(7)), timeout=TIMEOUT_S))
    relay.connect()  # (the same children: a neighbour was replaced)
    for sink in relay.sinks:
        assert sink.ended.wait(WAIT_S)  # the kept streams were ended
    acks = list(relay.stub.DeliverPass(iter(_pass_messages(8)), timeout=TIMEOUT_S))
    assert _answered(acks) == [(0, 2), (1, 2)]
    assert [sink.calls for sink in relay.sinks] == [2, 2]


def test_a_stream_idle_for_half_the_idle_limit_is_not_used_again():
    # A child's idle watchdog ends a stream that waits stream_idle_s for its next pass: a
    # pass must not begin on a stream that may be ended under it.
    relay = Relay(security=Security.generate(stream_idle_s=0.4))
    try:
        list(relay.stub.DeliverPass(iter(_pass_messages(7)), timeout=TIMEOUT_S))
        list(relay.stub.DeliverPass(iter(_pass_messages(8)), timeout=TIMEOUT_S))
        assert [sink.calls for sink in relay.sinks] == [1, 1]
        time.sleep(0.25)
        acks = list(relay.stub.DeliverPass(iter(_pass_messages(9)), timeout=TIMEOUT_S))
        assert _answered(acks) == [(0, 2), (1, 2)]
        assert [sink.calls for sink in relay.sinks] == [2, 2]
    finally:
        relay.stop()
