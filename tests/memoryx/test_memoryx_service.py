"""MemoryX gRPC service over real gRPC on loopback: load, stream, update, reject, commit, save."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import grpc
import pytest
import torch

from memoryx.optim import Optimizer
from memoryx.service import MemoryXServicer, register
from proto import memoryx_pb2 as mpb
from proto import memoryx_pb2_grpc as mgrpc
from proto import tensor_pb2 as pb
from proto.clients import MemoryXClient
from proto.domain import Phase, TrafficStats
from proto.rpc import Security, channel, start_server
from proto.serde import Expected, decode_layer, encode_layer, layout_of
from tests.proto.edits import edited

# This module's run credentials (token only: loopback).
SECURITY = Security.generate()

LR = 0.1
CHUNK_BYTES = 1024  # layer 0's weight is several chunks
TIMEOUT_S = 20


def _model(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        {"0.weight": torch.randn(20, 30, generator=gen), "0.bias": torch.randn(20, generator=gen)},
        {"weight": torch.randn(5, 20, generator=gen), "bias": torch.randn(5, generator=gen)},
    ]


MODEL_BYTES = sum(t.numel() * 4 for layer in _model() for t in layer.values())


def _grads(layer: int, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + 10 * seed + layer)
    return {name: torch.randn(t.shape, generator=gen) for name, t in _model()[layer].items()}


def _sgd(weights: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]):
    return {name: w.clone().add_(grads[name], alpha=-LR) for name, w in weights.items()}


class MemoryX:
    """A MemoryX servicer on its own loopback server, with a stub and small helpers."""

    def __init__(self, checkpoint_dir: str | None = None, resume: str | None = None):
        optimizer = Optimizer.Config(name="sgd", lr=LR, momentum=0.0).build()
        self.servicer = MemoryXServicer(
            optimizer, chunk_bytes=CHUNK_BYTES, checkpoint_dir=checkpoint_dir, resume=resume
        )
        self.server, self.address = start_server(
            lambda server: register(server, self.servicer), "127.0.0.1", security=SECURITY
        )
        self.stub = mgrpc.MemoryXStub(channel(self.address, SECURITY))

    def load(self, layers=None, step: int = 0) -> None:
        layers = _model() if layers is None else layers

        def messages() -> Iterator[pb.LayerMessage]:
            for index, tensors in enumerate(layers):
                yield from encode_layer(
                    index, step, pb.FORWARD, tensors, chunk_bytes=CHUNK_BYTES, sender="driver"
                )

        self.stub.LoadWeights(messages(), timeout=TIMEOUT_S)

    def weights(
        self, layer: int, step: int, dtype: str = "float32", *, commit_before: int = 0
    ) -> dict[str, torch.Tensor]:
        stream = self.stub.StreamWeights(
            mpb.WeightsRequest(
                layer=layer, step=step, phase=pb.FORWARD, dtype=dtype, commit_before=commit_before
            ),
            timeout=TIMEOUT_S,
        )
        layout = layout_of(_model()[layer])
        return decode_layer(stream, Expected(layer, step, pb.FORWARD, layout, dtype))

    def push(self, messages) -> pb.LayerAck:
        return self.stub.PushGradients(iter(messages), timeout=TIMEOUT_S)

    def stats(self) -> pb.TrafficStats:
        stats = self.stub.Stats(pb.Empty(), timeout=TIMEOUT_S)
        stats.update_seconds = 0.0  # wall time; compared separately
        stats.process_peak_rss_bytes = 0  # the process's, grows with anything it does
        return stats

    def stop(self) -> None:
        self.server.stop(grace=None)


@pytest.fixture
def memoryx(tmp_path) -> Iterator[MemoryX]:
    (tmp_path / "checkpoints").mkdir()
    service = MemoryX(checkpoint_dir=str(tmp_path / "checkpoints"))
    yield service
    service.stop()


@pytest.fixture
def loaded(memoryx) -> MemoryX:
    memoryx.load()
    return memoryx


def _gradient_stream(layer: int, step: int, grads=None, **kw) -> list[pb.LayerMessage]:
    grads = _grads(layer) if grads is None else grads
    return list(
        encode_layer(
            kw.get("header_layer", layer),
            step,
            kw.get("phase", pb.BACKWARD),
            grads,
            dtype=kw.get("dtype", "float32"),
            chunk_bytes=kw.get("chunk_bytes", CHUNK_BYTES),
            sender="swarmx-0-0",
        )
    )


def _assert_weights_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype
        assert torch.equal(a[name], b[name]), name


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


# -- loading and streaming ----------------------------------------------------


def test_stream_weights_returns_loaded_weights_fp32(loaded):
    for layer, tensors in enumerate(_model()):
        _assert_weights_equal(loaded.weights(layer, 0), tensors)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_stream_weights_in_half_precision(loaded, dtype):
    wire = getattr(torch, dtype)
    for layer, tensors in enumerate(_model()):
        _assert_weights_equal(
            loaded.weights(layer, 0, dtype), {n: t.to(wire) for n, t in tensors.items()}
        )


def test_stream_weights_chunks_and_egress(loaded):
    stream = list(
        loaded.stub.StreamWeights(
            mpb.WeightsRequest(layer=0, step=0, phase=pb.FORWARD, dtype="float32"),
            timeout=TIMEOUT_S,
        )
    )
    header = stream[0].header
    assert (header.layer, header.step, header.sender) == (0, 0, "memoryx")
    chunks = [m.chunk for m in stream[1:]]
    assert len(chunks) > 2 and all(len(c.data) <= CHUNK_BYTES for c in chunks)
    stats = loaded.stats()
    layer0 = sum(t.numel() * 4 for t in _model()[0].values())
    assert stats.egress_bytes == layer0 and stats.num_weight_streams == 1
    loaded.weights(1, 0, "bfloat16")
    layer1_bf16 = sum(t.numel() * 2 for t in _model()[1].values())
    assert loaded.stats().egress_bytes == layer0 + layer1_bf16


def test_layout_reports_names_shapes_and_step(memoryx):
    memoryx.load(step=3)
    reply = memoryx.stub.Layout(pb.Empty(), timeout=TIMEOUT_S)
    assert reply.step == 3
    assert [[(t.name, tuple(t.shape)) for t in layer.tensors] for layer in reply.layers] == [
        layout_of(layer) for layer in _model()
    ]


def test_nothing_loaded_is_failed_precondition(memoryx):
    assert _code(lambda: memoryx.weights(0, 0)) == grpc.StatusCode.FAILED_PRECONDITION
    assert (
        _code(lambda: memoryx.push(_gradient_stream(0, 0))) == grpc.StatusCode.FAILED_PRECONDITION
    )
    assert (
        _code(lambda: memoryx.stub.CommitStep(mpb.StepRequest(step=0), timeout=TIMEOUT_S))
        == grpc.StatusCode.FAILED_PRECONDITION
    )


def test_second_load_is_refused(loaded):
    assert _code(lambda: loaded.load(_model(seed=5))) == grpc.StatusCode.FAILED_PRECONDITION
    _assert_weights_equal(loaded.weights(0, 0), _model()[0])


def test_load_rejects_layers_out_of_order(memoryx):
    layers = _model()
    messages = list(encode_layer(1, 0, pb.FORWARD, layers[1])) + list(
        encode_layer(0, 0, pb.FORWARD, layers[0])
    )
    code = _code(lambda: memoryx.stub.LoadWeights(iter(messages), timeout=TIMEOUT_S))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    memoryx.load()  # nothing was kept
    _assert_weights_equal(memoryx.weights(1, 0), layers[1])


def test_load_rejects_empty_stream(memoryx):
    code = _code(lambda: memoryx.stub.LoadWeights(iter([]), timeout=TIMEOUT_S))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    memoryx.load()
    _assert_weights_equal(memoryx.weights(0, 0), _model()[0])


def test_load_rejects_corrupt_stream(memoryx):
    messages = list(encode_layer(0, 0, pb.FORWARD, _model()[0], chunk_bytes=CHUNK_BYTES))
    del messages[2]  # a chunk in the middle of the weight
    code = _code(lambda: memoryx.stub.LoadWeights(iter(messages), timeout=TIMEOUT_S))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert memoryx.servicer.store is None


def test_stream_weights_rejects_bad_requests(loaded):
    def stream(**kw):
        request = dict(layer=0, step=0, phase=pb.FORWARD, dtype="float32") | kw
        return list(loaded.stub.StreamWeights(mpb.WeightsRequest(**request), timeout=TIMEOUT_S))

    assert _code(lambda: stream(layer=2)) == grpc.StatusCode.INVALID_ARGUMENT
    assert _code(lambda: stream(layer=-1)) == grpc.StatusCode.INVALID_ARGUMENT
    assert _code(lambda: stream(dtype="float64")) == grpc.StatusCode.INVALID_ARGUMENT
    # Negative or beyond the layer's version: a bad argument, not a version to wait for.
    assert _code(lambda: stream(step=1)) == grpc.StatusCode.INVALID_ARGUMENT
    assert _code(lambda: stream(step=-1)) == grpc.StatusCode.INVALID_ARGUMENT
    assert _code(lambda: stream(phase=77)) == grpc.StatusCode.INVALID_ARGUMENT
    assert _code(lambda: stream(phase=pb.PHASE_UNSPECIFIED)) == grpc.StatusCode.INVALID_ARGUMENT
    stats = loaded.stats()
    assert stats.egress_bytes == 0 and stats.num_weight_streams == 0


# -- gradients ----------------------------------------------------------------


def test_push_gradients_applies_sgd_exactly(loaded):
    before = [loaded.weights(layer, 0) for layer in range(2)]
    for layer in (1, 0):
        ack = loaded.push(_gradient_stream(layer, 0))
        assert ack.update_applied
        assert (ack.layer, ack.step, ack.phase) == (layer, 0, pb.BACKWARD)
    for layer in range(2):
        _assert_weights_equal(loaded.weights(layer, 1), _sgd(before[layer], _grads(layer)))
        # Version 0 stays available (unchanged) until the step is committed.
        _assert_weights_equal(loaded.weights(layer, 0), before[layer])
    stats = loaded.stats()
    assert stats.ingress_bytes == MODEL_BYTES
    assert stats.num_gradient_streams == 2 and stats.num_updates == 2
    assert stats.num_duplicate_gradients == 0


def test_two_steps_in_a_row(loaded):
    weights = [loaded.weights(layer, 0) for layer in range(2)]
    for step in range(2):
        for layer in (1, 0):
            grads = _grads(layer, seed=step)
            assert loaded.push(_gradient_stream(layer, step, grads)).update_applied
            weights[layer] = _sgd(weights[layer], grads)
        loaded.stub.CommitStep(mpb.StepRequest(step=step), timeout=TIMEOUT_S)
    for layer in range(2):
        _assert_weights_equal(loaded.weights(layer, 2), weights[layer])


def _bad_streams() -> dict[str, list[pb.LayerMessage]]:
    """Gradient streams for layer 0 at step 0 that MemoryX must refuse."""
    good = _gradient_stream(0, 0)

    transposed = {"0.weight": _grads(0)["0.weight"].t().contiguous(), "0.bias": _grads(0)["0.bias"]}
    return {
        "layer out of range": _gradient_stream(0, 0, header_layer=2),
        "other layer's header": edited(good, 0, layer=1),
        "chunk of another layer": edited(good, 2, layer=1),
        "step ahead": _gradient_stream(0, 1),
        "step far ahead": _gradient_stream(0, 7),
        "step before the first": _gradient_stream(0, -1),
        "chunk of another step": edited(good, 3, step=1),
        "wrong shape": _gradient_stream(0, 0, transposed),
        "wrong shape in one chunk": edited(good, 2, shape=[30, 20]),
        "bfloat16": _gradient_stream(0, 0, dtype="bfloat16"),
        "float16 chunk": edited(good, 1, dtype="float16"),
        "header total_bytes": edited(good, 0, total_bytes=MODEL_BYTES),
        "header num_tensors": edited(good, 0, num_tensors=3),
        "chunk tensor_bytes": edited(good, 1, tensor_bytes=20 * 30 * 4 + 4),
        "forward phase": _gradient_stream(0, 0, phase=pb.FORWARD),
        "missing header": good[1:],
        "two headers": [good[0], *good],
        "ends early": good[:-1],
        "chunk missing": good[:2] + good[3:],
        "chunk repeated": good[:3] + good[2:],
        "extra chunk": [*good, good[-1]],
        "wrong tensor name": edited(good, 1, name="0.bias"),
        "empty": [],
    }


@pytest.mark.parametrize("case", list(_bad_streams()))
def test_bad_gradient_stream_is_rejected_and_changes_nothing(loaded, case):
    weights_before = [loaded.weights(layer, 0) for layer in range(2)]
    stats_before = loaded.stats()
    code = _code(lambda: loaded.push(_bad_streams()[case]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, case
    assert loaded.stats() == stats_before
    for layer in range(2):
        _assert_weights_equal(loaded.weights(layer, 0), weights_before[layer])
        # No update happened, so step 1 is beyond the layer's version.
        assert _code(lambda layer=layer: loaded.weights(layer, 1)) == (
            grpc.StatusCode.INVALID_ARGUMENT
        )
    # A correct stream still applies, exactly once.
    assert loaded.push(_gradient_stream(0, 0)).update_applied
    _assert_weights_equal(loaded.weights(0, 1), _sgd(weights_before[0], _grads(0)))
    stats = loaded.stats()
    assert stats.num_updates == 1 and stats.num_gradient_streams == 1
    assert stats.ingress_bytes == sum(t.numel() * 4 for t in _model()[0].values())


def test_bad_stream_after_an_update_changes_nothing(loaded):
    assert loaded.push(_gradient_stream(1, 0)).update_applied
    updated = loaded.weights(1, 1)
    stats = loaded.stats()
    bad = _gradient_stream(1, 0, {"weight": torch.zeros(5, 20), "bias": torch.zeros(6)})
    assert _code(lambda: loaded.push(bad)) == grpc.StatusCode.INVALID_ARGUMENT
    assert loaded.stats() == stats
    _assert_weights_equal(loaded.weights(1, 1), updated)


def test_gradient_of_a_step_before_the_loaded_one_is_rejected(memoryx):
    memoryx.load(step=3)
    code = _code(lambda: memoryx.push(_gradient_stream(0, 2)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert memoryx.stats().num_gradient_streams == 0
    assert memoryx.push(_gradient_stream(0, 3)).update_applied


def test_duplicate_push_is_acknowledged_but_not_applied(loaded):
    assert loaded.push(_gradient_stream(1, 0)).update_applied
    updated = loaded.weights(1, 1)
    stats = loaded.stats()
    ack = loaded.push(_gradient_stream(1, 0, _grads(1, seed=7)))
    assert not ack.update_applied
    assert (ack.layer, ack.step) == (1, 0)
    _assert_weights_equal(loaded.weights(1, 1), updated)
    after = loaded.stats()
    assert after.num_updates == stats.num_updates
    assert after.num_duplicate_gradients == stats.num_duplicate_gradients + 1
    # Still a duplicate after the step is committed.
    assert loaded.push(_gradient_stream(0, 0)).update_applied
    loaded.stub.CommitStep(mpb.StepRequest(step=0), timeout=TIMEOUT_S)
    assert not loaded.push(_gradient_stream(1, 0)).update_applied
    _assert_weights_equal(loaded.weights(1, 1), updated)


# -- commit and checkpoints ---------------------------------------------------


def test_commit_requires_every_layer_and_drops_old_version(loaded):
    assert loaded.push(_gradient_stream(1, 0)).update_applied
    commit = lambda step: loaded.stub.CommitStep(mpb.StepRequest(step=step), timeout=TIMEOUT_S)  # noqa: E731
    assert _code(lambda: commit(0)) == grpc.StatusCode.FAILED_PRECONDITION
    _assert_weights_equal(loaded.weights(1, 0), _model()[1])  # commit failed: nothing dropped
    assert loaded.push(_gradient_stream(0, 0)).update_applied
    commit(0)
    commit(0)  # again: a no-op
    for layer in range(2):
        assert _code(lambda layer=layer: loaded.weights(layer, 0)) == (
            grpc.StatusCode.FAILED_PRECONDITION
        )
        _assert_weights_equal(loaded.weights(layer, 1), _sgd(_model()[layer], _grads(layer)))
    # Step 1 has not run: beyond the current version. Nor does a negative step exist.
    assert _code(lambda: commit(1)) == grpc.StatusCode.INVALID_ARGUMENT
    assert _code(lambda: commit(-1)) == grpc.StatusCode.INVALID_ARGUMENT
    assert _code(lambda: loaded.weights(0, 1, commit_before=-1)) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )


def test_a_request_of_a_pass_commits_the_steps_before_it(loaded):
    """``commit_before``: the driver's next training pass says the step before has ended;
    MemoryX commits it as it serves the pass's first layer (no CommitStep round trip)."""
    for layer in (1, 0):
        assert loaded.push(_gradient_stream(layer, 0)).update_applied
    _assert_weights_equal(loaded.weights(0, 0), _model()[0])  # step 0 not committed yet
    updated = _sgd(_model()[0], _grads(0))
    _assert_weights_equal(loaded.weights(0, 1, commit_before=1), updated)
    for layer in range(2):  # committed: step 0's weights are gone
        assert _code(lambda layer=layer: loaded.weights(layer, 0)) == (
            grpc.StatusCode.FAILED_PRECONDITION
        )
    _assert_weights_equal(loaded.weights(1, 1, commit_before=1), _sgd(_model()[1], _grads(1)))


def test_a_request_cannot_commit_a_step_that_has_not_ended(loaded):
    assert loaded.push(_gradient_stream(1, 0)).update_applied  # layer 0 has not taken step 0
    code = _code(lambda: loaded.weights(1, 1, commit_before=1))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    _assert_weights_equal(loaded.weights(0, 0), _model()[0])  # nothing dropped


def test_a_gradient_s_answer_carries_the_counters_once_it_is_taken(loaded):
    """What a step's MemoryX figures come from, without a call of their own."""
    first = loaded.push(_gradient_stream(1, 0))
    second = loaded.push(_gradient_stream(0, 0))
    assert first.HasField("memoryx") and second.HasField("memoryx")
    assert (first.memoryx.num_updates, second.memoryx.num_updates) == (1, 2)
    layer_bytes = [sum(t.numel() * 4 for t in layer.values()) for layer in _model()]
    assert first.memoryx.ingress_bytes == layer_bytes[1]
    assert second.memoryx.ingress_bytes == sum(layer_bytes)
    assert second.memoryx.ingress_bytes == loaded.stats().ingress_bytes
    # The store's sizes (a sum over every tensor it holds) stay out of them.
    assert second.memoryx.state_bytes == 0 and loaded.stats().state_bytes > 0


def test_save_checkpoint_writes_a_file_that_restores(loaded, tmp_path):
    for layer in (1, 0):
        loaded.push(_gradient_stream(layer, 0))
    directory = tmp_path / "checkpoints"
    save = lambda: loaded.stub.SaveCheckpoint(mpb.CheckpointRequest(), timeout=TIMEOUT_S)  # noqa: E731
    # Step 0 is in flight (not committed): the checkpoint holds the state before it,
    # so that a run that fails mid-step still keeps its committed work.
    first = save()
    assert first.step == 0 and first.name == "step-00000000.pt"
    before = MemoryX(checkpoint_dir=str(directory), resume=first.name)
    try:
        assert before.stub.Layout(pb.Empty(), timeout=TIMEOUT_S).step == 0
        for layer in range(2):
            _assert_weights_equal(before.weights(layer, 0), loaded.weights(layer, 0))
    finally:
        before.stop()
    (directory / first.name).unlink()
    loaded.stub.CommitStep(mpb.StepRequest(step=0), timeout=TIMEOUT_S)
    reply = save()
    # The server chose the name, inside its checkpoint directory.
    assert [p.name for p in directory.iterdir()] == [reply.name] == ["step-00000001.pt"]
    path = directory / reply.name
    assert reply.step == 1
    assert reply.num_bytes == path.stat().st_size > MODEL_BYTES
    restored = MemoryX(checkpoint_dir=str(directory), resume=reply.name)
    try:
        assert restored.stub.Layout(pb.Empty(), timeout=TIMEOUT_S).step == 1
        for layer in range(2):
            _assert_weights_equal(restored.weights(layer, 1), loaded.weights(layer, 1))
    finally:
        restored.stop()


# The store's gauges in TrafficStats: what it holds, not traffic, so ResetStats keeps them.
GAUGES = ("state_bytes", "resident_bytes", "peak_resident_bytes", "process_peak_rss_bytes")


def test_reset_stats(loaded):
    loaded.weights(0, 0)
    loaded.push(_gradient_stream(0, 0))
    assert loaded.stats().egress_bytes > 0
    loaded.stub.ResetStats(pb.Empty(), timeout=TIMEOUT_S)
    stats = loaded.stats()
    # The store's gauges (what it holds, its peak, disk totals) are not traffic: they stay.
    assert stats.state_bytes > 0 and stats.peak_resident_bytes >= stats.resident_bytes > 0
    for gauge in GAUGES:
        stats.ClearField(gauge)
    assert stats == pb.TrafficStats()


# -- the typed client ---------------------------------------------------------


def test_client_drives_memoryx_with_domain_types(memoryx, tmp_path):
    """What the coordinator does, through ``MemoryXClient``: same answers as the raw stubs."""
    client = MemoryXClient(memoryx.address, SECURITY)
    client.load_weights(_model(), step=0, chunk_bytes=CHUNK_BYTES)
    layout = client.layout()
    assert layout.step == 0
    assert [layer.spec for layer in layout.layers] == [layout_of(layer) for layer in _model()]
    assert [layer.num_kept for layer in layout.layers] == [
        sum(t.numel() for t in layer.values()) for layer in _model()
    ]
    for index, layer in enumerate(layout.layers):
        tensors, masks = client.fetch_layer(index, 0, layer.spec, phase=Phase.FORWARD)
        _assert_weights_equal(tensors, _model()[index])
        assert masks == {}  # a dense model
    for layer in (1, 0):
        assert memoryx.push(_gradient_stream(layer, 0)).update_applied
    client.commit_step(0)
    info = client.save_checkpoint()
    assert (info.name, info.step) == ("step-00000001.pt", 1)
    assert info.num_bytes == (tmp_path / "checkpoints" / info.name).stat().st_size
    stats = client.stats()
    assert isinstance(stats, TrafficStats)
    assert (stats.egress_bytes, stats.ingress_bytes, stats.num_updates) == (
        MODEL_BYTES,
        MODEL_BYTES,
        2,
    )
    client.reset_stats()
    gauges = {g: 0 for g in GAUGES}
    assert dataclasses.replace(client.stats(), **gauges) == TrafficStats()


# -- passes -------------------------------------------------------------------


def test_a_pass_run_again_sends_gradients_of_a_step_behind_a_later_one(loaded):
    """A pass of two steps that failed after both were applied runs again from its first:
    MemoryX takes (and ignores) step 0's gradients at version 2 while step 0 is not
    committed; once it is, they are refused."""
    for step in (0, 1):
        for layer in (1, 0):
            assert loaded.push(_gradient_stream(layer, step)).update_applied
    updated = loaded.weights(1, 2)
    ack = loaded.push(_gradient_stream(1, 0, _grads(1, seed=7)))
    assert not ack.update_applied
    _assert_weights_equal(loaded.weights(1, 2), updated)
    assert loaded.stats().num_duplicate_gradients == 1
    loaded.stub.CommitStep(mpb.StepRequest(step=1), timeout=TIMEOUT_S)
    assert _code(lambda: loaded.push(_gradient_stream(1, 0))) == grpc.StatusCode.INVALID_ARGUMENT
    assert not loaded.push(_gradient_stream(1, 1)).update_applied  # the step before: as before
