"""MemoryX over gRPC with sparsity: sparse weight streams, masked-value gradients, RigL flag."""

from __future__ import annotations

import grpc
import pytest
import torch

from memoryx.optim import Optimizer
from memoryx.service import MemoryXServicer, register
from memoryx.sparsity import Sparsity, UpdateSchedule
from proto import memoryx_pb2 as mpb
from proto import memoryx_pb2_grpc as mgrpc
from proto import tensor_pb2 as pb
from proto.rpc import Security, channel, start_server
from proto.serde import Expected, LayerAssembler, encode_layer, layout_of

# This module's run credentials (token only: loopback).
SECURITY = Security.generate()

TIMEOUT_S = 20


def _model() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [{"weight": torch.randn(32, 24, generator=gen), "bias": torch.randn(32, generator=gen)}]


@pytest.fixture
def service(request):
    sparsity = request.param
    servicer = MemoryXServicer(Optimizer.Config(name="sgd", lr=0.1).build(), sparsity=sparsity)
    server, address = start_server(lambda s: register(s, servicer), "127.0.0.1", security=SECURITY)
    stub = mgrpc.MemoryXStub(channel(address, SECURITY))
    stub.LoadWeights(encode_layer(0, 0, pb.FORWARD, _model()[0], sender="driver"))
    yield stub
    server.stop(grace=None)


def _stream(stub, step: int, phase: int) -> tuple[pb.LayerHeader, LayerAssembler]:
    messages = list(
        stub.StreamWeights(
            mpb.WeightsRequest(layer=0, step=step, phase=phase, dtype="float32"),
            timeout=TIMEOUT_S,
        )
    )
    assembler = LayerAssembler(
        Expected(0, step, phase, layout_of(_model()[0]), "float32", sparse=True)
    )
    for message in messages:
        assembler.add(message)
    assembler.finish()
    return messages[0].header, assembler


STATIC = Sparsity.Config(sparsity=0.9)
RIGL = Sparsity.Config(
    algorithm="rigl", sparsity=0.9, update=UpdateSchedule.Config(freq=2, start=0, stop=10)
)


@pytest.mark.parametrize("service", [STATIC], indirect=True)
def test_weights_stream_sparse_and_gradients_come_as_masked_values(service):
    header, assembler = _stream(service, 0, pb.BACKWARD)
    mask = assembler.masks["weight"]
    assert not header.dense_gradients
    assert assembler.payload_bytes < 0.25 * (32 * 24 + 32) * 4
    assert service.Layout(pb.Empty()).layers[0].num_kept == int((~mask).sum()) + 32
    grads = {"weight": torch.ones(32, 24), "bias": torch.ones(32)}
    dense = list(encode_layer(0, 0, pb.BACKWARD, grads, sender="swarmx-0-0"))
    with pytest.raises(grpc.RpcError) as info:
        service.PushGradients(iter(dense), timeout=TIMEOUT_S)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    sparse = encode_layer(0, 0, pb.BACKWARD, grads, masked_values={"weight": mask}, sender="s")
    assert service.PushGradients(sparse, timeout=TIMEOUT_S).update_applied
    _, after = _stream(service, 1, pb.FORWARD)
    weight = after._tensors["weight"]
    assert torch.count_nonzero(weight[mask]) == 0 and torch.equal(after.masks["weight"], mask)


@pytest.mark.parametrize("service", [RIGL], indirect=True)
def test_rigl_update_steps_ask_for_dense_gradients(service):
    header, assembler = _stream(service, 0, pb.BACKWARD)
    assert header.dense_gradients
    grads = {"weight": torch.randn(32, 24), "bias": torch.randn(32)}
    dense = encode_layer(0, 0, pb.BACKWARD, grads, sender="swarmx-0-0")
    assert service.PushGradients(dense, timeout=TIMEOUT_S).update_applied
    service.CommitStep(mpb.StepRequest(step=0))
    header, after = _stream(service, 1, pb.BACKWARD)
    assert not header.dense_gradients  # step 1 is no update step
    assert not torch.equal(after.masks["weight"], assembler.masks["weight"])
