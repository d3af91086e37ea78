"""A MemoryX server that holds a slice of the model on disk, over real gRPC on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from memoryx.checkpoint import write_manifest
from memoryx.config import MemoryXConfig
from memoryx.optim import Optimizer
from memoryx.service import MemoryXServicer, register
from memoryx.tiers import TieredStore
from proto import memoryx_pb2 as mpb
from proto import memoryx_pb2_grpc as mgrpc
from proto import tensor_pb2 as pb
from proto.rpc import Security, channel, start_server
from proto.serde import Expected, decode_layer, encode_layer, layout_of

CHUNK_BYTES = 1024
TIMEOUT_S = 20
FIRST = 3  # this server holds model layers 3 and 4
CONFIG = Optimizer.Config(name="adamw", lr=1e-2)
SECURITY = Security.generate()


def _layers() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [
        {"weight": torch.randn(16, 16, generator=gen), "bias": torch.randn(16, generator=gen)}
        for _ in range(2)
    ]


def _stream(layers, first: int, phase=pb.FORWARD, step: int = 0) -> Iterator[pb.LayerMessage]:
    for offset, tensors in enumerate(layers):
        yield from encode_layer(
            first + offset, step, phase, tensors, chunk_bytes=CHUNK_BYTES, sender="driver"
        )


@pytest.fixture
def server(tmp_path: Path):
    memoryx = MemoryXConfig(num_servers=2, ram_budget_bytes=10**6, spill_dir=str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    servicer = MemoryXServicer(
        CONFIG.build(),
        chunk_bytes=CHUNK_BYTES,
        checkpoint_dir=str(tmp_path / "checkpoints"),
        memoryx=memoryx,
        server=1,
    )
    grpc_server, address = start_server(
        lambda s: register(s, servicer), "127.0.0.1", security=SECURITY
    )
    stub = mgrpc.MemoryXStub(channel(address, SECURITY))
    yield servicer, stub
    grpc_server.stop(grace=None)
    if servicer.store is not None:
        servicer.store.close()


def _weights(stub, layer: int, step: int) -> dict[str, torch.Tensor]:
    stream = stub.StreamWeights(
        mpb.WeightsRequest(layer=layer, step=step, phase=pb.BACKWARD, dtype="float32"),
        timeout=TIMEOUT_S,
    )
    layout = layout_of(_layers()[0])  # every layer has this layout
    return decode_layer(stream, Expected(layer, step, pb.BACKWARD, layout, "float32"))


def test_a_slice_on_disk_trains_like_the_store_in_ram(server, tmp_path: Path) -> None:
    servicer, stub = server
    stub.LoadWeights(_stream(_layers(), FIRST), timeout=TIMEOUT_S)
    assert isinstance(servicer.store, TieredStore)
    assert list(servicer.store.layer_ids) == [3, 4]
    assert servicer.store.spill_dir.parent == tmp_path  # one directory per server and run
    layout = stub.Layout(pb.Empty(), timeout=TIMEOUT_S)
    assert len(layout.layers) == 2 and layout.step == 0
    gen = torch.Generator().manual_seed(7)
    grads = {n: torch.randn(t.shape, generator=gen) for n, t in _layers()[1].items()}
    assert _weights(stub, 4, 0)["weight"].shape == (16, 16)
    ack = stub.PushGradients(_stream([grads], 4, pb.BACKWARD), timeout=TIMEOUT_S)
    assert ack.update_applied
    expected = {n: t.clone() for n, t in _layers()[1].items()}
    optimizer = CONFIG.build()
    for name, param in expected.items():
        optimizer.update(param, grads[name], optimizer.init_state(param), 1)
    got = _weights(stub, 4, 1)
    for name in expected:
        assert torch.equal(got[name], expected[name])
    stats = stub.Stats(pb.Empty(), timeout=TIMEOUT_S)
    assert stats.state_bytes == 2 * (16 * 16 + 16) * 12
    assert stats.disk_written_bytes > stats.state_bytes  # loaded, then layer 4 updated
    assert 0 < stats.peak_resident_bytes <= 10**6
    assert stats.process_peak_rss_bytes > 0


def test_a_layer_of_another_server_is_refused(server) -> None:
    _, stub = server
    stub.LoadWeights(_stream(_layers(), FIRST), timeout=TIMEOUT_S)
    with pytest.raises(grpc.RpcError) as info:
        _weights(stub, 0, 0)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "MemoryX holds layers 3..4" in info.value.details()


def test_layers_out_of_order_are_refused(server) -> None:
    _, stub = server

    def gap() -> Iterator[pb.LayerMessage]:
        yield from _stream(_layers()[:1], FIRST)
        yield from _stream(_layers()[1:], FIRST + 2)

    with pytest.raises(grpc.RpcError) as info:
        stub.LoadWeights(gap(), timeout=TIMEOUT_S)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "got layer 5 at position 1" in info.value.details()


def test_save_checkpoint_writes_this_servers_part(server, tmp_path: Path) -> None:
    _, stub = server
    stub.LoadWeights(_stream(_layers(), FIRST), timeout=TIMEOUT_S)
    reply = stub.SaveCheckpoint(mpb.CheckpointRequest(), timeout=TIMEOUT_S)
    # The server chose the name, a directory inside its checkpoint directory.
    assert (reply.name, reply.step) == ("step-00000000", 0)
    directory = tmp_path / "checkpoints" / reply.name
    assert sorted(p.name for p in directory.iterdir()) == [
        "layer-00003-v00000000.safetensors",
        "layer-00004-v00000000.safetensors",
        "part-00003-00005.json",
    ]
    assert reply.num_bytes > 2 * (16 * 16 + 16) * 12
    # Layers 0..2 are another server's: the checkpoint is not whole without them.
    with pytest.raises(ValueError, match=r"cover layers \[3, 4\]"):
        write_manifest(directory, [directory / "part-00003-00005.json"], optimizer=CONFIG)
