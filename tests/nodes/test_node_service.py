"""Compute nodes in an in-process cluster over real gRPC on loopback.

The cluster is MemoryX <- SwarmX tree <- compute nodes, each component a
servicer on its own loopback server, wired with ``.connect`` as
``emulator/launch.py`` wires the Ray actors. No Ray. One node driven alone:
``test_node_alone.py``.
"""

from __future__ import annotations

import threading

import grpc
import pytest
import torch
import torch.nn.functional as F

from core.data import BatchSampler, Dataset
from memoryx.service import MemoryXServicer
from proto import swarmx_pb2_grpc as sgrpc
from proto import tensor_pb2 as pb
from proto.clients import MemoryXClient, NodeClient, SwarmXClient
from proto.domain import LayerAck, LayerRequest, NodeStats, Phase
from proto.rpc import channel
from proto.serde import encode_layer
from swarmx.service import SwarmXServicer
from swarmx.tree import build_tree
from tests.nodes.in_process_cluster import (
    LR,
    SECURITY,
    SEED,
    TIMEOUT_S,
    InProcessCluster,
    build_cluster,
    layer_weights,
)
from tests.nodes.small_model import MODEL_BYTES, digits, small_model, streamed_layers
from tests.servicer_calls import count_servicer_calls


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    return digits()


def _reference_steps(dataset: Dataset, batch_size: int, num_steps: int):
    """Plain torch: the same model, the same global batches, torch.optim.SGD."""
    model = small_model()
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
    return [layer_weights(layer) for layer in streamed_layers(model)], losses


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
        streamed_layers(small_model()),
        dataset,
        num_nodes=num_nodes,
        batch_size=batch_size,
        fanout=fanout,
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
        cluster = build_cluster(streamed_layers(small_model()), dataset, num_nodes=2, batch_size=24)
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
    cluster = build_cluster(streamed_layers(small_model()), dataset, num_nodes=2, batch_size=24)
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
        streamed_layers(small_model()), dataset, num_nodes=2, batch_size=24, precision="bf16"
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
    cluster = build_cluster(streamed_layers(small_model()), dataset, num_nodes=2, batch_size=24)
    try:
        for layer in range(2):
            cluster.run_layer(layer, 0, pb.FORWARD)
        # node-1 loses its activations: it runs layer 0's forward again, on its own.
        stream = encode_layer(0, 0, pb.FORWARD, layer_weights(streamed_layers(small_model())[0]))
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
            streamed_layers(small_model()), dataset, num_nodes=3, batch_size=36, fanout=fanout
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
        elif mode == "pipelined":  # (the root keeps its PushPass stream for the next pass)
            want = {"Reduce": 0, "ReducePass": 2 * num_links, "PushGradients": 0, "PushPass": 1}
        else:
            # Compute nodes below a SwarmX node that relays the pass (on its loop) answer
            # with their gradients; the root, sent the layers one RunLayer call at a time
            # here, has its compute-node children (fanout 4) stream theirs.
            streams = num_links - 3 + (3 if len(build_tree(3, fanout)) == 1 else 0)
            want = {"Reduce": 0, "ReducePass": 2 * streams, "PushGradients": 0, "PushPass": 1}
        assert gradient_calls == want, mode
    for other in weights[1:]:
        for one, two in zip(weights[0], other, strict=True):
            assert all(torch.equal(one[name], two[name]) for name in one)


def test_a_backward_layer_answers_while_the_next_one_computes(dataset):
    """A backward layer's answer (its gradient applied) does not wait for the node to finish
    the layer after it: the root starts streaming the next layer on that answer, so a node
    that held it back would sit idle between its backward layers."""
    cluster = build_cluster(streamed_layers(small_model()), dataset, num_nodes=1, batch_size=16)
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


def test_a_pass_position_without_a_pass_is_rejected_by_the_root(dataset):
    cluster = build_cluster(streamed_layers(small_model()), dataset, num_nodes=2, batch_size=24)
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
