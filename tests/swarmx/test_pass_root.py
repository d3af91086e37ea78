"""The root's ``RunPass`` on the event loop (``swarmx.pass_root``), over real gRPC on loopback.

An in-process cluster (MemoryX, the SwarmX root, compute nodes; no Ray) runs training
passes as the coordinator does. What ``tests/swarmx/test_pass_run.py`` checks of a pass
(one call per pass, same bits, refusals, cancels) holds for this path as it runs there;
here: that it takes no thread, and that a rewiring ends a pass still under way at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from benchmarks.fuzz_services import build_services
from memoryx import service as memoryx_service
from nodes import service as node_service
from proto import threads, wire
from proto.clients import SwarmXClient
from proto.domain import Header, Phase
from proto.frames import WireError, expand
from proto.rpc import Security
from swarmx import pass_relay, pass_root, reducing_loop
from tests.swarmx.passes import (
    TIMEOUT_S,
    assert_bitwise_equal,
    memoryx_state,
    pass_requests,
    train_step,
)


@pytest.fixture
def root_threads(monkeypatch) -> list[str]:
    """Names of the threads started for the root's passes (``swarmx-pass-*``)."""
    started: list[str] = []
    start = threads.start

    def counted(target, *args, name: str = "", **kwargs):
        if name.startswith("swarmx-pass"):
            started.append(name)
        return start(target, *args, name=name, **kwargs)

    monkeypatch.setattr(threads, "start", counted)
    return started


@pytest.fixture
def services() -> Iterator:
    cluster = build_services(Security.generate(), num_nodes=2, fanout=2)
    yield cluster
    cluster.stop()


def _count_calls(monkeypatch, owner, name: str, measure) -> list[int]:
    """``owner.name`` wrapped: the list it returns gets ``measure(result)`` of each call."""
    counts: list[int] = []
    original = getattr(owner, name)

    def counted(*args):
        result = original(*args)
        counts.append(measure(result))
        return result

    monkeypatch.setattr(owner, name, counted)
    return counts


def _layers_in(items) -> int:
    return sum(isinstance(item, Header) for item in items)


def test_a_pass_runs_at_the_root_without_a_thread(services, root_threads):
    for step in range(2):
        acks = train_step(services, step, pass_id=step + 1)
        assert [(a.layer, a.phase) for a in acks][:1] == [(0, Phase.FORWARD)]
        assert all(a.num_nodes == 2 and a.update_applied for a in acks)
    assert root_threads == []
    stats = services.swarmx[services.root_name].stats()
    assert len(stats.down) == 2 and all(link.payload_bytes > 0 for link in stats.down)


def test_a_rewiring_ends_a_pass_under_way_at_once(services):
    """A neighbour of the root was replaced: the pass under way can never complete (its
    streams go to the old wiring), so it ends now, not at its deadline."""
    root = services.swarmx[services.root_name]
    worker = services.nodes[0].worker
    computing, release = threading.Event(), threading.Event()
    forward = worker.forward

    def held_forward(layer, step, params):
        computing.set()
        release.wait(TIMEOUT_S)
        return forward(layer, step, params)

    worker.forward = held_forward
    requests = pass_requests(services, services.version(), 9, (Phase.FORWARD, Phase.BACKWARD))
    client = SwarmXClient(services.addresses[services.root_name], services.security)
    pending = client.start_pass(timeout_s=TIMEOUT_S)
    try:
        for request in requests[:2]:
            pending.send(request)
        assert computing.wait(TIMEOUT_S)
        started = time.monotonic()
        root.connect(
            children={c: services.addresses[c] for c in root.children},
            parent=None,
            memoryx=services.addresses["memoryx"],
        )
        with pytest.raises(grpc.RpcError) as info:
            pending.next_ack(timeout_s=TIMEOUT_S)
        assert time.monotonic() - started < TIMEOUT_S / 2
        assert info.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
    finally:
        release.set()
        pending.cancel()
    worker.forward = forward
    # The rewired root runs the next pass.
    acks = train_step(services, services.version(), pass_id=10)
    assert all(a.num_nodes == 2 and a.update_applied for a in acks)


def test_a_pass_of_small_layers_goes_to_each_node_as_one_message(services, monkeypatch):
    # Once the root knows the layers' sizes (from the first pass), a run of small layers
    # whose requests are in goes to each child as one bundle, and each node answers the
    # run in one message; every layer still has its own answer and update.
    train_step(services, 0, pass_id=1)
    layers_per_bundle = _count_calls(monkeypatch, wire, "_bundle", lambda b: _layers_in(b.items))
    node_answers = _count_calls(monkeypatch, pass_relay, "acks_from_wire", len)
    num_layers = len(services.layers)
    for step in range(1, 4):
        acks = train_step(services, step, pass_id=step + 1)
        assert len(acks) == 2 * num_layers
        assert all(a.num_nodes == 2 and a.update_applied for a in acks)
    assert max(layers_per_bundle) > 1
    assert max(node_answers) > 1
    assert sum(node_answers) == 3 * 2 * 2 * num_layers  # every layer answered by both nodes


@pytest.mark.parametrize("num_nodes", [2, 4], ids=["nodes-below-the-root", "relays-between"])
def test_a_pass_sent_at_once_asks_memoryx_for_its_small_layers_in_one_message(
    monkeypatch, num_nodes
):
    # The driver sends a pass's requests in one message (``PendingPass.send_all``); once
    # the root knows the layers' sizes, it asks MemoryX for the run of small layers in one
    # message, and MemoryX answers the run in one bundle. The gradient sums that complete
    # at once go to MemoryX in one message, answered in one. Same bits as layer by layer.
    # (With 4 nodes and fan-out 2, two SwarmX relays between: MemoryX's answers to the sums
    # reach them through the root's ReducePass, each as its own layer's answer.)
    asked = _count_calls(monkeypatch, memoryx_service, "unfolded", len)
    answered: list[int] = []
    messages_of = pass_root._messages

    async def counted_answers(queue):
        async for message in messages_of(queue):
            answered.append(_layers_in(expand(message)))
            yield message

    pushed: list[int] = []  # layers per message of the sums pushed to MemoryX

    class CountedItems(memoryx_service.StreamItems):
        def __init__(self, messages):
            def counted(messages):
                for message in messages:
                    pushed.append(_layers_in(expand(message)))
                    yield message

            super().__init__(counted(messages))

    # Every layer computes on its node's loop once it has computed once (as mlp-digits'
    # do, 0.1-1 ms): a node then answers the pass's backward layers in one message, and
    # their sums complete at once at the root. (The first pass computes on threads.)
    monkeypatch.setattr(node_service, "INLINE_COMPUTE_MAX_S", 60.0)
    monkeypatch.setattr(pass_root, "_messages", counted_answers)
    monkeypatch.setattr(memoryx_service, "StreamItems", CountedItems)
    push_answers = _count_calls(  # MemoryX's answers to the sums: layers per message
        monkeypatch, memoryx_service, "acks_to_wire", lambda message: 1 + len(message.following)
    )
    # An answer a gradient stream up did not expect (one that came twice) fails it.
    unexpected: list[BaseException] = []
    ended = reducing_loop._UpStream._ended

    def watched_end(stream, error):
        if isinstance(error, WireError):
            unexpected.append(error)
        ended(stream, error)

    monkeypatch.setattr(reducing_loop._UpStream, "_ended", watched_end)
    states = []
    for ahead in (None, 2):
        cluster = build_services(Security.generate(), num_nodes=num_nodes, fanout=2)
        try:
            num_layers = len(cluster.layers)
            for step in range(3):
                for counts in (asked, answered, pushed, push_answers):
                    counts.clear()
                acks = train_step(cluster, step, pass_id=step + 1, ahead=ahead)
                assert all(a.num_nodes == num_nodes and a.update_applied for a in acks)
                assert sum(asked) == sum(answered) == 2 * num_layers
                assert sum(pushed) == sum(push_answers) == num_layers
                assert len(pushed) == len(push_answers)  # a message of sums: one answer
                if ahead is None and step > 0:  # (the first pass learns the sizes)
                    assert asked == [2 * num_layers]
                    assert answered == [2 * num_layers]
                    assert pushed == [num_layers]
                elif ahead is not None:  # requests one by one: so are the asks
                    assert set(asked) == {1}
            assert unexpected == []
            states.append(memoryx_state(cluster))
        finally:
            cluster.stop()
    assert_bitwise_equal(states[0], states[1])
