"""One compute node's gRPC service, driven directly over real gRPC on loopback: deliveries,
pass streams, their order, and the bad streams it refuses. No Ray."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
import torch.nn.functional as F

from core.data import BatchSampler, Dataset
from nodes import service as node_service
from nodes.cs2 import Cs2Backend
from nodes.service import ComputeNodeServicer
from nodes.service import serve as serve_node
from nodes.worker import NodeWorker
from proto import node_pb2_grpc as ngrpc
from proto import swarmx_pb2_grpc as sgrpc
from proto import tensor_pb2 as pb
from proto.rpc import channel
from proto.serde import encode_layer
from tests.nodes.in_process_cluster import (
    CHUNK_BYTES,
    SECURITY,
    SEED,
    TIMEOUT_S,
    layer_weights,
)
from tests.nodes.small_model import MODEL_BYTES, digits, nbytes, small_model, streamed_layers
from tests.proto.edits import edited


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    return digits()


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
        layers=streamed_layers(small_model()),
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
    tensors = kw.get("tensors", layer_weights(streamed_layers(small_model())[layer]))
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
    logits = small_model()(dataset.train_inputs[index])
    return F.cross_entropy(logits, dataset.train_targets[index], reduction="sum").item()


def _bad_layer1_streams() -> dict[str, list[pb.LayerMessage]]:
    good = _stream(1)
    w = layer_weights(streamed_layers(small_model())[1])
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
        "header total_bytes": edited(good, 0, total_bytes=nbytes(w) + 4),
        "chunk tensor_bytes": edited(good, 1, tensor_bytes=nbytes({"w": w["weight"]}) - 4),
        "unknown phase": _stream(1, phase=pb.PHASE_UNSPECIFIED),
        "missing header": good[1:],
        "ends early": good[:-1],
        "extra chunk": [*good, good[-1]],
        "empty": [],
    }


@pytest.mark.parametrize("case", list(_bad_layer1_streams()))
def test_bad_delivery_is_rejected_and_changes_nothing(node, dataset, case):
    first = node.sink.Deliver(iter(_stream(0)), timeout=TIMEOUT_S)
    assert first.num_nodes == 1 and first.bytes_to_nodes == nbytes(
        layer_weights(streamed_layers(small_model())[0])
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
    assert stats.weight_bytes_received == before.weight_bytes_received + MODEL_BYTES - nbytes(
        layer_weights(streamed_layers(small_model())[0])
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


def _pass_stream(pass_id: int, layers: list[int]) -> list[pb.LayerMessage]:
    return [m for layer in layers for m in edited(_stream(layer), 0, pass_id=pass_id)]


def _answers(messages) -> list[pb.LayerAck]:
    """Every answer of a pass stream's messages (a node answers the layers it computed at
    once in one message: ``LayerAck.following``)."""
    return [answer for message in messages for answer in (message, *message.following)]


def test_a_pass_stream_answers_each_layer_as_deliver_does(node, dataset):
    acks = _answers(node.sink.DeliverPass(iter(_pass_stream(7, [0, 1])), timeout=TIMEOUT_S))
    assert [(a.layer, a.phase) for a in acks] == [(0, pb.FORWARD), (1, pb.FORWARD)]
    assert acks[1].num_targets == 16
    assert acks[1].loss_sum == pytest.approx(_reference_loss_sum(dataset), rel=1e-6)
    stats = node.stub.Stats(pb.Empty(), timeout=TIMEOUT_S)
    assert stats.weight_bytes_received == MODEL_BYTES


def test_a_run_of_small_layers_in_one_message_is_answered_in_one_message(
    node, dataset, monkeypatch
):
    # As the root sends a pass of small layers: both layers in one bundle. Layers the
    # node computes on its loop (short ones, here whatever they take) complete at once,
    # and their answers go in one message (LayerAck.following), in pass order.
    monkeypatch.setattr(node_service, "INLINE_COMPUTE_MAX_S", float("inf"))
    one_message = [pb.LayerMessage(bundle=pb.LayerBundle(items=_pass_stream(11, [0, 1])))]
    _answers(node.sink.DeliverPass(iter(_pass_stream(10, [0, 1])), timeout=TIMEOUT_S))
    messages = list(node.sink.DeliverPass(iter(one_message), timeout=TIMEOUT_S))
    assert len(messages) == 1
    acks = _answers(messages)
    assert [(a.layer, a.phase) for a in acks] == [(0, pb.FORWARD), (1, pb.FORWARD)]
    assert acks[1].loss_sum == pytest.approx(_reference_loss_sum(dataset), rel=1e-6)


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
    acks = _answers(node.sink.DeliverPass(iter(_pass_stream(9, [0, 1])), timeout=TIMEOUT_S))
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
    acks = _answers(node.sink.DeliverPass(iter(_pass_stream(7, [0, 1])), timeout=TIMEOUT_S))
    assert [(a.layer, a.phase) for a in acks] == [(0, pb.FORWARD), (1, pb.FORWARD)]
