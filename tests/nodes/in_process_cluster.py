"""An in-process cluster for the node service tests: MemoryX, the SwarmX tree and compute
nodes, each servicer on its own loopback gRPC server, wired with ``.connect`` as
``emulator/launch.py`` wires the Ray actors. No Ray."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import torch
from torch import nn

from core.data import Dataset
from memoryx.optim import Optimizer
from memoryx.service import MemoryXServicer
from memoryx.service import register as register_memoryx
from nodes.cs2 import Cs2Backend
from nodes.service import ComputeNodeServicer
from nodes.service import serve as serve_node
from nodes.worker import NodeWorker
from proto import memoryx_pb2 as mpb
from proto import memoryx_pb2_grpc as mgrpc
from proto import node_pb2 as npb
from proto import node_pb2_grpc as ngrpc
from proto import swarmx_pb2 as spb
from proto import swarmx_pb2_grpc as sgrpc
from proto import tensor_pb2 as pb
from proto.rpc import Security, channel, start_server
from proto.serde import encode_layer
from swarmx.service import SwarmXServicer
from swarmx.service import serve as serve_swarmx
from swarmx.tree import build_tree, node_name

# The run credentials of the tests that use this cluster (token only: loopback).
SECURITY = Security.generate()

LR = 0.1
SEED = 3
CHUNK_BYTES = 1024  # the first layer's weight is several chunks
TIMEOUT_S = 30


def layer_weights(layer: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in layer.named_parameters()}


@dataclass
class InProcessCluster:
    memoryx: MemoryXServicer
    memoryx_stub: mgrpc.MemoryXStub
    swarmx: dict[str, SwarmXServicer]
    root: sgrpc.SwarmXStub
    nodes: list[ComputeNodeServicer]
    node_stubs: list[ngrpc.ComputeNodeStub]
    node_addresses: list[str]
    servers: list[grpc.Server] = field(default_factory=list)
    memoryx_address: str = ""
    root_address: str = ""

    def run_layer(self, layer: int, step: int, phase: int, dtype: str = "float32") -> pb.LayerAck:
        return self.root.RunLayer(
            spb.LayerRequest(layer=layer, step=step, phase=phase, dtype=dtype), timeout=TIMEOUT_S
        )

    def train_step(self, step: int, num_layers: int = 2) -> tuple[pb.LayerAck, list[pb.LayerAck]]:
        forward = [self.run_layer(layer, step, pb.FORWARD) for layer in range(num_layers)]
        backward = [
            self.run_layer(layer, step, pb.BACKWARD) for layer in reversed(range(num_layers))
        ]
        self.memoryx_stub.CommitStep(mpb.StepRequest(step=step), timeout=TIMEOUT_S)
        return forward[-1], forward + backward

    def stats(self) -> pb.TrafficStats:
        return self.memoryx_stub.Stats(pb.Empty(), timeout=TIMEOUT_S)

    def node_stats(self) -> list[npb.NodeStats]:
        return [stub.Stats(pb.Empty(), timeout=TIMEOUT_S) for stub in self.node_stubs]

    def stop(self) -> None:
        for server in self.servers:
            server.stop(grace=None)


def build_cluster(
    layers: list[nn.Module],
    dataset: Dataset,
    *,
    num_nodes: int,
    batch_size: int,
    fanout: int = 4,
    precision: str = "fp32",
) -> InProcessCluster:
    """MemoryX, the SwarmX tree and ``num_nodes`` compute nodes, loaded with ``layers``."""
    servers: list[grpc.Server] = []

    def serve(register) -> str:
        server, address = start_server(register, "127.0.0.1", security=SECURITY)
        servers.append(server)
        return address

    memoryx = MemoryXServicer(
        Optimizer.Config(name="sgd", lr=LR, momentum=0.0).build(), chunk_bytes=CHUNK_BYTES
    )
    memoryx_address = serve(lambda s: register_memoryx(s, memoryx))
    tree = build_tree(num_nodes, fanout)
    swarmx = {t.name: SwarmXServicer(t.name, security=SECURITY) for t in tree}
    swarmx_addresses = {}
    for name, servicer in swarmx.items():
        server, swarmx_addresses[name] = serve_swarmx(servicer, "127.0.0.1", security=SECURITY)
        servers.append(server)
    nodes = []
    for rank in range(num_nodes):
        worker = NodeWorker(
            rank=rank,
            num_nodes=num_nodes,
            layers=copy.deepcopy(layers),  # the worker strips its copy of the weights
            dataset=dataset,
            batch_size=batch_size,
            seed=SEED,
            backend=Cs2Backend.Config(precision=precision).build(),
        )
        nodes.append(
            ComputeNodeServicer(
                worker, name=node_name(rank), security=SECURITY, chunk_bytes=CHUNK_BYTES
            )
        )
    node_addresses = []
    for node in nodes:
        server, address = serve_node(node, "127.0.0.1", security=SECURITY)
        servers.append(server)
        node_addresses.append(address)
    # Wiring, as emulator/launch.py does it.
    by_name = {**swarmx_addresses, **{node_name(r): a for r, a in enumerate(node_addresses)}}
    for t in tree:
        swarmx[t.name].connect(
            children={c: by_name[c] for c in t.children},
            parent=swarmx_addresses[t.parent] if t.parent else None,
            memoryx=None if t.parent else memoryx_address,
        )
    parent_of = {c: t.name for t in tree for c in t.children}
    for rank, node in enumerate(nodes):
        node.connect(swarmx_addresses[parent_of[node_name(rank)]])
    cluster = InProcessCluster(
        memoryx=memoryx,
        memoryx_stub=mgrpc.MemoryXStub(channel(memoryx_address, SECURITY)),
        swarmx=swarmx,
        root=sgrpc.SwarmXStub(channel(swarmx_addresses[tree[-1].name], SECURITY)),
        nodes=nodes,
        node_stubs=[ngrpc.ComputeNodeStub(channel(a, SECURITY)) for a in node_addresses],
        node_addresses=node_addresses,
        servers=servers,
        memoryx_address=memoryx_address,
        root_address=swarmx_addresses[tree[-1].name],
    )

    def messages() -> Iterator[pb.LayerMessage]:
        for index, layer in enumerate(layers):
            yield from encode_layer(
                index, 0, pb.FORWARD, layer_weights(layer), chunk_bytes=CHUNK_BYTES, sender="driver"
            )

    try:
        cluster.memoryx_stub.LoadWeights(messages(), timeout=TIMEOUT_S)
    except BaseException:
        cluster.stop()
        raise
    return cluster
