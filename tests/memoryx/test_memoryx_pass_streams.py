"""MemoryX's pass streams over real gRPC on loopback: ``StreamPass`` (a pass's weights on
one call; a run of layers asked for in one message is answered in one) and ``PushPass``
(a pass's gradient sums on one call; the layers one message brought answered in one)."""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from proto import memoryx_pb2 as mpb
from proto import tensor_pb2 as pb
from proto.frames import BUNDLE_MAX_BYTES
from proto.serde import Expected, decode_layer, layout_of
from tests.memoryx.test_memoryx_service import (
    MODEL_BYTES,
    TIMEOUT_S,
    MemoryX,
    _assert_weights_equal,
    _code,
    _gradient_stream,
    _grads,
    _model,
    _sgd,
)
from tests.proto.edits import edited


@pytest.fixture
def loaded(tmp_path) -> Iterator[MemoryX]:
    service = MemoryX()
    service.load()
    yield service
    service.stop()


def _pass_stream(layers, pass_id: int = 5, step: int = 0) -> list[pb.LayerMessage]:
    """The gradients of ``layers``, in order, as one PushPass stream of pass ``pass_id``."""
    return [
        m for layer in layers for m in edited(_gradient_stream(layer, step), 0, pass_id=pass_id)
    ]


def test_a_pass_stream_applies_each_layer_as_it_completes(loaded):
    before = [loaded.weights(layer, 0) for layer in range(2)]
    release = threading.Event()

    def messages() -> Iterator[pb.LayerMessage]:
        yield from _pass_stream([1])
        release.wait(TIMEOUT_S)  # layer 0 waits until layer 1's answer is in
        yield from _pass_stream([0])

    try:
        acks = loaded.stub.PushPass(messages(), timeout=TIMEOUT_S)
        first = next(acks)
        assert (first.layer, first.step, first.phase, first.update_applied) == (
            1,
            0,
            pb.BACKWARD,
            True,
        )
        assert loaded.servicer.store.version(1) == 1 and loaded.servicer.store.version(0) == 0
    finally:
        release.set()
    assert [(a.layer, a.update_applied) for a in acks] == [(0, True)]
    for layer in range(2):
        _assert_weights_equal(loaded.weights(layer, 1), _sgd(before[layer], _grads(layer)))
    stats = loaded.stats()
    assert stats.ingress_bytes == MODEL_BYTES
    assert stats.num_gradient_streams == 2 and stats.num_updates == 2


def _bad_pass_streams() -> dict[str, list[pb.LayerMessage]]:
    """PushPass streams whose second layer (layer 0) MemoryX must refuse."""
    first = _pass_stream([1])
    return {
        "no pass id": first + _pass_stream([0], pass_id=0),
        "ends in a layer": first + _pass_stream([0])[:-1],
        "bad total_bytes": first + edited(_pass_stream([0]), 0, total_bytes=MODEL_BYTES),
        "chunk first": first + _pass_stream([0])[1:],
        "step ahead": first + _pass_stream([0], step=1),
    }


@pytest.mark.parametrize("case", list(_bad_pass_streams()))
def test_bad_pass_stream_is_refused_after_the_layers_before(loaded, case):
    """Each layer is checked whole before it is applied: a bad one changes nothing, and
    ends the stream; the layers before it stay applied (answered already)."""
    before = loaded.weights(0, 0)
    acks = []
    with pytest.raises(grpc.RpcError) as info:
        for ack in loaded.stub.PushPass(iter(_bad_pass_streams()[case]), timeout=TIMEOUT_S):
            acks.append(ack)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, case
    assert [(a.layer, a.update_applied) for a in acks] == [(1, True)]
    assert loaded.servicer.store.version(0) == 0
    _assert_weights_equal(loaded.weights(0, 0), before)
    assert loaded.stats().num_updates == 1


def _weights_request(layer: int, phase: int = pb.FORWARD, **kw) -> mpb.WeightsRequest:
    return mpb.WeightsRequest(**(dict(layer=layer, step=0, phase=phase, dtype="float32") | kw))


def _unbundled(messages):
    """The messages of a stream with each ``LayerBundle`` read as the items it holds."""
    for message in messages:
        if message.WhichOneof("kind") == "bundle":
            yield from message.bundle.items
        else:
            yield message


def test_a_pass_stream_carries_one_pass_after_another(loaded):
    # The root keeps its PushPass stream from one pass to the next (a later driver's pass
    # ids may be smaller: random per driver).
    messages = _pass_stream([1, 0], pass_id=5, step=0) + _pass_stream([1, 0], pass_id=3, step=1)
    acks = list(loaded.stub.PushPass(iter(messages), timeout=TIMEOUT_S))
    answered = [(a.layer, a.step, a.update_applied) for m in acks for a in (m, *m.following)]
    assert answered == [(1, 0, True), (0, 0, True), (1, 1, True), (0, 1, True)]
    assert [loaded.servicer.store.version(layer) for layer in (0, 1)] == [2, 2]


def test_stream_pass_answers_each_request_as_stream_weights_does(loaded):
    order = [(0, pb.FORWARD), (1, pb.FORWARD), (1, pb.BACKWARD), (0, pb.BACKWARD)]
    one_by_one = [
        m
        for layer, phase in order
        for m in loaded.stub.StreamWeights(_weights_request(layer, phase), timeout=TIMEOUT_S)
    ]
    requests = [_weights_request(layer, phase) for layer, phase in order]
    on_one_call = list(loaded.stub.StreamPass(iter(requests), timeout=TIMEOUT_S))
    # Each (small) layer comes as one bundle message, holding what StreamWeights sends.
    assert [m.WhichOneof("kind") for m in on_one_call] == ["bundle"] * len(order)
    assert list(_unbundled(on_one_call)) == one_by_one
    stats = loaded.stats()
    assert stats.num_weight_streams == 2 * len(order)
    assert stats.egress_bytes == 2 * 2 * MODEL_BYTES


def test_stream_pass_sends_a_layer_only_once_it_is_asked_for(loaded):
    # The root asks for a layer when the driver sends it: the next request may come later.
    requests: queue.Queue = queue.Queue()
    call = loaded.stub.StreamPass(iter(requests.get, None), timeout=TIMEOUT_S)
    requests.put(_weights_request(1))
    layer_1 = list(next(call).bundle.items)  # header, weight, bias (one chunk each)
    assert layer_1[0].header.layer == 1 and layer_1[-1].chunk.name == "bias"
    requests.put(_weights_request(0))
    requests.put(None)
    rest = list(_unbundled(call))
    assert rest[0].header.layer == 0
    assert decode_layer(rest, Expected(0, 0, pb.FORWARD, layout_of(_model()[0]), "float32"))


@pytest.mark.parametrize(
    "bad", [dict(layer=2), dict(step=1), dict(phase=77), dict(dtype="float64"), dict(step=-1)]
)
def test_stream_pass_refuses_a_bad_request_after_the_good_ones(loaded, bad):
    requests = [
        _weights_request(0),
        mpb.WeightsRequest(**(dict(layer=1, step=0, phase=pb.FORWARD, dtype="float32") | bad)),
    ]
    received = []

    def read():
        for message in _unbundled(loaded.stub.StreamPass(iter(requests), timeout=TIMEOUT_S)):
            received.append(message)

    assert _code(read) == grpc.StatusCode.INVALID_ARGUMENT
    assert received and all(m.WhichOneof("kind") for m in received)
    assert {m.header.layer for m in received if m.WhichOneof("kind") == "header"} == {0}


def test_a_run_of_layers_asked_for_in_one_message_is_answered_in_one(loaded):
    order = [(0, pb.FORWARD), (1, pb.FORWARD), (1, pb.BACKWARD), (0, pb.BACKWARD)]
    one_by_one = list(
        loaded.stub.StreamPass(
            iter([_weights_request(layer, phase) for layer, phase in order]), timeout=TIMEOUT_S
        )
    )
    asked = _weights_request(*order[0])
    asked.following.extend(_weights_request(layer, phase) for layer, phase in order[1:])
    at_once = list(loaded.stub.StreamPass(iter([asked]), timeout=TIMEOUT_S))
    assert MODEL_BYTES * 2 <= BUNDLE_MAX_BYTES  # (the run fits one message)
    assert len(at_once) == 1 and at_once[0].WhichOneof("kind") == "bundle"
    assert list(_unbundled(at_once)) == list(_unbundled(one_by_one))
    assert loaded.stats().num_weight_streams == 2 * len(order)


def test_a_run_that_does_not_fit_one_message_goes_in_several(loaded, monkeypatch):
    # (A layer of mlp size fits; with a limit of one layer each goes alone, in order.)
    from memoryx import service

    monkeypatch.setattr(service, "BUNDLE_MAX_BYTES", MODEL_BYTES // 2)
    asked = _weights_request(0)
    asked.following.extend([_weights_request(1), _weights_request(0, pb.BACKWARD)])
    at_once = list(loaded.stub.StreamPass(iter([asked]), timeout=TIMEOUT_S))
    headers = [[m.header.layer for m in b.bundle.items if m.HasField("header")] for b in at_once]
    assert len(at_once) > 1 and sum(headers, []) == [0, 1, 0]


def test_a_request_that_follows_another_with_requests_of_its_own_is_refused(loaded):
    asked = _weights_request(0)
    asked.following.append(_weights_request(1))
    asked.following[0].following.append(_weights_request(0))
    assert _code(lambda: list(loaded.stub.StreamPass(iter([asked]), timeout=TIMEOUT_S))) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )


def test_the_layers_one_message_brought_are_answered_in_one(loaded):
    before = [loaded.weights(layer, 0) for layer in range(2)]
    # Layers 1 and 0 as one LayerBundle (as the root sends sums that complete at once).
    items = [m for m in _pass_stream([1, 0]) if m.WhichOneof("kind")]
    message = pb.LayerMessage(bundle=pb.LayerBundle(items=items))
    answers = list(loaded.stub.PushPass(iter([message]), timeout=TIMEOUT_S))
    assert len(answers) == 1
    assert [(a.layer, a.update_applied) for a in [answers[0], *answers[0].following]] == [
        (1, True),
        (0, True),
    ]
    for layer in range(2):
        _assert_weights_equal(loaded.weights(layer, 1), _sgd(before[layer], _grads(layer)))


# -- a pass of several training steps --------------------------------------------------


@contextlib.contextmanager
def _asked_ahead(loaded) -> Iterator[tuple[threading.Thread, list]]:
    """Step 1's layer 0 asked for on a pass stream (``after_update``), read on a thread:
    the thread and what it has received. The stream ends on leaving."""
    requests: queue.Queue = queue.Queue()
    call = loaded.stub.StreamPass(iter(requests.get, None), timeout=TIMEOUT_S)
    requests.put(_weights_request(0, step=1, after_update=True))
    received: list = []
    reader = threading.Thread(target=lambda: received.extend(_unbundled(call)))
    reader.start()
    try:
        yield reader, received
    finally:
        requests.put(None)
        reader.join(TIMEOUT_S)


def _layer_0_of_step_1(messages) -> dict:
    """Layer 0's weights of version 1, decoded from ``messages``; checked against one SGD
    update of the model's."""
    got = decode_layer(messages, Expected(0, 1, pb.FORWARD, layout_of(_model()[0]), "float32"))
    _assert_weights_equal(got, _sgd(_model()[0], _grads(0)))
    return got


def test_a_later_step_s_layer_goes_once_the_update_before_it_is_answered(loaded):
    """A pass of several steps asks for step 1's layer 0 while step 0's gradient of it is
    on its way (``after_update``): MemoryX sends it once that update is applied and
    answered, and the update's answer counts none of its bytes."""
    with _asked_ahead(loaded) as (reader, received):
        assert loaded.push(_gradient_stream(1, 0)).update_applied  # another layer's
        reader.join(0.5)
        assert reader.is_alive() and not received  # layer 0 is still at version 0
        egress = loaded.stats().egress_bytes
        ack = loaded.push(_gradient_stream(0, 0))
        assert ack.update_applied and ack.memoryx.egress_bytes == egress
    got = _layer_0_of_step_1(received)
    assert loaded.stats().egress_bytes == egress + sum(t.numel() * 4 for t in got.values())


def test_a_later_version_not_marked_after_update_is_refused_at_once(loaded):
    # (Only a pass of several steps waits; any other request for a version MemoryX does not
    # hold yet is a mistake.)
    code = _code(
        lambda: list(loaded.stub.StreamPass(iter([_weights_request(0, step=1)]), timeout=TIMEOUT_S))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    # Two updates ahead is refused too, marked or not.
    code = _code(
        lambda: list(
            loaded.stub.StreamPass(
                iter([_weights_request(0, step=2, after_update=True)]), timeout=TIMEOUT_S
            )
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_a_waiting_layer_ends_with_its_call(loaded):
    """A pass cancelled (a failure elsewhere) while a layer waits for its update: the wait
    ends with the call, and a later pass's request is served as before."""
    requests: queue.Queue = queue.Queue()
    call = loaded.stub.StreamPass(iter(requests.get, None), timeout=TIMEOUT_S)
    requests.put(_weights_request(0, step=1, after_update=True))
    waiters = loaded.servicer._updates._waiters  # (CPython's Condition: threads waiting)
    deadline = time.monotonic() + TIMEOUT_S
    while not waiters and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(waiters) == 1  # the layer waits for its update
    call.cancel()
    assert _code(lambda: next(call)) == grpc.StatusCode.CANCELLED
    while waiters and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not waiters  # and stops waiting with the call, not at its deadline
    for layer in (1, 0):
        assert loaded.push(_gradient_stream(layer, 0)).update_applied
    again = loaded.stub.StreamPass(
        iter([_weights_request(0, step=1, after_update=True)]), timeout=TIMEOUT_S
    )
    _layer_0_of_step_1(list(_unbundled(again)))


def test_a_later_step_s_layer_waits_for_the_answer_not_only_the_update(loaded):
    """Applied but not answered yet (MemoryX between applying a gradient and sending its
    answer): the layer still waits, so that the answer goes first."""
    from proto.domain import LayerAck

    store = loaded.servicer.store
    assert store.apply_gradients(0, 0, _grads(0))  # applied; no answer sent yet
    with _asked_ahead(loaded) as (reader, received):
        reader.join(0.5)
        assert reader.is_alive() and not received
        loaded.servicer._answered([LayerAck(layer=0, step=0, phase=pb.BACKWARD)])
    _layer_0_of_step_1(received)
