"""Compute-node gRPC service, alone and in an in-process cluster over real gRPC on loopback.

The cluster is MemoryX <- SwarmX tree <- compute nodes, each component a
servicer on its own loopback server, wired with ``.connect`` as
``emulator/launch.py`` wires the Ray actors. No Ray.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core.data import BatchSampler, DataConfig, Dataset
from memoryx.service import MemoryXServicer
from nodes.cs2 import Cs2Backend
from nodes.service import ComputeNodeServicer
from nodes.service import serve as serve_node
from nodes.worker import NodeWorker
from proto import node_pb2_grpc as ngrpc
from proto import swarmx_pb2_grpc as sgrpc
from proto import tensor_pb2 as pb
from proto.clients import MemoryXClient, NodeClient, SwarmXClient
from proto.domain import LayerAck, LayerRequest, NodeStats, Phase
from proto.rpc import channel
from proto.serde import encode_layer
from swarmx.service import SwarmXServicer
from swarmx.tree import build_tree
from tests.nodes.in_process_cluster import (
    CHUNK_BYTES,
    LR,
    SECURITY,
    SEED,
    TIMEOUT_S,
    InProcessCluster,
    build_cluster,
    layer_weights,
)
from tests.proto.edits import edited
from tests.servicer_calls import count_servicer_calls


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))


def _layers(model: nn.Sequential) -> list[nn.Module]:
    """The streamed layers: [Sequential(Linear, ReLU), Linear]."""
    return [nn.Sequential(model[0], model[1]), model[2]]


def _nbytes(tensors, itemsize: int = 4) -> int:
    return sum(t.numel() * itemsize for t in tensors.values())


MODEL_BYTES = sum(_nbytes(layer_weights(layer)) for layer in _layers(_model()))


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    return DataConfig(name="digits").build(seed=SEED)


def _reference_steps(dataset: Dataset, batch_size: int, num_steps: int):
    """Plain torch: the same model, the same global batches, torch.optim.SGD."""
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    sampler = BatchSampler(dataset.num_train, batch_size, seed=SEED)
    losses = []
    for step in range(num_steps):
        index = sampler.global_batch(step)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(dataset.train_inputs[index]), dataset.train_targets[index])
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return [layer_weights(layer) for layer in _layers(model)], losses


def _memoryx_weights(cluster: InProcessCluster, step: int) -> list[dict[str, torch.Tensor]]:
    return [cluster.memoryx.store.weights(layer, step) for layer in range(2)]


def _assert_close(got: list[dict], want: list[dict], atol: float = 1e-6) -> None:
    for g, w in zip(got, want, strict=True):
        assert list(g) == list(w)
        for name in w:
            torch.testing.assert_close(g[name], w[name], rtol=0, atol=atol)


# -- the full chain -----------------------------------------------------------


@pytest.mark.parametrize(("num_nodes", "fanout"), [(2, 4), (3, 2)])
def test_training_steps_match_plain_torch_sgd(dataset, num_nodes, fanout):
    batch_size = 12 * num_nodes
    cluster = build_cluster(
        _layers(_model()), dataset, num_nodes=num_nodes, batch_size=batch_size, fanout=fanout
    )
    try:
        reference, losses = _reference_steps(dataset, batch_size, num_steps=2)
        for step in range(2):
            before = cluster.stats()
            last, acks = cluster.train_step(step)
            after = cluster.stats()
            # Weight streaming: each layer leaves MemoryX twice per step, gradients come once.
            assert after.egress_bytes - before.egress_bytes == 2 * MODEL_BYTES
            assert after.ingress_bytes - before.ingress_bytes == MODEL_BYTES
            assert after.num_updates - before.num_updates == 2
            assert last.loss_sum / last.num_targets == pytest.approx(losses[step], abs=1e-5)
            assert last.num_targets == batch_size
            assert all(a.num_nodes == num_nodes for a in acks)
            assert all(a.update_applied for a in acks)
            assert sum(a.bytes_to_nodes for a in acks) == 2 * num_nodes * MODEL_BYTES
            assert sum(a.gradient_bytes for a in acks) == num_nodes * MODEL_BYTES
        _assert_close(_memoryx_weights(cluster, 2), reference)
        assert cluster.memoryx.store.version(0) == 2
        for stats in cluster.node_stats():
            assert stats.weight_bytes_received == 2 * 2 * MODEL_BYTES
            assert stats.gradient_bytes_sent == 2 * MODEL_BYTES
            assert stats.weight_bytes_held == 0 and stats.activation_bytes_held == 0
            assert stats.peak_activation_bytes > 0
            assert stats.layer_input_bytes_held == 0
            assert 0 < stats.peak_layer_input_bytes <= stats.peak_activation_bytes
    finally:
        cluster.stop()


def test_typed_clients_drive_a_step_bitwise_like_the_stubs(dataset):
    """The coordinator's path (domain types through proto.clients) trains the same bits."""
    weights = []
    for use_clients in (False, True):
        cluster = build_cluster(_layers(_model()), dataset, num_nodes=2, batch_size=24)
        try:
            if not use_clients:
                cluster.train_step(0)
            else:
                root = SwarmXClient(cluster.root_address, SECURITY)
                acks = [
                    root.run_layer(LayerRequest(layer, 0, phase, "float32"), timeout_s=TIMEOUT_S)
                    for layer, phase in [(0, Phase.FORWARD), (1, Phase.FORWARD)]
                    + [(1, Phase.BACKWARD), (0, Phase.BACKWARD)]
                ]
                assert all(isinstance(a, LayerAck) and a.num_nodes == 2 for a in acks)
                assert all(a.update_applied for a in acks[2:])
                MemoryXClient(cluster.memoryx_address, SECURITY).commit_step(0)
                nodes = [NodeClient(a, SECURITY).stats() for a in cluster.node_addresses]
                assert all(isinstance(n, NodeStats) for n in nodes)
                assert [n.gradient_bytes_sent for n in nodes] == [MODEL_BYTES] * 2
                assert root.stats().up.payload_bytes == MODEL_BYTES
            weights.append(_memoryx_weights(cluster, 1))
        finally:
            cluster.stop()
    for raw, typed in zip(*weights, strict=True):
        assert all(torch.equal(raw[name], typed[name]) for name in raw)


def test_one_step_weights_and_link_traffic(dataset):
    cluster = build_cluster(_layers(_model()), dataset, num_nodes=2, batch_size=24)
    try:
        cluster.train_step(0)
        reference, _ = _reference_steps(dataset, 24, num_steps=1)
        _assert_close(_memoryx_weights(cluster, 1), reference)
        root = next(iter(cluster.swarmx.values()))
        stats = root.Stats(pb.Empty(), None)
        assert [d.payload_bytes for d in stats.down] == [2 * MODEL_BYTES] * 2
        assert stats.up.payload_bytes == MODEL_BYTES
        assert stats.reduced_in_bytes == 2 * MODEL_BYTES
    finally:
        cluster.stop()


def test_bf16_streams_half_the_weight_bytes(dataset):
    cluster = build_cluster(
        _layers(_model()), dataset, num_nodes=2, batch_size=24, precision="bf16"
    )
    try:
        forward = [cluster.run_layer(layer, 0, pb.FORWARD, "bfloat16") for layer in range(2)]
        backward = [cluster.run_layer(layer, 0, pb.BACKWARD, "bfloat16") for layer in (1, 0)]
        assert all(a.update_applied for a in backward)
        stats = cluster.stats()
        assert stats.egress_bytes == MODEL_BYTES  # 2 passes x half the bytes
        assert stats.ingress_bytes == MODEL_BYTES  # gradients travel as fp32
        assert forward[-1].num_targets == 24
    finally:
        cluster.stop()


def test_failed_backward_is_rerun_from_the_forward_pass(dataset):
    """A node that cannot do its backward fails the layer; its sibling is not left hanging,
    and the step, run again, gives the same weights as plain torch."""
    cluster = build_cluster(_layers(_model()), dataset, num_nodes=2, batch_size=24)
    try:
        for layer in range(2):
            cluster.run_layer(layer, 0, pb.FORWARD)
        # node-1 loses its activations: it runs layer 0's forward again, on its own.
        stream = encode_layer(0, 0, pb.FORWARD, layer_weights(_layers(_model())[0]))
        node1 = sgrpc.LayerSinkStub(channel(cluster.node_addresses[1], SECURITY))
        node1.Deliver(stream, timeout=TIMEOUT_S)
        with pytest.raises(grpc.RpcError) as info:
            cluster.run_layer(1, 0, pb.BACKWARD)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "node 1" in info.value.details()
        assert cluster.memoryx.store.version(1) == 0  # no partial sum was applied
        # The step runs again, from its forward pass.
        cluster.train_step(0)
        reference, _ = _reference_steps(dataset, 24, num_steps=1)
        _assert_close(_memoryx_weights(cluster, 1), reference)
        assert cluster.stats().num_updates == 2
    finally:
        cluster.stop()


# -- one node, driven directly ------------------------------------------------


@dataclass
class SingleNode:
    servicer: ComputeNodeServicer
    sink: sgrpc.LayerSinkStub
    stub: ngrpc.ComputeNodeStub
    server: grpc.Server


@pytest.fixture
def node(dataset) -> Iterator[SingleNode]:
    worker = NodeWorker(
        rank=0,
        num_nodes=1,
        layers=_layers(_model()),
        dataset=dataset,
        batch_size=16,
        seed=SEED,
        backend=Cs2Backend.Config().build(),
    )
    servicer = ComputeNodeServicer(
        worker, name="node-0", security=SECURITY, chunk_bytes=CHUNK_BYTES
    )
    server, address = serve_node(servicer, "127.0.0.1", security=SECURITY)
    yield SingleNode(
        servicer,
        sgrpc.LayerSinkStub(channel(address, SECURITY)),
        ngrpc.ComputeNodeStub(channel(address, SECURITY)),
        server,
    )
    server.stop(grace=None)


def _stream(layer: int, step: int = 0, phase: int = pb.FORWARD, **kw) -> list[pb.LayerMessage]:
    tensors = kw.get("tensors", layer_weights(_layers(_model())[layer]))
    return list(
        encode_layer(
            kw.get("header_layer", layer),
            step,
            phase,
            tensors,
            dtype=kw.get("dtype", "float32"),
            chunk_bytes=CHUNK_BYTES,
            sender="swarmx-0-0",
        )
    )


def _reference_loss_sum(dataset: Dataset) -> float:
    index = BatchSampler(dataset.num_train, 16, seed=SEED).global_batch(0)
    logits = _model()(dataset.train_inputs[index])
    return F.cross_entropy(logits, dataset.train_targets[index], reduction="sum").item()


def _bad_layer1_streams() -> dict[str, list[pb.LayerMessage]]:
    good = _stream(1)
    w = layer_weights(_layers(_model())[1])
    return {
        "layer out of range": _stream(1, header_layer=2),
        "negative layer": _stream(1, header_layer=-1),
        "layer 0's header": edited(good, 0, layer=0),
        "chunk of layer 0": edited(good, 1, layer=0),
        "chunk of another step": edited(good, 1, step=1),
        "transposed weight": _stream(1, tensors={"weight": w["weight"].t(), "bias": w["bias"]}),
        "wrong shape in chunk": edited(good, 1, shape=[16, 10]),
        "bfloat16": _stream(1, dtype="bfloat16"),
        "float16 chunk": edited(good, 1, dtype="float16"),
        "header total_bytes": edited(good, 0, total_bytes=_nbytes(w) + 4),
        "chunk tensor_bytes": edited(good, 1, tensor_bytes=_nbytes({"w": w["weight"]}) - 4),
        "unknown phase": _stream(1, phase=pb.PHASE_UNSPECIFIED),
        "missing header": good[1:],
        "ends early": good[:-1],
        "extra chunk": [*good, good[-1]],
        "empty": [],
    }


@pytest.mark.parametrize("case", list(_bad_layer1_streams()))
def test_bad_delivery_is_rejected_and_changes_nothing(node, dataset, case):
    first = node.sink.Deliver(iter(_stream(0)), timeout=TIMEOUT_S)
    assert first.num_nodes == 1 and first.bytes_to_nodes == _nbytes(
        layer_weights(_layers(_model())[0])
    )
    before = node.stub.Stats(pb.Empty(), timeout=TIMEOUT_S)
    with pytest.raises(grpc.RpcError) as info:
        node.sink.Deliver(iter(_bad_layer1_streams()[case]), timeout=TIMEOUT_S)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, case
    after = node.stub.Stats(pb.Empty(), timeout=TIMEOUT_S)
    assert after == before
    # The node still holds layer 0's output: the correct layer 1 completes the forward pass.
    ack = node.sink.Deliver(iter(_stream(1)), timeout=TIMEOUT_S)
    assert ack.num_targets == 16
    assert ack.loss_sum == pytest.approx(_reference_loss_sum(dataset), rel=1e-6)
    stats = node.stub.Stats(pb.Empty(), timeout=TIMEOUT_S)
    assert stats.weight_bytes_received == before.weight_bytes_received + MODEL_BYTES - _nbytes(
        layer_weights(_layers(_model())[0])
    )


def test_forward_acks_and_stats(node, dataset):
    acks = [node.sink.Deliver(iter(_stream(layer)), timeout=TIMEOUT_S) for layer in range(2)]
    assert [(a.layer, a.step, a.phase) for a in acks] == [(0, 0, pb.FORWARD), (1, 0, pb.FORWARD)]
    assert acks[0].num_targets == 0 and acks[1].num_targets == 16
    assert all(a.flops > 0 for a in acks)
    stats = node.stub.Stats(pb.Empty(), timeout=TIMEOUT_S)
    assert stats.rank == 0 and stats.weight_bytes_received == MODEL_BYTES
    assert stats.weight_bytes_held == 0 and stats.activation_bytes_held > 0
    # The modelled node keeps each layer's input: the data batch and layer 1's input, and
    # the logits it passes on (16 samples; what the process holds is at least as much).
    assert stats.layer_input_bytes_held > 0
    assert stats.activation_bytes_held >= stats.layer_input_bytes_held
    assert stats.gradient_bytes_sent == 0
    node.stub.ResetStats(pb.Empty(), timeout=TIMEOUT_S)
    assert node.stub.Stats(pb.Empty(), timeout=TIMEOUT_S).weight_bytes_received == 0


def test_backward_before_forward_is_failed_precondition(node):
    for layer in (1, 0):
        with pytest.raises(grpc.RpcError) as info:
            node.sink.Deliver(iter(_stream(layer, phase=pb.BACKWARD)), timeout=TIMEOUT_S)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert node.stub.Stats(pb.Empty(), timeout=TIMEOUT_S).gradient_bytes_sent == 0


def test_out_of_order_passes_are_failed_precondition(node):
    # Layer 1's forward needs layer 0's output of the same step.
    with pytest.raises(grpc.RpcError) as info:
        node.sink.Deliver(iter(_stream(1)), timeout=TIMEOUT_S)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    node.sink.Deliver(iter(_stream(0)), timeout=TIMEOUT_S)
    with pytest.raises(grpc.RpcError) as info:
        node.sink.Deliver(iter(_stream(1, step=1)), timeout=TIMEOUT_S)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    node.sink.Deliver(iter(_stream(1)), timeout=TIMEOUT_S)
    # Backward of layer 0 before layer 1's.
    with pytest.raises(grpc.RpcError) as info:
        node.sink.Deliver(iter(_stream(0, phase=pb.BACKWARD)), timeout=TIMEOUT_S)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


# -- pipelined passes ---------------------------------------------------------


def test_pipelined_layer_waits_for_the_layer_before_it_in_its_pass(node, dataset):
    # Layer 1 of pass 7 arrives first (the root sends it while the node computes layer 0).
    early = node.sink.Deliver.future(iter(edited(_stream(1), 0, pass_id=7)), timeout=TIMEOUT_S)
    with pytest.raises(grpc.FutureTimeoutError):
        early.result(timeout=0.5)  # it waits: computing it now would be out of order
    first = node.sink.Deliver(iter(edited(_stream(0), 0, pass_id=7)), timeout=TIMEOUT_S)
    assert first.num_targets == 0
    ack = early.result(timeout=TIMEOUT_S)
    assert ack.num_targets == 16
    assert ack.loss_sum == pytest.approx(_reference_loss_sum(dataset), rel=1e-6)


def test_pipelined_layer_of_another_pass_does_not_count(node):
    node.sink.Deliver(iter(edited(_stream(0), 0, pass_id=7)), timeout=TIMEOUT_S)
    # Pass 8 (a re-run of the step) has computed no layer 0: its layer 1 waits until its
    # deadline, and changes nothing.
    before = node.stub.Stats(pb.Empty(), timeout=TIMEOUT_S)
    with pytest.raises(grpc.RpcError) as info:
        node.sink.Deliver(iter(edited(_stream(1), 0, pass_id=8)), timeout=1.0)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert node.stub.Stats(pb.Empty(), timeout=TIMEOUT_S).flops == before.flops


@pytest.fixture
def gradient_calls(monkeypatch) -> dict[str, int]:
    """Gradient calls the SwarmX nodes and MemoryX answer, by method (servicers registered
    after this fixture count them)."""
    return count_servicer_calls(
        monkeypatch,
        {
            SwarmXServicer: ("Reduce", "ReducePass"),
            MemoryXServicer: ("PushGradients", "PushPass"),
        },
    )


@pytest.mark.parametrize("fanout", [2, 4])
def test_pipelined_passes_train_the_same_bits_as_one_layer_at_a_time(
    gradient_calls, dataset, fanout
):
    """Two layers of a step in flight at once, across the turn from forward to backward
    (as the coordinator runs a step), give the same weights, bit for bit, as one layer
    after the other; so do passes whose layers go to the compute nodes on one
    ``DeliverPass`` stream per node (fanout 2: the root feeds a relay and a node).
    A pipelined pass's gradients go up on one stream per link (``ReducePass``, and
    ``PushPass`` to MemoryX), but on pass streams a compute node's go in its answers to
    the layers; one layer at a time, one call per layer and link."""
    order = [(0, Phase.FORWARD), (1, Phase.FORWARD), (1, Phase.BACKWARD), (0, Phase.BACKWARD)]
    num_links = len(build_tree(3, fanout)) - 1 + 3  # every tree node's link up, but the root's
    weights = []
    for mode in ("one at a time", "pipelined", "pass streams"):
        for name in gradient_calls:
            gradient_calls[name] = 0
        cluster = build_cluster(
            _layers(_model()), dataset, num_nodes=3, batch_size=36, fanout=fanout
        )
        try:
            root = SwarmXClient(cluster.root_address, SECURITY)
            for step in range(2):
                pass_id = 0 if mode == "one at a time" else step + 1
                streams = mode == "pass streams"
                requests = [
                    LayerRequest(
                        layer,
                        step,
                        phase,
                        "float32",
                        pass_id=pass_id,
                        pass_position=position if streams else 0,
                        pass_length=len(order) if streams else 0,
                    )
                    for position, (layer, phase) in enumerate(order, start=1)
                ]
                if pass_id:
                    acks, pending = [], []
                    for request in requests:
                        if len(pending) == 2:
                            acks.append(pending.pop(0).result())
                        pending.append(root.start_layer(request, timeout_s=TIMEOUT_S))
                    acks += [p.result() for p in pending]
                else:
                    acks = [root.run_layer(r, timeout_s=TIMEOUT_S) for r in requests]
                assert [(a.layer, a.phase) for a in acks] == order
                assert all(a.num_nodes == 3 and a.update_applied for a in acks)
                assert sum(a.bytes_to_nodes for a in acks) == 2 * 3 * MODEL_BYTES
                assert sum(a.gradient_bytes for a in acks) == 3 * MODEL_BYTES
                MemoryXClient(cluster.memoryx_address, SECURITY).commit_step(step)
            weights.append(_memoryx_weights(cluster, 2))
        finally:
            cluster.stop()
        if mode == "one at a time":  # 2 steps of 2 backward layers
            want = {"Reduce": 4 * num_links, "ReducePass": 0, "PushGradients": 4, "PushPass": 0}
        elif mode == "pipelined":
            want = {"Reduce": 0, "ReducePass": 2 * num_links, "PushGradients": 0, "PushPass": 2}
        else:
            # Compute nodes below a SwarmX node that relays the pass (on its loop) answer
            # with their gradients; the root, sent the layers one RunLayer call at a time
            # here, has its compute-node children (fanout 4) stream theirs.
            streams = num_links - 3 + (3 if len(build_tree(3, fanout)) == 1 else 0)
            want = {"Reduce": 0, "ReducePass": 2 * streams, "PushGradients": 0, "PushPass": 2}
        assert gradient_calls == want, mode
    for other in weights[1:]:
        for one, two in zip(weights[0], other, strict=True):
            assert all(torch.equal(one[name], two[name]) for name in one)


def test_a_backward_layer_answers_while_the_next_one_computes(dataset):
    """A backward layer's answer (its gradient applied) does not wait for the node to finish
    the layer after it: the root starts streaming the next layer on that answer, so a node
    that held it back would sit idle between its backward layers."""
    cluster = build_cluster(_layers(_model()), dataset, num_nodes=1, batch_size=16)
    worker = cluster.nodes[0].worker
    computing, release = threading.Event(), threading.Event()
    backward = worker.backward

    def held_backward(layer, step, params):
        if layer == 0:
            computing.set()
            assert release.wait(2 * TIMEOUT_S)
        return backward(layer, step, params)

    worker.backward = held_backward
    try:
        root = SwarmXClient(cluster.root_address, SECURITY)
        order = [(0, Phase.FORWARD), (1, Phase.FORWARD), (1, Phase.BACKWARD), (0, Phase.BACKWARD)]
        pending = [
            root.start_layer(
                LayerRequest(layer, 0, phase, "float32", pass_id=5), timeout_s=TIMEOUT_S
            )
            for layer, phase in order
        ]
        assert computing.wait(TIMEOUT_S)
        try:
            last_layer = pending[2].result(timeout_s=TIMEOUT_S)  # layer 0 still computing
        finally:
            release.set()
        assert (last_layer.layer, last_layer.phase, last_layer.update_applied) == (
            1,
            Phase.BACKWARD,
            True,
        )
        assert [p.result(timeout_s=TIMEOUT_S).layer for p in pending] == [0, 1, 1, 0]
        assert cluster.node_stats()[0].gradient_bytes_sent == MODEL_BYTES
    finally:
        release.set()
        cluster.stop()


def _pass_stream(pass_id: int, layers: list[int]) -> list[pb.LayerMessage]:
    return [m for layer in layers for m in edited(_stream(layer), 0, pass_id=pass_id)]


def test_a_pass_stream_answers_each_layer_as_deliver_does(node, dataset):
    acks = list(node.sink.DeliverPass(iter(_pass_stream(7, [0, 1])), timeout=TIMEOUT_S))
    assert [(a.layer, a.phase) for a in acks] == [(0, pb.FORWARD), (1, pb.FORWARD)]
    assert acks[1].num_targets == 16
    assert acks[1].loss_sum == pytest.approx(_reference_loss_sum(dataset), rel=1e-6)
    stats = node.stub.Stats(pb.Empty(), timeout=TIMEOUT_S)
    assert stats.weight_bytes_received == MODEL_BYTES


@pytest.mark.parametrize(
    "case",
    ["no pass id", "two passes", "bad layer", "ends early"],
)
def test_bad_pass_stream_is_rejected(node, case):
    good = _pass_stream(7, [0, 1])
    messages = {
        "no pass id": _pass_stream(0, [0]),
        "two passes": [*edited(_stream(0), 0, pass_id=7), *edited(_stream(1), 0, pass_id=8)],
        "bad layer": [
            *edited(_stream(0), 0, pass_id=7),
            *edited(_stream(1, header_layer=2), 0, pass_id=7),
        ],
        "ends early": good[:-1],
    }[case]
    with pytest.raises(grpc.RpcError) as info:
        list(node.sink.DeliverPass(iter(messages), timeout=TIMEOUT_S))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, case


def test_a_pass_position_without_a_pass_is_rejected_by_the_root(dataset):
    cluster = build_cluster(_layers(_model()), dataset, num_nodes=2, batch_size=24)
    try:
        root = SwarmXClient(cluster.root_address, SECURITY)
        for request in (
            LayerRequest(0, 0, Phase.FORWARD, "float32", pass_position=1, pass_length=4),
            LayerRequest(0, 0, Phase.FORWARD, "float32", pass_id=3, pass_position=5, pass_length=4),
        ):
            with pytest.raises(grpc.RpcError) as info:
                root.run_layer(request, timeout_s=TIMEOUT_S)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        cluster.stop()


def test_a_pass_cancelled_while_a_layer_waits_ends_its_layers_and_the_node_serves_on(
    node, monkeypatch
):
    # Pass 8's layer 1 comes without its layer 0: it waits for its turn on a thread. The
    # client cancels the pass: the waiting layer gives up at once (it never computes),
    # and the next pass runs on the same node.
    ended = threading.Event()
    run_layer = node.servicer._run_layer

    def watched(*args, **kwargs):
        try:
            return run_layer(*args, **kwargs)
        finally:
            ended.set()

    monkeypatch.setattr(node.servicer, "_run_layer", watched)
    before = node.stub.Stats(pb.Empty(), timeout=TIMEOUT_S)
    stalled = node.sink.DeliverPass(iter(_pass_stream(8, [1])), timeout=TIMEOUT_S)
    assert not ended.wait(0.3)  # waiting for layer 0 of its pass
    stalled.cancel()
    with pytest.raises(grpc.RpcError) as info:
        list(stalled)
    assert info.value.code() == grpc.StatusCode.CANCELLED
    # Well before CANCEL_CHECK_S * a few: the call's end woke it.
    assert ended.wait(TIMEOUT_S / 4)
    assert node.stub.Stats(pb.Empty(), timeout=TIMEOUT_S).flops == before.flops
    acks = list(node.sink.DeliverPass(iter(_pass_stream(9, [0, 1])), timeout=TIMEOUT_S))
    assert [a.layer for a in acks] == [0, 1]
    assert node.stub.Stats(pb.Empty(), timeout=TIMEOUT_S).flops > before.flops


def test_a_pass_stream_answers_its_layers_in_pass_order_however_their_threads_run(
    node, monkeypatch
):
    # Layer 0's thread is held back after its compute, so layer 1 computes and is done
    # first: the answers still come in the pass's order.
    run_layer = node.servicer._run_layer

    def late_for_layer_0(header, *args, **kwargs):
        ack = run_layer(header, *args, **kwargs)
        if header.layer == 0:
            time.sleep(0.3)
        return ack

    monkeypatch.setattr(node.servicer, "_run_layer", late_for_layer_0)
    acks = list(node.sink.DeliverPass(iter(_pass_stream(7, [0, 1])), timeout=TIMEOUT_S))
    assert [(a.layer, a.phase) for a in acks] == [(0, pb.FORWARD), (1, pb.FORWARD)]
