"""SwarmX gRPC service over real gRPC on loopback: broadcast, cut-through, reduce, stats, errors.

The children are fake LayerSink servicers that record what they receive; the
root's upstream is a real MemoryX servicer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import pytest
import torch

from memoryx.optim import Optimizer
from memoryx.service import MemoryXServicer
from memoryx.service import register as register_memoryx
from proto import memoryx_pb2 as mpb
from proto import memoryx_pb2_grpc as mgrpc
from proto import swarmx_pb2 as spb
from proto import swarmx_pb2_grpc as sgrpc
from proto import tensor_pb2 as pb
from proto.rpc import Security, channel, start_server
from proto.serde import Expected, decode_layer, encode_layer, layout_of
from swarmx.service import SwarmXServicer
from swarmx.service import serve as serve_swarmx

# This module's run credentials (token only: loopback).
SECURITY = Security.generate()

CHUNK_BYTES = 1024
TIMEOUT_S = 20
WAIT_S = 5  # how long a test waits for something that must already have happened
LR = 0.5


def _model() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [
        # 100 chunks of 1 KiB: many more than a child's queue holds.
        {"w": torch.randn(100, 256, generator=gen), "b": torch.randn(100, generator=gen)},
        {"w": torch.randn(3, 5, generator=gen), "b": torch.randn(3, generator=gen)},
    ]


def _nbytes(tensors: dict[str, torch.Tensor], itemsize: int = 4) -> int:
    return sum(t.numel() * itemsize for t in tensors.values())


class FakeSink(sgrpc.LayerSinkServicer):
    """A child that records every message it gets; may fail on purpose."""

    def __init__(self, name: str):
        self.name = name
        self.streams: list[list[pb.LayerMessage]] = []
        self.got_chunk = threading.Event()
        self.fail_with: grpc.StatusCode | None = None
        self.on_message: Callable[[pb.LayerMessage], None] | None = None

    def Deliver(self, request_iterator, context):
        messages: list[pb.LayerMessage] = []
        self.streams.append(messages)
        for message in request_iterator:
            messages.append(message)
            if message.WhichOneof("kind") == "chunk":
                self.got_chunk.set()
            if self.on_message is not None:
                self.on_message(message)
            if self.fail_with is not None:
                context.abort(self.fail_with, f"{self.name} failed on purpose")
        header = messages[0].header
        return pb.LayerAck(
            layer=header.layer,
            step=header.step,
            phase=header.phase,
            num_nodes=1,
            bytes_to_nodes=sum(len(m.chunk.data) for m in messages[1:]),
            flops=1.5,
            update_applied=True,
        )


class HoldingMemoryX(MemoryXServicer):
    """MemoryX that can pause between the messages of a weight stream."""

    hold: Callable[[int], None] | None = None

    def StreamWeights(self, request, context):
        for index, message in enumerate(super().StreamWeights(request, context)):
            if self.hold is not None:
                self.hold(index)
            yield message


class Servers:
    """Every server a test starts, stopped at the end."""

    def __init__(self):
        self.servers: list[grpc.Server] = []

    def start(self, register) -> str:
        server, address = start_server(register, "127.0.0.1", security=SECURITY)
        self.servers.append(server)
        return address

    def memoryx(self) -> tuple[MemoryXServicer, str]:
        servicer = HoldingMemoryX(
            Optimizer.Config(name="sgd", lr=LR, momentum=0.0).build(), chunk_bytes=CHUNK_BYTES
        )
        address = self.start(lambda s: register_memoryx(s, servicer))

        def messages():
            for index, tensors in enumerate(_model()):
                yield from encode_layer(index, 0, pb.FORWARD, tensors, chunk_bytes=CHUNK_BYTES)

        mgrpc.MemoryXStub(channel(address, SECURITY)).LoadWeights(messages(), timeout=TIMEOUT_S)
        return servicer, address

    def sink(self, name: str) -> tuple[FakeSink, str]:
        sink = FakeSink(name)
        return sink, self.start(lambda s: sgrpc.add_LayerSinkServicer_to_server(sink, s))

    def swarmx(self, name: str) -> tuple[SwarmXServicer, str]:
        servicer = SwarmXServicer(name, security=SECURITY)
        server, address = serve_swarmx(servicer, "127.0.0.1", security=SECURITY)
        self.servers.append(server)
        return servicer, address

    def stop(self) -> None:
        for server in self.servers:
            server.stop(grace=None)


@pytest.fixture
def servers() -> Iterator[Servers]:
    s = Servers()
    yield s
    s.stop()


@dataclass
class Tree:
    memoryx: MemoryXServicer
    memoryx_address: str
    root: SwarmXServicer
    stub: sgrpc.SwarmXStub
    sinks: dict[str, FakeSink]


@pytest.fixture
def tree(servers) -> Tree:
    """MemoryX <- swarmx-0-0 (root) -> node-0, node-1, node-2 (fake sinks)."""
    memoryx, memoryx_address = servers.memoryx()
    sinks = {}
    addresses = {}
    for rank in range(3):
        sink, address = servers.sink(f"node-{rank}")
        sinks[sink.name], addresses[sink.name] = sink, address
    root, root_address = servers.swarmx("swarmx-0-0")
    root.connect(children=addresses, parent=None, memoryx=memoryx_address)
    return Tree(
        memoryx, memoryx_address, root, sgrpc.SwarmXStub(channel(root_address, SECURITY)), sinks
    )


def _run_layer(stub, layer=0, step=0, phase=pb.FORWARD, dtype="float32") -> pb.LayerAck:
    return stub.RunLayer(
        spb.LayerRequest(layer=layer, step=step, phase=phase, dtype=dtype), timeout=TIMEOUT_S
    )


def _stream_from_memoryx(address: str, layer: int, dtype: str) -> list[pb.LayerMessage]:
    stub = mgrpc.MemoryXStub(channel(address, SECURITY))
    return list(
        stub.StreamWeights(
            mpb.WeightsRequest(layer=layer, step=0, phase=pb.FORWARD, dtype=dtype),
            timeout=TIMEOUT_S,
        )
    )


# -- broadcast ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_run_layer_broadcasts_identical_bytes_to_every_child(tree, dtype):
    ack = _run_layer(tree.stub, layer=0, dtype=dtype)
    itemsize = 4 if dtype == "float32" else 2
    layer_bytes = _nbytes(_model()[0], itemsize)
    assert (ack.layer, ack.step, ack.phase) == (0, 0, pb.FORWARD)
    assert ack.num_nodes == 3 and ack.bytes_to_nodes == 3 * layer_bytes
    assert ack.flops == pytest.approx(4.5) and ack.update_applied
    streams = [sink.streams for sink in tree.sinks.values()]
    assert all(len(s) == 1 for s in streams)
    reference = [m.SerializeToString() for m in streams[0][0]]
    for s in streams[1:]:
        assert [m.SerializeToString() for m in s[0]] == reference
    # What the children got is what MemoryX sends, and decodes to the weights.
    direct = _stream_from_memoryx(tree.memoryx_address, 0, dtype)
    assert [m.SerializeToString() for m in direct] == reference
    expected = Expected(0, 0, pb.FORWARD, layout_of(_model()[0]), dtype)
    decoded = decode_layer(streams[0][0], expected)
    for name, tensor in _model()[0].items():
        assert torch.equal(decoded[name], tensor.to(getattr(torch, dtype)))
    # MemoryX sent the layer once, whatever the number of children.
    assert tree.memoryx.traffic.egress_bytes == 2 * layer_bytes  # RunLayer + the direct read


def test_mixed_children_each_get_their_own_dtype(servers):
    """A heterogeneous cluster: fp32 from MemoryX, rounded per child on the way down."""
    _, memoryx_address = servers.memoryx()
    wanted = {"node-0": "float16", "node-1": "float32", "node-2": "bfloat16"}
    sinks, addresses = {}, {}
    for name in wanted:
        sinks[name], addresses[name] = servers.sink(name)
    root, root_address = servers.swarmx("swarmx-0-0")
    root.connect(
        children=addresses,
        parent=None,
        memoryx=memoryx_address,
        child_dtypes=wanted,
        dtype="float32",
    )
    stub = sgrpc.SwarmXStub(channel(root_address, SECURITY))
    ack = _run_layer(stub, layer=1, dtype="float32")
    layer = _model()[1]
    assert ack.bytes_to_nodes == _nbytes(layer, 2) + _nbytes(layer, 4) + _nbytes(layer, 2)
    for name, dtype in wanted.items():
        stream = sinks[name].streams[0]
        assert stream[0].header.total_bytes == _nbytes(layer, 2 if dtype != "float32" else 4)
        decoded = decode_layer(stream, Expected(1, 0, pb.FORWARD, layout_of(layer), dtype))
        for tensor_name, tensor in layer.items():
            # Bitwise what MemoryX sends a node of that dtype on its own.
            assert torch.equal(decoded[tensor_name], tensor.to(getattr(torch, dtype)))
    stats = stub.Stats(pb.Empty(), timeout=TIMEOUT_S)
    assert [d.payload_bytes for d in stats.down] == [
        _nbytes(layer, 2),
        _nbytes(layer, 4),
        _nbytes(layer, 2),
    ]


def test_two_level_tree_reaches_every_leaf(servers):
    _, memoryx_address = servers.memoryx()
    root, root_address = servers.swarmx("swarmx-1-0")
    mids = {}
    sinks = []
    for i in range(2):
        mid, mid_address = servers.swarmx(f"swarmx-0-{i}")
        children = {}
        for j in range(2):
            sink, address = servers.sink(f"node-{2 * i + j}")
            sinks.append(sink)
            children[sink.name] = address
        mid.connect(children=children, parent=root_address, memoryx=None)
        mids[mid.name] = (mid, mid_address)
    root.connect(
        children={name: address for name, (_, address) in mids.items()},
        parent=None,
        memoryx=memoryx_address,
    )
    stub = sgrpc.SwarmXStub(channel(root_address, SECURITY))
    ack = _run_layer(stub, layer=1)
    assert ack.num_nodes == 4 and ack.bytes_to_nodes == 4 * _nbytes(_model()[1])
    reference = [m.SerializeToString() for m in _stream_from_memoryx(memoryx_address, 1, "float32")]
    for sink in sinks:
        assert [m.SerializeToString() for m in sink.streams[0]] == reference
    root_stats = stub.Stats(pb.Empty(), timeout=TIMEOUT_S)
    assert [d.link for d in root_stats.down] == [
        "swarmx-1-0 -> swarmx-0-0",
        "swarmx-1-0 -> swarmx-0-1",
    ]
    assert all(d.payload_bytes == _nbytes(_model()[1]) for d in root_stats.down)
    for _, address in mids.values():
        mid_stats = sgrpc.SwarmXStub(channel(address, SECURITY)).Stats(
            pb.Empty(), timeout=TIMEOUT_S
        )
        assert len(mid_stats.down) == 2
        assert all(d.payload_bytes == _nbytes(_model()[1]) for d in mid_stats.down)


def test_deliver_is_cut_through(servers):
    """A child has chunk 0 while the source still holds back the rest of the layer."""
    _, memoryx_address = servers.memoryx()
    sink, sink_address = servers.sink("node-0")
    node, node_address = servers.swarmx("swarmx-0-0")
    node.connect(children={"node-0": sink_address}, parent=None, memoryx=memoryx_address)
    messages = list(encode_layer(0, 0, pb.FORWARD, _model()[0], chunk_bytes=CHUNK_BYTES))
    seen_before_end: list[bool] = []

    def source():
        yield messages[0]
        yield messages[1]
        # Block until the child has chunk 0 (or give up, and let the test fail).
        seen_before_end.append(sink.got_chunk.wait(WAIT_S))
        yield from messages[2:]

    ack = sgrpc.LayerSinkStub(channel(node_address, SECURITY)).Deliver(source(), timeout=TIMEOUT_S)
    assert seen_before_end == [True]
    assert ack.num_nodes == 1 and ack.bytes_to_nodes == _nbytes(_model()[0])
    assert len(sink.streams[0]) == len(messages)


def test_run_layer_is_cut_through_for_every_child(tree):
    """No child waits for the whole layer: each sees chunk 0 while MemoryX is still sending."""
    held = []

    def hold(index):
        if index == 2:  # header and chunk 0 are out; hold chunk 1 until every child has chunk 0
            held.append(all(s.got_chunk.wait(WAIT_S) for s in tree.sinks.values()))

    tree.memoryx.hold = hold
    assert _run_layer(tree.stub, layer=0).num_nodes == 3
    assert held == [True]


def test_stats_count_payload_bytes_per_link(tree):
    stub = tree.stub
    sinks = tree.sinks
    _run_layer(stub, layer=0)
    _run_layer(stub, layer=1, dtype="bfloat16")
    stats = stub.Stats(pb.Empty(), timeout=TIMEOUT_S)
    assert stats.name == "swarmx-0-0"
    expected_bytes = _nbytes(_model()[0]) + _nbytes(_model()[1], 2)
    assert [d.link for d in stats.down] == [f"swarmx-0-0 -> node-{r}" for r in range(3)]
    for link, sink in zip(stats.down, sinks.values(), strict=True):
        got = sum(len(m.chunk.data) for s in sink.streams for m in s[1:])
        assert link.payload_bytes == got == expected_bytes
        assert link.num_chunks == sum(len(s) - 1 for s in sink.streams)
    assert stats.up.payload_bytes == 0 and stats.reduced_in_bytes == 0
    stub.ResetStats(pb.Empty(), timeout=TIMEOUT_S)
    stats = stub.Stats(pb.Empty(), timeout=TIMEOUT_S)
    assert all(d.payload_bytes == 0 and d.num_chunks == 0 for d in stats.down)
    assert len(stats.down) == 3


# -- errors -------------------------------------------------------------------


@pytest.mark.parametrize("fail_after", [1, 2, 60])
@pytest.mark.parametrize("code", [grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DATA_LOSS])
def test_failing_child_fails_run_layer_with_its_code(tree, code, fail_after):
    stub = tree.stub
    sinks = tree.sinks
    bad = sinks["node-1"]
    count = [0]

    def fail_late(message):
        count[0] += 1
        if count[0] >= fail_after:
            bad.fail_with = code

    bad.on_message = fail_late
    with pytest.raises(grpc.RpcError) as info:
        _run_layer(stub, layer=0)  # 100 chunks: more than a child's queue holds
    assert info.value.code() == code
    assert "node-1 failed on purpose" in info.value.details()
    # The tree is not stuck: with the child healthy again the layer goes through.
    bad.on_message, bad.fail_with = None, None
    ack = _run_layer(stub, layer=0)
    assert ack.num_nodes == 3


def test_memoryx_error_keeps_its_code(tree):
    stub = tree.stub
    with pytest.raises(grpc.RpcError) as info:
        _run_layer(stub, layer=0, step=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "step 5 is out of range" in info.value.details()  # MemoryX's own words
    with pytest.raises(grpc.RpcError) as info:
        _run_layer(stub, layer=9)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "layer 9 does not exist" in info.value.details()
    assert _run_layer(stub, layer=1).num_nodes == 3


def test_run_layer_on_a_non_root_is_refused(servers):
    _, memoryx_address = servers.memoryx()
    sink, sink_address = servers.sink("node-0")
    parent, parent_address = servers.swarmx("swarmx-1-0")
    node, node_address = servers.swarmx("swarmx-0-0")
    node.connect(children={"node-0": sink_address}, parent=parent_address, memoryx=None)
    with pytest.raises(grpc.RpcError) as info:
        _run_layer(sgrpc.SwarmXStub(channel(node_address, SECURITY)))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert sink.streams == []


def test_deliver_without_header_is_refused(servers):
    _, memoryx_address = servers.memoryx()
    sink, sink_address = servers.sink("node-0")
    node, node_address = servers.swarmx("swarmx-0-0")
    node.connect(children={"node-0": sink_address}, parent=None, memoryx=memoryx_address)
    messages = list(encode_layer(1, 0, pb.FORWARD, _model()[1]))
    with pytest.raises(grpc.RpcError) as info:
        sgrpc.LayerSinkStub(channel(node_address, SECURITY)).Deliver(
            iter(messages[1:]), timeout=TIMEOUT_S
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# -- reduce -------------------------------------------------------------------


def _gradients(rank: int, layer: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + 10 * rank + layer)
    return {name: torch.randn(t.shape, generator=gen) for name, t in _model()[layer].items()}


def _reduce_all(stub, streams: dict[str, list[pb.LayerMessage]]) -> dict[str, object]:
    """Every child's Reduce at once, each in its own thread; returns ack or error by child."""
    results: dict[str, object] = {}

    def call(child, messages):
        try:
            results[child] = stub.Reduce(iter(messages), timeout=TIMEOUT_S)
        except grpc.RpcError as exc:
            results[child] = exc

    threads = [threading.Thread(target=call, args=item) for item in streams.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT_S + 5)
    assert not any(t.is_alive() for t in threads)
    return results


def _grad_stream(rank: int, layer: int, step: int = 0, **kw) -> list[pb.LayerMessage]:
    return list(
        encode_layer(
            layer,
            step,
            pb.BACKWARD,
            kw.get("grads", _gradients(rank, layer)),
            chunk_bytes=CHUNK_BYTES,
            sender=kw.get("sender", f"node-{rank}"),
        )
    )


def _weights(memoryx: MemoryXServicer, layer: int, step: int) -> dict[str, torch.Tensor]:
    return memoryx.store.weights(layer, step)


def test_reduce_sums_children_and_memoryx_applies_it(tree):
    memoryx = tree.memoryx
    stub = tree.stub
    layer = 0
    results = _reduce_all(stub, {f"node-{r}": _grad_stream(r, layer) for r in range(3)})
    for child, ack in results.items():
        assert isinstance(ack, pb.LayerAck), (child, ack)
        assert ack.update_applied and (ack.layer, ack.step) == (layer, 0)
    after = _weights(memoryx, layer, 1)
    for name, w in _model()[layer].items():
        total = _gradients(0, layer)[name] + _gradients(1, layer)[name] + _gradients(2, layer)[name]
        assert torch.equal(after[name], w.clone().add_(total, alpha=-LR))
    grad_bytes = _nbytes(_model()[layer])
    stats = stub.Stats(pb.Empty(), timeout=TIMEOUT_S)
    assert stats.up.payload_bytes == grad_bytes
    assert stats.up.num_chunks == len(_grad_stream(0, layer)) - 1
    assert stats.reduced_in_bytes == 3 * grad_bytes
    assert memoryx.traffic.ingress_bytes == grad_bytes
    assert memoryx.traffic.num_updates == 1


def test_reduce_counts_bytes_per_layer(tree):
    memoryx = tree.memoryx
    stub = tree.stub
    for layer in (1, 0):
        _reduce_all(stub, {f"node-{r}": _grad_stream(r, layer) for r in range(3)})
    stats = stub.Stats(pb.Empty(), timeout=TIMEOUT_S)
    model_bytes = sum(_nbytes(t) for t in _model())
    assert stats.reduced_in_bytes == 3 * model_bytes
    assert stats.up.payload_bytes == model_bytes
    assert memoryx.traffic.num_updates == 2


def test_reduce_goes_up_a_two_level_tree(servers):
    memoryx, memoryx_address = servers.memoryx()
    root, root_address = servers.swarmx("swarmx-1-0")
    mids = {}
    for i in range(2):
        mid, address = servers.swarmx(f"swarmx-0-{i}")
        mid.connect(
            children={f"node-{2 * i + j}": "127.0.0.1:1" for j in range(2)},
            parent=root_address,
            memoryx=None,
        )
        mids[mid.name] = (mid, address)
    root.connect(
        children={name: address for name, (_, address) in mids.items()},
        parent=None,
        memoryx=memoryx_address,
    )
    results: dict[str, object] = {}
    threads = []
    for i, (_, address) in enumerate(mids.values()):
        stub = sgrpc.SwarmXStub(channel(address, SECURITY))

        def call(stub=stub, i=i):
            streams = {f"node-{r}": _grad_stream(r, 1) for r in (2 * i, 2 * i + 1)}
            results.update(_reduce_all(stub, streams))

        threads.append(threading.Thread(target=call))
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT_S + 10)
    assert sorted(results) == [f"node-{r}" for r in range(4)]
    assert all(isinstance(a, pb.LayerAck) and a.update_applied for a in results.values())
    after = _weights(memoryx, 1, 1)
    for name, w in _model()[1].items():
        g = [_gradients(r, 1)[name] for r in range(4)]
        # Each level sums in child order, in fp32.
        total = (g[0] + g[1]) + (g[2] + g[3])
        assert torch.equal(after[name], w.clone().add_(total, alpha=-LR))
    root_stats = sgrpc.SwarmXStub(channel(root_address, SECURITY)).Stats(
        pb.Empty(), timeout=TIMEOUT_S
    )
    assert root_stats.reduced_in_bytes == 2 * _nbytes(_model()[1])


def _start_and_wait_until_received(tree, children, layer=1) -> dict[str, grpc.Future]:
    """Start these children's Reduce calls; return once the root holds all their chunks."""
    calls = {
        child: tree.stub.Reduce.future(iter(_grad_stream(int(child[-1]), layer)), timeout=TIMEOUT_S)
        for child in children
    }
    expected = len(children) * _nbytes(_model()[layer])
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        entry = tree.root._reducing.get((layer, 0, 0))  # (layer, step, pass id)
        if entry is not None and entry.reduction.received_bytes == expected:
            break
        time.sleep(0.01)
    else:
        raise AssertionError(f"the root never received the streams of {children}")
    assert not any(call.done() for call in calls.values()), "they wait for the last sibling"
    return calls


def _code_of(call: grpc.Future) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call.result(timeout=WAIT_S)
    return info.value.code()


def _rerun_applies(tree) -> None:
    results = _reduce_all(tree.stub, {f"node-{r}": _grad_stream(r, 1) for r in range(3)})
    assert all(isinstance(r, pb.LayerAck) and r.update_applied for r in results.values())
    after = _weights(tree.memoryx, 1, 1)
    for name, w in _model()[1].items():
        total = _gradients(0, 1)[name] + _gradients(1, 1)[name] + _gradients(2, 1)[name]
        assert torch.equal(after[name], w.clone().add_(total, alpha=-LR))


def test_reduce_refuses_an_unknown_child_and_leaves_the_reduction_alone(tree):
    calls = _start_and_wait_until_received(tree, ["node-0", "node-1"])
    bad = _grad_stream(2, 1, sender="node-9")
    with pytest.raises(grpc.RpcError) as info:
        tree.stub.Reduce(iter(bad), timeout=TIMEOUT_S)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "node-9" in info.value.details()
    # A stray stream is refused before it joins (issue 12): the sum in progress is not
    # failed by it, and the real last child completes it.
    assert not any(call.done() for call in calls.values())
    assert tree.stub.Reduce(iter(_grad_stream(2, 1)), timeout=TIMEOUT_S).update_applied
    assert all(call.result(timeout=WAIT_S).update_applied for call in calls.values())
    assert tree.memoryx.store.version(1) == 1 and tree.memoryx.traffic.num_updates == 1


@pytest.mark.parametrize(
    "bad",
    [
        {"w": torch.zeros(5, 3), "b": torch.zeros(3)},  # transposed weight: same byte count
        {"w": torch.zeros(3, 5, dtype=torch.float64), "b": torch.zeros(3)},  # still float32
    ],
    ids=["shape", "values-only"],
)
def test_reduce_rejects_mismatched_child_stream(tree, bad):
    calls = _start_and_wait_until_received(tree, ["node-0", "node-1"])
    stream = _grad_stream(2, 1, grads=bad)
    if bad["w"].dtype == torch.float64:
        # A correct stream: the reduction goes through (control for the case above).
        ack = tree.stub.Reduce(iter(stream), timeout=TIMEOUT_S)
        assert ack.update_applied
        assert all(call.result(timeout=WAIT_S).update_applied for call in calls.values())
        return
    with pytest.raises(grpc.RpcError) as info:
        tree.stub.Reduce(iter(stream), timeout=TIMEOUT_S)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for call in calls.values():
        assert _code_of(call) == grpc.StatusCode.FAILED_PRECONDITION
    assert tree.memoryx.store.version(1) == 0 and tree.memoryx.traffic.num_updates == 0
    _rerun_applies(tree)


def test_cancelled_child_releases_its_siblings(tree):
    calls = _start_and_wait_until_received(tree, ["node-0", "node-1"])
    calls["node-0"].cancel()
    assert _code_of(calls["node-1"]) == grpc.StatusCode.FAILED_PRECONDITION
    assert tree.memoryx.store.version(1) == 0 and tree.memoryx.traffic.num_updates == 0
    _rerun_applies(tree)
