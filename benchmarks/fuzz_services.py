"""Fuzz every gRPC service with mutated messages; count state changes and dead services.

An in-process cluster (MemoryX, a SwarmX root, two compute nodes, each on its
own loopback server with the run's token; no Ray) is loaded and trained one
step. Then, seeded, each call takes a valid request of one service method
(MemoryX, SwarmX and node), mutates it (a field set to an edge value, a
message of a stream dropped, repeated, moved or added, or the serialized
bytes flipped, cut or padded) and sends it with the run's token. After every
call the cluster's state is fingerprinted: MemoryX's weights, optimizer
state and versions, the SwarmX root's open reductions, the nodes' kept
activations and step. A call that was refused (any status but OK) must leave
it unchanged. A call that was accepted (the mutation left a valid request,
e.g. an EVAL pass with other weights bytes) may change it: those are counted
apart. At the end every service must answer Stats and a full training step
must still run.

    python benchmarks/fuzz_services.py                  # 10,000 calls, seed 0
    python benchmarks/fuzz_services.py --messages 500 --seed 1 --json out.json

This is a measurement script; ``tests/test_service_security.py`` runs the
same fuzzer on fewer messages in CI.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import io
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch
from torch import nn

from benchmarks.fuzz_mutations import mutate
from core.atomic import write_json_atomic
from core.data import DataConfig
from memoryx.optim import Optimizer
from memoryx.service import MemoryXServicer
from memoryx.service import register as register_memoryx
from nodes.cs2 import Cs2Backend
from nodes.service import ComputeNodeServicer
from nodes.service import serve as serve_node
from nodes.worker import NodeWorker
from proto import memoryx_pb2 as mpb
from proto import memoryx_pb2_grpc as mgrpc
from proto import node_pb2_grpc as ngrpc
from proto import shm
from proto import swarmx_pb2 as spb
from proto import swarmx_pb2_grpc as sgrpc
from proto import tensor_pb2 as pb
from proto.rpc import Security, channel, start_server
from proto.serde import encode_layer
from proto.shm import SharedMemoryPlan
from swarmx.service import SwarmXServicer
from swarmx.service import serve as serve_swarmx
from swarmx.tree import build_tree, node_name

CHUNK_BYTES = 1024  # the first layer's weight is several chunks
TIMEOUT_S = 30
FUZZ_TIMEOUT_S = 2  # per fuzzed call: a stalled one ends here
REDUCE_TIMEOUT_S = 0.5  # a reduce from one child of several (see Target.timeout_s)
# After a refused call, how long the services may take to drop what it opened (a SwarmX
# reduction waiting for siblings ends when gRPC tells the server the caller is gone).
SETTLE_S = 5.0
SEED = 3


def _layers(hidden: int = 16) -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Sequential(nn.Linear(64, hidden), nn.ReLU()), nn.Linear(hidden, 10)]


@dataclass
class Services:
    """MemoryX, the SwarmX tree and the compute nodes, each on its own loopback server."""

    security: Security
    memoryx: MemoryXServicer
    swarmx: dict[str, SwarmXServicer]
    nodes: list[ComputeNodeServicer]
    addresses: dict[str, str]  # "memoryx", SwarmX names, node names -> host:port
    root_name: str
    servers: list[grpc.Server] = field(default_factory=list)
    layers: list[nn.Module] = field(default_factory=list)

    @property
    def memoryx_stub(self) -> mgrpc.MemoryXStub:
        return mgrpc.MemoryXStub(channel(self.addresses["memoryx"], self.security))

    @property
    def root_stub(self) -> sgrpc.SwarmXStub:
        return sgrpc.SwarmXStub(channel(self.addresses[self.root_name], self.security))

    def load(self) -> None:
        def messages() -> Iterator[pb.LayerMessage]:
            for index, layer in enumerate(self.layers):
                tensors = {n: p.detach().float() for n, p in layer.named_parameters()}
                yield from encode_layer(
                    index, 0, pb.FORWARD, tensors, chunk_bytes=CHUNK_BYTES, sender="driver"
                )

        self.memoryx_stub.LoadWeights(messages(), timeout=TIMEOUT_S)

    def train_step(self, step: int) -> pb.LayerAck:
        run = lambda layer, phase: self.root_stub.RunLayer(  # noqa: E731
            spb.LayerRequest(layer=layer, step=step, phase=phase, dtype="float32"),
            timeout=TIMEOUT_S,
        )
        num_layers = len(self.layers)
        last = [run(layer, pb.FORWARD) for layer in range(num_layers)][-1]
        for layer in reversed(range(num_layers)):
            run(layer, pb.BACKWARD)
        self.memoryx_stub.CommitStep(mpb.StepRequest(step=step), timeout=TIMEOUT_S)
        return last

    def version(self) -> int:
        return self.memoryx.store.version(0)

    def stats_all(self, timeout_s: float = TIMEOUT_S) -> None:
        """Every service answers Stats (raises if one does not)."""
        self.memoryx_stub.Stats(pb.Empty(), timeout=timeout_s)
        for name in self.swarmx:
            sgrpc.SwarmXStub(channel(self.addresses[name], self.security)).Stats(
                pb.Empty(), timeout=timeout_s
            )
        for rank in range(len(self.nodes)):
            ngrpc.ComputeNodeStub(channel(self.addresses[node_name(rank)], self.security)).Stats(
                pb.Empty(), timeout=timeout_s
            )

    def fingerprint(self) -> dict[str, str]:
        """Per service, a digest or summary of the training state it holds.

        MemoryX: weights, optimizer state, versions and updates applied. SwarmX:
        the reductions that can still finish (a failed one, or one whose upstream
        call ended, is started afresh by the next attempt). Nodes: the step and the activations they keep.
        """
        buffer = io.BytesIO()
        torch.save(self.memoryx.store.state_dict(), buffer)
        parts = {
            "memoryx": hashlib.sha256(buffer.getvalue()).hexdigest()[:16]
            + f" updates={self.memoryx.traffic.num_updates}"
        }
        for name, servicer in sorted(self.swarmx.items()):
            with servicer._lock:
                open_keys = sorted(k for k, e in servicer._reducing.items() if e.live)
            parts[name] = f"open reductions {open_keys}"
        for servicer in self.nodes:
            worker = servicer.worker
            parts[servicer.name] = (
                f"step {worker._step} inputs {sorted(worker._held)} "
                f"activations {worker.activation_bytes} B weights {worker.weight_bytes_held} B"
            )
        return parts

    def stop(self) -> None:
        for server in self.servers:
            server.stop(grace=None)


def build_services(
    security: Security,
    *,
    num_nodes: int = 2,
    fanout: int = 2,
    checkpoint_dir: str | None = None,
    hidden: int = 16,
    chunk_bytes: int = CHUNK_BYTES,
) -> Services:
    """A loaded in-process cluster whose services all take ``security``'s token."""
    layers = _layers(hidden)
    dataset = DataConfig(name="digits").build(seed=SEED)
    servers: list[grpc.Server] = []

    def serve(register: Callable[[grpc.Server], None]) -> str:
        server, address = start_server(register, "127.0.0.1", security=security)
        servers.append(server)
        return address

    memoryx = MemoryXServicer(
        Optimizer.Config(name="sgd", lr=0.05, momentum=0.9).build(),
        chunk_bytes=chunk_bytes,
        checkpoint_dir=checkpoint_dir,
    )
    addresses = {"memoryx": serve(lambda s: register_memoryx(s, memoryx))}
    tree = build_tree(num_nodes, fanout)
    swarmx = {t.name: SwarmXServicer(t.name, security=security) for t in tree}
    for name, servicer in swarmx.items():
        server, addresses[name] = serve_swarmx(servicer, "127.0.0.1", security=security)
        servers.append(server)
    nodes = []
    for rank in range(num_nodes):
        worker = NodeWorker(
            rank=rank,
            num_nodes=num_nodes,
            layers=copy.deepcopy(layers),
            dataset=dataset,
            batch_size=16,
            seed=SEED,
            backend=Cs2Backend.Config().build(),
        )
        node = ComputeNodeServicer(
            worker, name=node_name(rank), security=security, chunk_bytes=chunk_bytes
        )
        nodes.append(node)
        server, addresses[node_name(rank)] = serve_node(node, "127.0.0.1", security=security)
        servers.append(server)
    for t in tree:
        swarmx[t.name].connect(
            children={c: addresses[c] for c in t.children},
            parent=addresses[t.parent] if t.parent else None,
            memoryx=None if t.parent else addresses["memoryx"],
        )
    parent_of = {c: t.name for t in tree for c in t.children}
    for rank, node in enumerate(nodes):
        node.connect(addresses[parent_of[node_name(rank)]])
    services = Services(security, memoryx, swarmx, nodes, addresses, tree[-1].name, servers, layers)
    services.load()
    return services


# -- valid requests to mutate ---------------------------------------------------


@dataclass(frozen=True)
class Target:
    service: str  # key of Services.addresses
    method: str  # full gRPC path
    request_streaming: bool
    response_streaming: bool
    messages: Callable[[Services], list]  # a valid request (one message, or a stream)
    # A valid request to a reduce waits for its siblings' gradients, which a fuzz never
    # sends, so it can only end at its deadline: a short one spares the run ~1.5 s each.
    timeout_s: float = FUZZ_TIMEOUT_S


def _weights_stream(services: Services, layer: int, step: int, phase: int, sender: str) -> list:
    tensors = services.memoryx.store.weights(layer, step)
    return list(encode_layer(layer, step, phase, tensors, chunk_bytes=CHUNK_BYTES, sender=sender))


def _pass_stream(services: Services, step: int, sender: str) -> list:
    """An evaluation pass of layer 0 on a ``DeliverPass`` stream (pass id 1).

    One layer: a stream of several is a sequence of requests, each checked whole before
    it computes, so a bad second layer is refused after the first one computed.
    """
    stream = _weights_stream(services, 0, step, pb.EVAL, sender)
    stream[0].header.pass_id = 1
    return stream


def _eval_pass(services: Services) -> list:
    """``SwarmX.RunPass`` requests of an evaluation pass over every layer (pass id 2)."""
    num_layers = len(services.layers)
    return [
        spb.LayerRequest(
            layer=layer,
            step=services.version(),
            phase=pb.EVAL,
            dtype="float32",
            pass_id=2,
            pass_position=layer + 1,
            pass_length=num_layers,
        )
        for layer in range(num_layers)
    ]


def _together(messages: list) -> list:
    """The requests in one message (``following``), as a pass nothing paces is sent."""
    first, *rest = messages
    first.following.extend(rest)
    return [first]


def _gradient_stream(services: Services, sender: str) -> list:
    """A gradient of the last step, already applied: valid, acknowledged, never applied again."""
    layer = len(services.layers) - 1
    step = services.version() - 1
    tensors = {n: torch.ones(shape) for n, shape in services.memoryx.store.layout(layer)}
    return list(
        encode_layer(layer, step, pb.BACKWARD, tensors, chunk_bytes=CHUNK_BYTES, sender=sender)
    )


def _gradient_pass_stream(services: Services, sender: str) -> list:
    """``_gradient_stream`` as the one layer of a gradient pass stream (pass id 1)."""
    stream = _gradient_stream(services, sender)
    stream[0].header.pass_id = 1
    return stream


def targets(services: Services) -> list[Target]:
    root, node = services.root_name, node_name(0)
    version = services.version
    return [
        Target(
            "memoryx",
            "/wafer.v1.MemoryX/StreamWeights",
            False,
            True,
            lambda s: [mpb.WeightsRequest(layer=0, step=version(), phase=pb.EVAL, dtype="float32")],
        ),
        Target(
            "memoryx",
            "/wafer.v1.MemoryX/PushGradients",
            True,
            False,
            lambda s: _gradient_stream(s, root),
        ),
        Target(
            "memoryx",
            "/wafer.v1.MemoryX/PushPass",
            True,
            True,
            lambda s: _gradient_pass_stream(s, root),
        ),
        Target(
            "memoryx",
            "/wafer.v1.MemoryX/CommitStep",
            False,
            False,
            lambda s: [mpb.StepRequest(step=version() - 1)],
        ),
        Target(
            "memoryx",
            "/wafer.v1.MemoryX/LoadWeights",
            True,
            False,
            lambda s: _weights_stream(s, 0, version(), pb.FORWARD, "driver"),
        ),
        Target(
            "memoryx",
            "/wafer.v1.MemoryX/StreamPass",
            True,
            True,
            lambda s: [
                mpb.WeightsRequest(layer=layer, step=version(), phase=pb.EVAL, dtype="float32")
                for layer in range(len(s.layers))
            ],
        ),
        Target(
            "memoryx",
            "/wafer.v1.MemoryX/StreamPass",
            True,
            True,
            lambda s: _together(
                [
                    mpb.WeightsRequest(layer=layer, step=version(), phase=pb.EVAL, dtype="float32")
                    for layer in range(len(s.layers))
                ]
            ),
        ),
        Target("memoryx", "/wafer.v1.MemoryX/Layout", False, False, lambda s: [pb.Empty()]),
        Target("memoryx", "/wafer.v1.MemoryX/Stats", False, False, lambda s: [pb.Empty()]),
        Target(
            root,
            "/wafer.v1.SwarmX/RunLayer",
            False,
            False,
            lambda s: [spb.LayerRequest(layer=1, step=version(), phase=pb.EVAL, dtype="float32")],
        ),
        Target(root, "/wafer.v1.SwarmX/RunPass", True, True, _eval_pass),
        Target(root, "/wafer.v1.SwarmX/RunPass", True, True, lambda s: _together(_eval_pass(s))),
        Target(
            root,
            "/wafer.v1.LayerSink/Deliver",
            True,
            False,
            lambda s: _weights_stream(s, 1, version(), pb.EVAL, "memoryx"),
        ),
        Target(
            root,
            "/wafer.v1.SwarmX/Reduce",
            True,
            False,
            lambda s: _gradient_stream(s, node),
            timeout_s=REDUCE_TIMEOUT_S,
        ),
        Target(
            root,
            "/wafer.v1.SwarmX/ReducePass",
            True,
            True,
            lambda s: _gradient_pass_stream(s, node),
            timeout_s=REDUCE_TIMEOUT_S,
        ),
        Target(root, "/wafer.v1.SwarmX/Stats", False, False, lambda s: [pb.Empty()]),
        Target(
            node,
            "/wafer.v1.LayerSink/Deliver",
            True,
            False,
            lambda s: _weights_stream(s, 0, version(), pb.EVAL, root),
        ),
        Target(
            node,
            "/wafer.v1.LayerSink/DeliverPass",
            True,
            True,
            lambda s: _pass_stream(s, version(), root),
        ),
        Target(node, "/wafer.v1.ComputeNode/Stats", False, False, lambda s: [pb.Empty()]),
    ]


def _send(services: Services, target: Target, payload: list[bytes]) -> grpc.StatusCode:
    ch = channel(services.addresses[target.service], services.security)
    kind = {
        (False, False): ch.unary_unary,
        (False, True): ch.unary_stream,
        (True, False): ch.stream_unary,
        (True, True): ch.stream_stream,
    }[(target.request_streaming, target.response_streaming)]
    call = kind(target.method)  # no (de)serializers: raw bytes both ways
    try:
        if target.request_streaming:
            result = call(iter(payload), timeout=target.timeout_s)
        else:
            if len(payload) != 1:
                return grpc.StatusCode.INVALID_ARGUMENT  # nothing sent: a unary call needs one
            result = call(payload[0], timeout=target.timeout_s)
        if target.response_streaming:
            list(result)
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        return exc.code()


@dataclass
class FuzzReport:
    num_calls: int = 0
    accepted: int = 0  # calls answered OK (the mutation left a valid request)
    accepted_state_changes: int = 0  # of those, calls that changed training state
    refused_state_changes: int = 0  # refused calls that changed state: must be 0
    # Calls the client gave up on (DEADLINE_EXCEEDED): the server may still have accepted them.
    timed_out_state_changes: int = 0
    codes: Counter = field(default_factory=Counter)
    mutations: Counter = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    unknown_errors: list[str] = field(default_factory=list)  # UNKNOWN: an unmapped server error
    services_alive: bool = False
    step_after_fuzz_ok: bool = False
    wall_s: float = 0.0

    def to_json(self) -> dict:
        return {
            "num_calls": self.num_calls,
            "accepted": self.accepted,
            "accepted_state_changes": self.accepted_state_changes,
            "refused_state_changes": self.refused_state_changes,
            "timed_out_state_changes": self.timed_out_state_changes,
            "mutations": dict(self.mutations.most_common()),
            "codes": {code.name: n for code, n in self.codes.most_common()},
            "violations": self.violations[:20],
            "unknown_errors": self.unknown_errors[:20],
            "services_alive": self.services_alive,
            "step_after_fuzz_ok": self.step_after_fuzz_ok,
            "wall_s": round(self.wall_s, 1),
        }


def fuzz(services: Services, *, num_calls: int, seed: int) -> FuzzReport:
    """Send ``num_calls`` mutated requests, spread over every service's methods."""
    rng = random.Random(seed)
    report = FuzzReport()
    started = time.perf_counter()
    all_targets = targets(services)
    before = services.fingerprint()
    for index in range(num_calls):
        target = all_targets[index % len(all_targets)]
        payload, how = mutate(rng, target.messages(services), target.request_streaming)
        code = _send(services, target, payload)
        after = services.fingerprint()
        if code != grpc.StatusCode.OK:
            # A call the client gave up on is cleaned up once the server sees the cancel,
            # which a loaded machine may take a while to deliver.
            timed_out = code == grpc.StatusCode.DEADLINE_EXCEEDED
            settle_until = time.monotonic() + SETTLE_S * (6 if timed_out else 1)
            while after != before and time.monotonic() < settle_until:
                time.sleep(0.02)
                after = services.fingerprint()
        report.num_calls += 1
        report.codes[code] += 1
        report.mutations[how.split()[0]] += 1
        if code == grpc.StatusCode.UNKNOWN:
            report.unknown_errors.append(f"call {index}: {target.method} ({how})")
        if code == grpc.StatusCode.OK:
            report.accepted += 1
            report.accepted_state_changes += int(after != before)
        elif after != before and code == grpc.StatusCode.DEADLINE_EXCEEDED:
            report.timed_out_state_changes += 1
        elif after != before:
            report.refused_state_changes += 1
            changed = {k: (before[k], v) for k, v in after.items() if before[k] != v}
            report.violations.append(
                f"call {index}: {target.method} ({how}) -> {code.name}: {changed}"
            )
        before = after
    try:
        services.stats_all(timeout_s=10)
        report.services_alive = True
        step = services.version()
        services.train_step(step)
        report.step_after_fuzz_ok = services.version() == step + 1
    except grpc.RpcError as exc:
        report.violations.append(f"after the fuzz: {exc.code().name} {exc.details()}")
    report.wall_s = time.perf_counter() - started
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10_000, help="mutated calls to send")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args(argv)
    # Shared memory on, as in a local run: references in chunks are checked, not just refused.
    plan = SharedMemoryPlan.generate(slot_bytes=CHUNK_BYTES, ring_bytes=0)
    services = build_services(Security.generate(shared_memory=plan))
    try:
        services.train_step(0)
        report = fuzz(services, num_calls=args.messages, seed=args.seed)
    finally:
        services.stop()
        shm.reset()
        shm.remove_run_segments(plan)
    result = report.to_json()
    for key, value in result.items():
        print(f"{key:24s} {value}")
    if args.json:
        write_json_atomic(args.json, result)
    ok = report.refused_state_changes == 0 and report.services_alive and report.step_after_fuzz_ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
