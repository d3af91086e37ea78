"""SwarmX.ReducePass: a pass's gradient layers from a child on one stream, over real gRPC.

The tree is the one of test_swarmx_service (MemoryX <- root -> node-0..2); the
children's gradient streams are sent by the test.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import grpc
import pytest
import torch

from memoryx.service import MemoryXServicer
from proto import swarmx_pb2_grpc as sgrpc
from proto import tensor_pb2 as pb
from proto import threads as proto_threads
from proto.rpc import channel
from swarmx.reducing_loop import LoopReduceSide
from tests.polling import until
from tests.servicer_calls import count_servicer_calls
from tests.swarmx.test_swarmx_service import (
    LR,
    SECURITY,
    TIMEOUT_S,
    WAIT_S,
    Servers,
    Tree,
    _grad_stream,
    _gradients,
    _model,
    _weights,
)

PASS_ID = 7


@pytest.fixture
def calls(monkeypatch) -> dict[str, int]:
    """Calls MemoryX answers, by method (the servicers registered after this count them)."""
    return count_servicer_calls(monkeypatch, {MemoryXServicer: ("PushGradients", "PushPass")})


@pytest.fixture
def tree() -> Iterator[Tree]:
    """MemoryX <- swarmx-0-0 (root) <- node-0, node-1, node-2 (sent by the tests)."""
    servers = Servers()
    try:
        memoryx, memoryx_address = servers.memoryx()
        addresses = {f"node-{rank}": servers.sink(f"node-{rank}")[1] for rank in range(3)}
        root, root_address = servers.swarmx("swarmx-0-0")
        root.connect(children=addresses, parent=None, memoryx=memoryx_address)
        stub = sgrpc.SwarmXStub(channel(root_address, SECURITY))
        yield Tree(memoryx, memoryx_address, root, stub, {})
    finally:
        servers.stop()


def _pass_stream(rank: int, layers: list[int], pass_id: int = PASS_ID, **kw) -> list:
    """Child ``rank``'s gradients of ``layers``, in order, as one pass stream's messages."""
    messages = []
    for layer in layers:
        stream = _grad_stream(rank, layer, **kw)
        stream[0].header.pass_id = pass_id
        messages += stream
    return messages


def _expected(layer: int, ranks=range(3)) -> dict[str, torch.Tensor]:
    """The layer's weights after one SGD step on the children's summed gradient (in order)."""
    out = {}
    for name, w in _model()[layer].items():
        total = _gradients(ranks[0], layer)[name]
        for rank in ranks[1:]:
            total = total + _gradients(rank, layer)[name]
        out[name] = w.clone().add_(total, alpha=-LR)
    return out


def _all_equal(got: dict, want: dict) -> bool:
    return all(torch.equal(got[name], want[name]) for name in want)


def _reduce_passes(stub, streams: dict[str, Iterator]) -> dict[str, object]:
    """Every child's ReducePass at once; its acks (a list) or its error, by child."""
    results: dict[str, object] = {}

    def call(child, messages):
        try:
            results[child] = list(stub.ReducePass(messages, timeout=TIMEOUT_S))
        except grpc.RpcError as exc:
            results[child] = exc

    threads = [threading.Thread(target=call, args=item) for item in streams.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT_S + 5)
    assert not any(t.is_alive() for t in threads)
    return results


def test_a_pass_stream_sums_each_layer_as_reduce_does(calls, tree):
    streams = {f"node-{r}": iter(_pass_stream(r, [1, 0])) for r in range(3)}
    results = _reduce_passes(tree.stub, streams)
    for child, acks in results.items():
        assert isinstance(acks, list), (child, acks)
        assert [(a.layer, a.step, a.update_applied) for a in acks] == [(1, 0, True), (0, 0, True)]
    for layer in (0, 1):
        assert _all_equal(_weights(tree.memoryx, layer, 1), _expected(layer))
    # Both layers went to MemoryX on one stream, and were applied one by one.
    assert calls == {"PushGradients": 0, "PushPass": 1}
    assert tree.memoryx.traffic.num_updates == 2
    stats = tree.stub.Stats(pb.Empty(), timeout=TIMEOUT_S)
    assert stats.reduced_in_bytes == 3 * sum(_nbytes_of(layer) for layer in (0, 1))


def _nbytes_of(layer: int) -> int:
    return sum(t.numel() * 4 for t in _model()[layer].values())


def test_each_layer_is_answered_while_the_pass_still_streams(calls, tree):
    release = threading.Event()

    def messages(rank: int) -> Iterator:
        yield from _pass_stream(rank, [1])
        release.wait(TIMEOUT_S)  # layer 0 is not sent until the test has layer 1's answer
        yield from _pass_stream(rank, [0])

    try:
        responses = [tree.stub.ReducePass(messages(r), timeout=TIMEOUT_S) for r in range(3)]
        firsts = [next(response) for response in responses]
        assert [(a.layer, a.update_applied) for a in firsts] == [(1, True)] * 3
        # Layer 1's update is applied while the streams (to the root, and the root's to
        # MemoryX) are still open; layer 0's is still to come.
        assert tree.memoryx.store.version(1) == 1 and tree.memoryx.store.version(0) == 0
        assert not any(response.done() for response in responses)
    finally:
        release.set()
    rests = [list(response) for response in responses]
    assert [[(a.layer, a.update_applied) for a in rest] for rest in rests] == [[(0, True)]] * 3
    assert _all_equal(_weights(tree.memoryx, 0, 1), _expected(0))
    assert calls == {"PushGradients": 0, "PushPass": 1}


def test_a_child_that_cancels_mid_pass_fails_the_sum_for_all_without_hanging(tree):
    release = threading.Event()
    half_sent = threading.Event()

    def waiting(rank: int) -> Iterator:
        yield from _pass_stream(rank, [1])
        release.wait(TIMEOUT_S)

    def halfway() -> Iterator:
        stream = _pass_stream(2, [1])
        yield from stream[:2]  # the header and the first of two chunks
        half_sent.set()
        release.wait(TIMEOUT_S)

    try:
        siblings = [tree.stub.ReducePass(waiting(r), timeout=TIMEOUT_S) for r in (0, 1)]
        leaving = tree.stub.ReducePass(halfway(), timeout=TIMEOUT_S)
        assert half_sent.wait(WAIT_S)
        # The root has summed node-2's first chunk with its siblings': it leaves mid-layer. (A child
        # that goes away before its header arrives is, as with Reduce, found by the driver's
        # health probes, which cancel the pass from above.)
        assert until(lambda: _num_summed_chunks(tree.root, layer=1) >= 1, WAIT_S)
        leaving.cancel()
        for sibling in siblings:
            with pytest.raises(grpc.RpcError) as info:
                next(sibling)
            # Failed at once for everyone (a hang would end in DEADLINE_EXCEEDED).
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "node-2" in info.value.details()
    finally:
        release.set()
    assert tree.memoryx.store.version(1) == 0 and tree.memoryx.traffic.num_updates == 0
    # The step runs again as a new pass: it is summed and applied as ever.
    streams = {f"node-{r}": iter(_pass_stream(r, [1, 0], pass_id=8)) for r in range(3)}
    results = _reduce_passes(tree.stub, streams)
    assert all(isinstance(acks, list) and len(acks) == 2 for acks in results.values()), results
    for layer in (0, 1):
        assert _all_equal(_weights(tree.memoryx, layer, 1), _expected(layer))


def _num_summed_chunks(root, *, layer: int, step: int = 0) -> int:
    """Chunks of ``layer`` that ``root``'s open sum has summed over every child and sent up."""
    # The sums of pass streams live on the event loop (swarmx.reducing_loop).
    entry = root._loop_reduce.sums.get((layer, step, PASS_ID))
    if entry is None:
        return 0
    with entry.reduction._lock:
        return entry.reduction._num_emitted


def _bad_streams() -> dict[str, list]:
    forward = _pass_stream(0, [1])
    forward[0].header.phase = pb.FORWARD
    return {
        "no pass id": _pass_stream(0, [1, 0], pass_id=0),
        "negative pass id": _pass_stream(0, [1, 0], pass_id=-7),
        "two passes": _pass_stream(0, [1]) + _pass_stream(0, [0], pass_id=8),
        "another child's layer": _pass_stream(0, [1]) + _pass_stream(1, [0]),
        "not a child": _pass_stream(0, [1], sender="node-9"),
        "forward phase": forward,
        "negative step": _pass_stream(0, [1], step=-1),
        "ends mid-layer": _pass_stream(0, [1, 0])[:-1],
        "chunk first": _pass_stream(0, [1])[1:],
    }


@pytest.mark.parametrize("case", sorted(_bad_streams()))
def test_bad_pass_stream_is_refused_and_fails_only_its_own_sums(tree, case):
    with pytest.raises(grpc.RpcError) as info:
        list(tree.stub.ReducePass(iter(_bad_streams()[case]), timeout=TIMEOUT_S))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (case, info.value.details())
    assert tree.memoryx.traffic.num_updates == 0
    # Nothing lingers: the same pass, sent right by every child, is applied.
    results = _reduce_passes(
        tree.stub, {f"node-{r}": iter(_pass_stream(r, [1, 0], pass_id=9)) for r in range(3)}
    )
    assert all(isinstance(acks, list) and len(acks) == 2 for acks in results.values()), results
    for layer in (0, 1):
        assert _all_equal(_weights(tree.memoryx, layer, 1), _expected(layer))


def test_a_bad_stream_is_answered_as_bad_however_late_its_reader_says_so(tree, monkeypatch):
    """A child's stream that ends mid-layer fails that layer's sum, which cancels the pass's
    stream up to MemoryX, and so the answer of the layer before it too. The child is told
    why (INVALID_ARGUMENT), not that a stream was cancelled, even when its stream's reader
    records the failure only after the cancel has reached the other layer."""
    add_layer = LoopReduceSide.add_layer

    async def slow_to_say(self, *args, **kwargs):
        try:
            return await add_layer(self, *args, **kwargs)
        except Exception:
            await asyncio.sleep(0.3)  # the reader records why only after the cancel is in
            raise

    monkeypatch.setattr(LoopReduceSide, "add_layer", slow_to_say)
    with pytest.raises(grpc.RpcError) as info:
        list(tree.stub.ReducePass(iter(_bad_streams()["ends mid-layer"]), timeout=TIMEOUT_S))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert tree.memoryx.traffic.num_updates == 0


def test_a_pass_stream_is_summed_on_the_event_loop_without_a_thread(calls, tree, monkeypatch):
    started = []
    real_start = proto_threads.start
    monkeypatch.setattr(
        proto_threads, "start", lambda *a, **k: started.append(k.get("name")) or real_start(*a, **k)
    )
    streams = {f"node-{r}": iter(_pass_stream(r, [1, 0])) for r in range(3)}
    results = _reduce_passes(tree.stub, streams)
    assert all(isinstance(acks, list) and len(acks) == 2 for acks in results.values()), results
    # No reader per child stream, no feeder per layer going up: the loop does it all.
    assert started == []
    stats = tree.stub.Stats(pb.Empty(), timeout=TIMEOUT_S)
    assert stats.up.payload_bytes == sum(_nbytes_of(layer) for layer in (0, 1))


def test_a_rewired_node_ends_the_sums_still_open(tree):
    release = threading.Event()

    def waiting() -> Iterator:
        yield from _pass_stream(0, [1])
        release.wait(TIMEOUT_S)

    try:
        pending = tree.stub.ReducePass(waiting(), timeout=TIMEOUT_S)
        assert until(lambda: tree.root._loop_reduce.sums, WAIT_S)  # its sum is open
        # A neighbour was replaced: the root is wired again, and the sum can never complete.
        tree.root.connect(
            children={f"node-{r}": "127.0.0.1:1" for r in range(3)},
            parent=None,
            memoryx=tree.memoryx_address,
        )
        with pytest.raises(grpc.RpcError) as info:
            next(pending)
        # At once (a hang would end in DEADLINE_EXCEEDED), saying why.
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "rewired" in info.value.details()
    finally:
        release.set()
    assert tree.memoryx.traffic.num_updates == 0
