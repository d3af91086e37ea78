"""``SwarmX.RunPass`` and ``MemoryX.StreamPass``: one call per pass, over real gRPC on loopback.

An in-process cluster (MemoryX, the SwarmX tree, real compute nodes; no Ray) runs
training passes as the coordinator does: one ``RunPass`` call to the root per pass,
at most two layers unanswered, the root taking the weights from MemoryX on one
``StreamPass`` call. The calls are counted by wrapping the servicers' methods.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from functools import partial

import grpc
import pytest

from benchmarks.fuzz_services import SETTLE_S, Services, build_services
from memoryx.service import MemoryXServicer
from nodes import gradient_out
from nodes.service import ComputeNodeServicer
from proto import memoryx_pb2 as mpb
from proto import swarmx_pb2 as spb
from proto import swarmx_pb2_grpc as sgrpc
from proto import tensor_pb2 as pb
from proto import wire
from proto.clients import SwarmXClient
from proto.domain import Chunk, Header, LayerAck, LayerRequest, Phase
from proto.frames import bundled
from proto.rpc import Security, channel
from swarmx import pass_relay
from swarmx.service import SwarmXServicer
from tests.servicer_calls import count_servicer_calls
from tests.swarmx.passes import (
    TIMEOUT_S,
    WINDOW,
    assert_bitwise_equal,
    memoryx_state,
    pass_requests,
    run_pass,
    train_step,
)


@pytest.fixture
def calls(monkeypatch) -> Counter:
    """Calls per method of MemoryX and SwarmX servicers built after this fixture."""
    return count_servicer_calls(
        monkeypatch,
        {
            MemoryXServicer: ("StreamWeights", "StreamPass", "PushPass", "PushGradients"),
            SwarmXServicer: ("RunLayer", "RunPass"),
        },
    )


def _cluster(num_nodes: int = 2, fanout: int = 2) -> Services:
    return build_services(Security.generate(), num_nodes=num_nodes, fanout=fanout)


@pytest.fixture
def cluster(calls) -> Iterator[Services]:
    services = _cluster()
    yield services
    services.stop()


def test_a_training_pass_is_one_call_to_the_root_and_one_to_memoryx(cluster, calls):
    num_layers = len(cluster.layers)
    for step in range(2):
        acks = train_step(cluster, step, pass_id=10 + step)
        order = [(a.layer, a.phase) for a in acks]
        assert order == [(layer, Phase.FORWARD) for layer in range(num_layers)] + [
            (layer, Phase.BACKWARD) for layer in reversed(range(num_layers))
        ]
        assert all(a.num_nodes == 2 for a in acks)
        assert all(a.update_applied for a in acks if a.phase == Phase.BACKWARD)
        assert acks[num_layers - 1].num_targets > 0 and acks[num_layers - 1].loss_sum > 0
        assert sum(a.flops for a in acks) > 0
    assert cluster.version() == 2
    # Per step: one call from the driver to the root; the root's weight stream from MemoryX,
    # and its gradient stream to it, are kept from one pass to the next.
    assert calls["RunPass"] == 2 and calls["RunLayer"] == 0
    assert calls["StreamPass"] == 1 and calls["StreamWeights"] == 0
    assert calls["PushPass"] == 1 and calls["PushGradients"] == 0
    stats = cluster.memoryx_stub.Stats(pb.Empty(), timeout=TIMEOUT_S)
    assert stats.num_weight_streams == 2 * 2 * num_layers  # one per layer phase, as before


@pytest.mark.parametrize(
    "num_nodes, fanout, ahead", [(2, 2, WINDOW), (4, 2, WINDOW), (2, 2, 100), (4, 2, 100)]
)
def test_run_pass_trains_the_same_bits_as_one_run_layer_call_per_layer(
    calls, num_nodes, fanout, ahead
):
    """Fanout 2 with 4 nodes: the root feeds SwarmX children (``Deliver`` per layer).
    Ahead 100: the driver sends every request at once, and the root keeps the window."""
    per_layer, per_pass = _cluster(num_nodes, fanout), _cluster(num_nodes, fanout)
    try:
        for step in range(2):
            last = per_layer.train_step(step)  # RunLayer, one layer after the other
            acks = train_step(per_pass, step, pass_id=step + 1, ahead=ahead)
            ours = acks[len(per_pass.layers) - 1]
            assert (ours.loss_sum, ours.num_targets, ours.num_correct) == (
                last.loss_sum,
                last.num_targets,
                last.num_correct,
            )
        assert_bitwise_equal(memoryx_state(per_layer), memoryx_state(per_pass))
        evaluated = run_pass(per_pass, pass_requests(per_pass, 2, 99, (Phase.EVAL,)))
        assert [a.phase for a in evaluated] == [Phase.EVAL] * len(per_pass.layers)
    finally:
        per_layer.stop()
        per_pass.stop()
    assert calls["RunPass"] == 2 + 1 and calls["RunLayer"] == 2 * 2 * len(per_pass.layers)


def _count_bundles(monkeypatch) -> Counter:
    """Bundles decoded from now on, and chunks decoded alone or in them."""
    counts: Counter = Counter()
    bundle, chunk = wire._bundle, wire._chunk

    def counted_bundle(raw):
        got = bundle(raw)
        counts["bundles"] += 1
        counts["chunks in bundles"] += sum(isinstance(i, Chunk) for i in got.items)
        counts["layers in bundles"] += sum(isinstance(i, Header) for i in got.items)
        return got

    def counted_chunk(raw, start):
        counts["chunks"] += 1
        return chunk(raw, start)

    monkeypatch.setattr(wire, "_bundle", counted_bundle)
    monkeypatch.setattr(wire, "_chunk", counted_chunk)
    return counts


def test_every_link_of_a_deeper_tree_carries_its_passes_on_one_stream(monkeypatch, calls):
    # 4 nodes, fanout 2: the root feeds 2 SwarmX nodes, each of those 2 compute nodes,
    # every one on one DeliverPass call that carries pass after pass (the SwarmX nodes
    # relay theirs, and keep their own streams down too), none on a Deliver call per layer.
    node_calls = count_servicer_calls(
        monkeypatch, {ComputeNodeServicer: ("Deliver", "DeliverPass")}
    )
    swarmx_calls = count_servicer_calls(
        monkeypatch, {SwarmXServicer: ("Deliver", "DeliverPass", "ReducePass")}
    )
    services = _cluster(num_nodes=4, fanout=2)
    bundles = _count_bundles(monkeypatch)  # (the model's weights were loaded item by item)
    read_answers = pass_relay.acks_from_wire

    def counted_answers(message):
        acks = read_answers(message)
        bundles["gradients in answers"] += sum(bool(ack.gradient) for ack in acks)
        return acks

    monkeypatch.setattr(pass_relay, "acks_from_wire", counted_answers)
    try:
        for step in range(2):
            acks = train_step(services, step, pass_id=20 + step)
            assert all(a.num_nodes == 4 for a in acks)
        evaluated = run_pass(services, pass_requests(services, 2, 99, (Phase.EVAL,)))
        assert all(a.num_nodes == 4 for a in evaluated)
    finally:
        services.stop()
    assert node_calls["DeliverPass"] == 4 and node_calls["Deliver"] == 0
    assert swarmx_calls["DeliverPass"] == 2 and swarmx_calls["Deliver"] == 0
    # Only the SwarmX nodes send gradients on ReducePass streams, one per training pass:
    # each compute node answers a backward layer with its gradient.
    assert swarmx_calls["ReducePass"] == 2 * 2
    assert bundles["gradients in answers"] == 2 * 4 * len(services.layers)
    # Every (small) layer crossed every link as one message: weights on 7 links (MemoryX
    # to the root, to 2 SwarmX nodes, to 4 compute nodes) in each phase, gradients on 3
    # gradient streams on the way back (2 SwarmX nodes to the root, the root to MemoryX);
    # 2 training passes and one evaluation. The 4 answers' gradients, each encoded as one
    # bundle, are read where they are summed only (inside the answer's protobuf), not back
    # by the node that wrote them: its answer carries the message it encoded. (The root
    # may send a run of small layers as one bundle.)
    assert bundles["chunks"] == bundles["chunks in bundles"] > 0
    assert bundles["layers in bundles"] == (2 * (7 + 7 + 3) + 7) * len(services.layers)
    assert bundles["bundles"] <= bundles["layers in bundles"]


def test_a_gradient_too_big_for_one_answer_goes_up_on_a_gradient_stream(monkeypatch):
    # A compute node answers a backward layer with its gradient only if it is one message;
    # a bigger one (here: bundles of at most 64 bytes) streams on ReducePass as before.
    # Either way the pass trains the same bits.
    states, streams = [], []
    for max_bytes in (None, 64):
        with monkeypatch.context() as patch:
            calls = count_servicer_calls(patch, {SwarmXServicer: ("ReducePass",)})
            if max_bytes is not None:
                patch.setattr(gradient_out, "bundled", partial(bundled, max_bytes=max_bytes))
            services = _cluster(num_nodes=2, fanout=4)  # the root feeds both nodes
            try:
                for step in range(2):
                    acks = train_step(services, step, pass_id=30 + step)
                    assert all(a.num_nodes == 2 and a.update_applied for a in acks)
                states.append(memoryx_state(services))
            finally:
                services.stop()
            streams.append(calls["ReducePass"])
    assert streams == [0, 2 * 2]
    assert_bitwise_equal(*states)


def _raw_pass(services: Services, messages: list[spb.LayerRequest], address=None):
    stub = sgrpc.SwarmXStub(
        channel(address or services.addresses[services.root_name], services.security)
    )
    return list(stub.RunPass(iter(messages), timeout=TIMEOUT_S))


def _eval(step: int, layer: int, position: int, length: int = 2, pass_id: int = 5, **kw):
    return spb.LayerRequest(
        layer=layer,
        step=step,
        phase=kw.pop("phase", pb.EVAL),
        dtype="float32",
        pass_id=pass_id,
        pass_position=position,
        pass_length=length,
        **kw,
    )


@pytest.mark.parametrize(
    "case",
    [
        "no pass id",
        "starts at 2",
        "skips a position",
        "two pass ids",
        "two lengths",
        "position past the length",
        "ends early",
        "bad phase",
        "negative layer",
    ],
)
def test_bad_pass_requests_are_refused_and_change_nothing(cluster, case):
    step = cluster.version()
    before = cluster.fingerprint()
    messages = {
        "no pass id": [_eval(step, 0, 1, pass_id=0), _eval(step, 1, 2, pass_id=0)],
        "starts at 2": [_eval(step, 0, 2), _eval(step, 1, 3)],
        "skips a position": [_eval(step, 0, 1, length=3), _eval(step, 1, 3, length=3)],
        "two pass ids": [_eval(step, 0, 1), _eval(step, 1, 2, pass_id=6)],
        "two lengths": [_eval(step, 0, 1), _eval(step, 1, 2, length=3)],
        "position past the length": [_eval(step, 0, 1, length=1), _eval(step, 1, 2, length=1)],
        "ends early": [_eval(step, 0, 1, length=3), _eval(step, 1, 2, length=3)],
        "bad phase": [_eval(step, 0, 1, phase=77), _eval(step, 1, 2)],
        "negative layer": [_eval(step, -1, 1), _eval(step, 1, 2)],
    }[case]
    with pytest.raises(grpc.RpcError) as info:
        _raw_pass(cluster, messages)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, case
    # A layer already on its way when the pass was refused ends once the nodes see it.
    settle_until = time.monotonic() + SETTLE_S
    while cluster.fingerprint() != before and time.monotonic() < settle_until:
        time.sleep(0.02)
    assert cluster.fingerprint() == before
    # The root and the nodes are free for the next pass.
    assert len(_raw_pass(cluster, [_eval(step, 0, 1, pass_id=7), _eval(step, 1, 2, pass_id=7)]))


def test_a_layer_memoryx_refuses_fails_the_pass_with_its_code(cluster, calls):
    step = cluster.version()
    for bad in (_eval(step, 5, 2), _eval(step + 3, 1, 2)):  # no such layer; a future step
        with pytest.raises(grpc.RpcError) as info:
            _raw_pass(cluster, [_eval(step, 0, 1), bad])
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # MemoryX ended each failed pass's weight stream: the next pass opens its own.
    assert len(_raw_pass(cluster, [_eval(step, 0, 1, pass_id=7), _eval(step, 1, 2, pass_id=7)]))
    assert len(_raw_pass(cluster, [_eval(step, 0, 1, pass_id=8), _eval(step, 1, 2, pass_id=8)]))
    assert calls["StreamPass"] == 3  # (the two good passes on one)


def test_run_pass_on_a_non_root_is_refused(calls):
    services = _cluster(num_nodes=4, fanout=2)
    try:
        inner = next(name for name in services.swarmx if name != services.root_name)
        with pytest.raises(grpc.RpcError) as info:
            _raw_pass(services, [_eval(0, 0, 1), _eval(0, 1, 2)], services.addresses[inner])
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not the root" in info.value.details()
    finally:
        services.stop()


@pytest.mark.parametrize(
    "position, length, pass_id", [(3, 2, 5), (0, 2, 5), (1, 2, 0), (-1, 2, 5), (1, -2, 5)]
)
def test_a_layer_with_a_bad_place_in_its_pass_is_refused_below_the_root(
    calls, position, length, pass_id
):
    services = _cluster(num_nodes=4, fanout=2)
    try:
        inner = next(name for name in services.swarmx if name != services.root_name)
        header = pb.LayerHeader(
            layer=0,
            step=0,
            phase=pb.EVAL,
            pass_id=pass_id,
            pass_position=position,
            pass_length=length,
        )
        stub = sgrpc.LayerSinkStub(channel(services.addresses[inner], services.security))
        with pytest.raises(grpc.RpcError) as info:
            stub.Deliver(iter([pb.LayerMessage(header=header)]), timeout=TIMEOUT_S)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "pass_position" in info.value.details()
    finally:
        services.stop()


@pytest.mark.parametrize(
    "headers, error",
    [
        ([{"pass_id": 5}], "place in the pass"),
        ([{"pass_id": 5, "pass_position": 3, "pass_length": 2}], "pass_position"),
    ],
)
def test_a_bad_pass_stream_is_refused_below_the_root(calls, headers, error):
    services = _cluster(num_nodes=4, fanout=2)
    try:
        inner = next(name for name in services.swarmx if name != services.root_name)
        messages = [
            pb.LayerMessage(header=pb.LayerHeader(layer=0, step=0, phase=pb.EVAL, **fields))
            for fields in headers
        ]
        stub = sgrpc.LayerSinkStub(channel(services.addresses[inner], services.security))
        with pytest.raises(grpc.RpcError) as info:
            list(stub.DeliverPass(iter(messages), timeout=TIMEOUT_S))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error in info.value.details()
    finally:
        services.stop()


def test_a_pass_cancelled_mid_way_is_run_again_bit_identically(calls):
    interrupted, reference = _cluster(), _cluster()
    try:
        train_step(reference, 0, pass_id=1)
        requests = pass_requests(interrupted, 0, 1, (Phase.FORWARD, Phase.BACKWARD))
        root = SwarmXClient(interrupted.addresses[interrupted.root_name], interrupted.security)
        pending = root.start_pass(timeout_s=TIMEOUT_S)
        for request in requests[:WINDOW]:
            pending.send(request)
        assert pending.next_ack(timeout_s=TIMEOUT_S).layer == 0
        pending.send(requests[WINDOW])  # the first backward layer: its update may not apply
        pending.cancel()
        with pytest.raises(grpc.RpcError) as info:
            while True:
                pending.next_ack(timeout_s=TIMEOUT_S)
        assert info.value.code() == grpc.StatusCode.CANCELLED
        # The cancelled call's layers end; the step runs again as a new pass.
        train_step(interrupted, 0, pass_id=2)
        assert_bitwise_equal(memoryx_state(reference), memoryx_state(interrupted))
        interrupted.stats_all()
    finally:
        interrupted.stop()
        reference.stop()


def test_a_stalled_memoryx_stream_is_cancelled_with_the_pass(cluster, monkeypatch):
    """The driver gives up on a pass whose weights do not come: the root's MemoryX
    stream ends with it, and the next pass runs."""
    release = threading.Event()
    held = threading.Event()
    original = MemoryXServicer._weights

    def stalled(self, request, **options):
        if request.layer == 1:
            held.set()
            release.wait(TIMEOUT_S)
        yield from original(self, request, **options)

    monkeypatch.setattr(MemoryXServicer, "_weights", stalled)
    step = cluster.version()
    root = SwarmXClient(cluster.addresses[cluster.root_name], cluster.security)
    pending = root.start_pass(timeout_s=TIMEOUT_S)
    for request in pass_requests(cluster, step, 3, (Phase.EVAL,)):
        pending.send(request)
    pending.close()
    assert pending.next_ack(timeout_s=TIMEOUT_S).layer == 0
    assert held.wait(TIMEOUT_S)
    pending.cancel()
    release.set()
    monkeypatch.setattr(MemoryXServicer, "_weights", original)
    acks = run_pass(cluster, pass_requests(cluster, step, 4, (Phase.EVAL,)))
    assert [a.layer for a in acks] == list(range(len(cluster.layers)))


def _evals(step: int, pass_id: int, layers=(0, 1)) -> list[LayerRequest]:
    return [
        LayerRequest(
            layer=layer,
            step=step,
            phase=Phase.EVAL,
            dtype="float32",
            pass_id=pass_id,
            pass_position=position,
            pass_length=len(layers),
        )
        for position, layer in enumerate(layers, start=1)
    ]


def _kept_pass(root: SwarmXClient, requests, timeout_s: float = TIMEOUT_S) -> list[LayerAck]:
    """A pass as the coordinator runs it: on the client's kept RunPass stream."""
    pending = root.start_pass(timeout_s=timeout_s, keep=True)
    pending.send_all(requests)
    pending.close()
    return [pending.next_ack(timeout_s=TIMEOUT_S) for _ in requests]


def test_the_driver_sends_pass_after_pass_on_one_run_pass_stream(cluster, calls):
    root = SwarmXClient(cluster.addresses[cluster.root_name], cluster.security)
    reference = _cluster()
    try:
        for step in range(3):
            requests = pass_requests(cluster, step, 30 + step, (Phase.FORWARD, Phase.BACKWARD))
            acks = _kept_pass(root, requests)
            assert [(a.layer, a.phase) for a in acks] == [(r.layer, r.phase) for r in requests]
            cluster.memoryx_stub.CommitStep(mpb.StepRequest(step=step), timeout=TIMEOUT_S)
            train_step(reference, step, pass_id=30 + step)
        evaluated = _kept_pass(root, pass_requests(cluster, 3, 40, (Phase.EVAL,)))
        assert [a.layer for a in evaluated] == list(range(len(cluster.layers)))
        assert calls["RunPass"] == 1 + 3  # this client's one, and the reference's three
        assert_bitwise_equal(memoryx_state(reference), memoryx_state(cluster))
    finally:
        root.close()
        reference.stop()


def test_a_failed_pass_leaves_the_next_a_new_run_pass_stream(cluster, calls):
    root = SwarmXClient(cluster.addresses[cluster.root_name], cluster.security)
    step = cluster.version()
    try:
        assert len(_kept_pass(root, _evals(step, 7)))
        with pytest.raises(grpc.RpcError) as info:
            _kept_pass(root, _evals(step, 8, layers=(0, 5)))  # no layer 5
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert len(_kept_pass(root, _evals(step, 9)))
        assert calls["RunPass"] == 2
    finally:
        root.close()


def test_a_kept_run_pass_stream_keeps_each_passs_deadline(cluster, monkeypatch):
    """On a kept stream the call's deadline is not the pass's: the client ends a pass whose
    deadline has passed (DEADLINE_EXCEEDED), and the next pass runs on a new stream."""
    release = threading.Event()
    original = MemoryXServicer._weights

    def stalled(self, request, **options):
        if request.layer == 1:
            release.wait(TIMEOUT_S)
        yield from original(self, request, **options)

    root = SwarmXClient(cluster.addresses[cluster.root_name], cluster.security)
    step = cluster.version()
    try:
        monkeypatch.setattr(MemoryXServicer, "_weights", stalled)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            _kept_pass(root, pass_requests(cluster, step, 3, (Phase.EVAL,)), timeout_s=0.5)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < TIMEOUT_S / 2
        release.set()
        monkeypatch.setattr(MemoryXServicer, "_weights", original)
        acks = _kept_pass(root, pass_requests(cluster, step, 4, (Phase.EVAL,)))
        assert [a.layer for a in acks] == list(range(len(cluster.layers)))
    finally:
        release.set()
        root.close()


def test_a_run_pass_stream_idle_for_half_the_idle_limit_is_not_used_again(calls):
    services = build_services(Security.generate(stream_idle_s=0.4), num_nodes=2, fanout=2)
    root = SwarmXClient(services.addresses[services.root_name], services.security)
    step = services.version()
    try:
        for pass_id in (7, 8):
            assert len(_kept_pass(root, _evals(step, pass_id)))
        assert calls["RunPass"] == 1
        time.sleep(0.25)  # past half of stream_idle_s: the root may end it as a pass begins
        assert len(_kept_pass(root, _evals(step, 9)))
        assert calls["RunPass"] == 2
    finally:
        root.close()
        services.stop()
