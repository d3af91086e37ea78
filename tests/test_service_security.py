"""Security of every gRPC service, in-process over real gRPC on loopback (no Ray).

The run token is checked on every method of MemoryX, SwarmX and the compute
nodes; a refused call changes nothing. TLS is forced on loopback. Streams are
capped and time out when idle, so stalled clients cannot starve Stats or
training. A seeded fuzz run sends mutated requests to every service.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from benchmarks.fuzz_services import Services, build_services, fuzz, targets
from proto import memoryx_pb2 as mpb
from proto import memoryx_pb2_grpc as mgrpc
from proto import node_pb2_grpc as ngrpc
from proto import shm
from proto import swarmx_pb2 as spb
from proto import swarmx_pb2_grpc as sgrpc
from proto import tensor_pb2 as pb
from proto.rpc import MAX_MESSAGE_BYTES, TOKEN_METADATA_KEY, Security, channel
from proto.serde import encode_layer
from proto.shm import SharedMemoryPlan
from proto.tls import generate_run_tls
from swarmx.tree import node_name

TIMEOUT_S = 30


@pytest.fixture(scope="module")
def services(tmp_path_factory) -> Iterator[Services]:
    checkpoints = tmp_path_factory.mktemp("checkpoints")
    cluster = build_services(Security.generate(), checkpoint_dir=str(checkpoints))
    cluster.train_step(0)
    yield cluster
    cluster.stop()


def _code(call) -> grpc.StatusCode:
    try:
        result = call()
        if hasattr(result, "__iter__") and not isinstance(result, bytes):
            list(result)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def _raw_call(ch: grpc.Channel, target, payload: list[bytes], metadata=None):
    kind = {
        (False, False): ch.unary_unary,
        (False, True): ch.unary_stream,
        (True, False): ch.stream_unary,
        (True, True): ch.stream_stream,
    }[(target.request_streaming, target.response_streaming)]
    call = kind(target.method)
    request = iter(payload) if target.request_streaming else payload[0]
    return lambda: call(request, timeout=TIMEOUT_S, metadata=metadata)


# The calls of the first measurement (issue 12): state-changing ones with hostile values.
_HOSTILE = {
    "/wafer.v1.MemoryX/ResetStats": [pb.Empty()],
    "/wafer.v1.MemoryX/CommitStep": [mpb.StepRequest(step=-5)],
    "/wafer.v1.MemoryX/StreamWeights": [mpb.WeightsRequest(layer=0, step=1, phase=77)],
    "/wafer.v1.MemoryX/SaveCheckpoint": [mpb.CheckpointRequest()],
    "/wafer.v1.SwarmX/ResetStats": [pb.Empty()],
    "/wafer.v1.ComputeNode/ResetStats": [pb.Empty()],
}


def _every_method(services: Services):
    """(service, target, valid request) for every method of every service."""
    from benchmarks.fuzz_services import Target

    cases = [(t.service, t, t.messages(services)) for t in targets(services)]
    for method, messages in _HOSTILE.items():
        service = {
            "MemoryX": "memoryx",
            "SwarmX": services.root_name,
            "ComputeNode": "node-0",
        }[method.split("/")[1].split(".")[-1]]
        cases.append((service, Target(service, method, False, "Stream" in method, None), messages))
    return cases


@pytest.mark.parametrize("token", ["none", "another run's", "empty", "not bearer"])
def test_every_service_refuses_calls_without_this_runs_token(services, token):
    before = services.fingerprint()
    stats_before = services.memoryx_stub.Stats(pb.Empty(), timeout=TIMEOUT_S)
    other = Security.generate()
    metadata = {
        "none": None,
        "another run's": [(TOKEN_METADATA_KEY, "Bearer " + other.token)],
        "empty": [(TOKEN_METADATA_KEY, "")],
        "not bearer": [(TOKEN_METADATA_KEY, services.security.token)],
    }[token]
    cases = _every_method(services)
    assert {service for service, _, _ in cases} == {"memoryx", services.root_name, "node-0"}
    assert len(cases) >= 17
    for service, target, messages in cases:
        # A bare channel: no interceptor adds this run's token.
        bare = grpc.insecure_channel(services.addresses[service])
        payload = [m.SerializeToString() for m in messages]
        code = _code(_raw_call(bare, target, payload, metadata))
        assert code == grpc.StatusCode.UNAUTHENTICATED, (target.method, token)
        bare.close()
    assert services.fingerprint() == before
    # ResetStats was refused too: the counters still count.
    assert services.memoryx_stub.Stats(pb.Empty(), timeout=TIMEOUT_S) == stats_before
    # SaveCheckpoint was refused: nothing written.
    assert list(Path(services.memoryx.checkpoint_dir).iterdir()) == []


def test_this_runs_token_is_accepted_and_never_shown(services):
    assert services.security.token not in repr(services.security)
    tls = generate_run_tls()
    assert "BEGIN" not in repr(Security.generate(tls=tls))
    services.stats_all()


def test_hostile_values_with_the_token_are_invalid_arguments(services):
    before = services.fingerprint()
    stub = services.memoryx_stub
    assert _code(lambda: stub.CommitStep(mpb.StepRequest(step=-5), timeout=TIMEOUT_S)) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    assert _code(lambda: stub.CommitStep(mpb.StepRequest(step=99), timeout=TIMEOUT_S)) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    for request in (
        mpb.WeightsRequest(layer=0, step=services.version(), phase=77, dtype="float32"),
        mpb.WeightsRequest(layer=0, step=-1, phase=pb.FORWARD, dtype="float32"),
        mpb.WeightsRequest(layer=0, step=services.version() + 1, phase=pb.FORWARD, dtype="float32"),
    ):
        assert _code(lambda r=request: stub.StreamWeights(r, timeout=TIMEOUT_S)) == (
            grpc.StatusCode.INVALID_ARGUMENT
        )
    for request in (
        spb.LayerRequest(layer=0, step=services.version(), phase=77, dtype="float32"),
        spb.LayerRequest(layer=0, step=-3, phase=pb.EVAL, dtype="float32"),
    ):
        assert _code(lambda r=request: services.root_stub.RunLayer(r, timeout=TIMEOUT_S)) == (
            grpc.StatusCode.INVALID_ARGUMENT
        )
    assert services.fingerprint() == before


def test_bytes_that_are_not_protobuf_are_invalid_arguments(services):
    before = services.fingerprint()
    ch = channel(services.addresses["memoryx"], services.security)
    garbage = b"\xff\xff\xff\x0f"
    commit = ch.unary_unary("/wafer.v1.MemoryX/CommitStep")
    push = ch.stream_unary("/wafer.v1.MemoryX/PushGradients")
    stream = ch.unary_stream("/wafer.v1.MemoryX/StreamWeights")
    for call in (
        lambda: commit(garbage, timeout=TIMEOUT_S),
        lambda: push(iter([garbage]), timeout=TIMEOUT_S),
        lambda: stream(garbage, timeout=TIMEOUT_S),
    ):
        assert _code(call) == grpc.StatusCode.INVALID_ARGUMENT
    assert services.fingerprint() == before


def test_a_message_over_the_size_cap_is_refused(services):
    huge = mpb.WeightsRequest(layer=0, step=0, phase=pb.EVAL, dtype="x" * (MAX_MESSAGE_BYTES + 1))
    code = _code(lambda: services.memoryx_stub.StreamWeights(huge, timeout=TIMEOUT_S))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


# -- TLS ---------------------------------------------------------------------------


def test_tls_forced_on_loopback_trains_and_refuses_plaintext_and_strangers():
    security = Security.generate(tls=generate_run_tls())
    cluster = build_services(security)
    try:
        ack = cluster.train_step(0)  # every hop (MemoryX, SwarmX, nodes) over TLS
        assert ack.num_nodes == 2 and cluster.version() == 1
        address = cluster.addresses["memoryx"]
        plain = grpc.insecure_channel(address)
        stats = mgrpc.MemoryXStub(plain).Stats
        metadata = [(TOKEN_METADATA_KEY, "Bearer " + security.token)]
        assert _code(lambda: stats(pb.Empty(), timeout=5, metadata=metadata)) == (
            grpc.StatusCode.UNAVAILABLE
        )
        plain.close()
        # Another run's CA: the server's certificate is not trusted.
        stranger = Security(token=security.token, tls=generate_run_tls())
        stub = mgrpc.MemoryXStub(channel(address, stranger))
        assert _code(lambda: stub.Stats(pb.Empty(), timeout=5)) == grpc.StatusCode.UNAVAILABLE
        # This run's CA but another run's token.
        impostor = Security(token=Security.generate().token, tls=security.tls)
        stub = mgrpc.MemoryXStub(channel(address, impostor))
        assert _code(lambda: stub.Stats(pb.Empty(), timeout=5)) == (grpc.StatusCode.UNAUTHENTICATED)
    finally:
        cluster.stop()


# -- bounded streams ----------------------------------------------------------------


class _Stall:
    """Request iterators that send a header and then wait until released."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def stream(self, services: Services) -> Iterator[pb.LayerMessage]:
        layer, step = 1, services.version()
        gradients = {n: torch.zeros(shape) for n, shape in services.memoryx.store.layout(layer)}
        messages = encode_layer(layer, step, pb.BACKWARD, gradients, sender=services.root_name)
        yield next(iter(messages))  # a valid header of the current step, then nothing
        self.release.wait()


def _open_stalled(stub_call, stall: _Stall, services: Services, n: int, **kw) -> list:
    return [stub_call.future(stall.stream(services), timeout=120, **kw) for _ in range(n)]


def test_forty_stalled_streams_starve_neither_stats_nor_training():
    cluster = build_services(Security.generate())
    stall = _Stall()
    try:
        cluster.train_step(0)
        push = cluster.memoryx_stub.PushGradients
        stalled = _open_stalled(push, stall, cluster, 40)
        # And forty that do not even hold the token.
        bare = mgrpc.MemoryXStub(grpc.insecure_channel(cluster.addresses["memoryx"]))
        strangers = _open_stalled(bare.PushGradients, stall, cluster, 40)
        # No wall-time assertion: a deadline that a starved pool (issue 12: 5 s) would miss.
        for _ in range(5):
            cluster.memoryx_stub.Stats(pb.Empty(), timeout=5)
        cluster.train_step(1)  # the training path still gets its streams
        assert cluster.version() == 2
        assert not any(call.done() for call in stalled)  # still open, still stalled
        for call in strangers:
            assert _code(call.result) == grpc.StatusCode.UNAUTHENTICATED
    finally:
        stall.release.set()
        cluster.stop()


def test_a_stalled_layer_stream_to_a_node_blocks_neither_its_stats_nor_training():
    # A client with the token sends a node a valid header and stalls: the node reads streams
    # before taking its compute lock, so its next layers (and Stats) go on meanwhile.
    cluster = build_services(Security.generate(stream_idle_s=60))
    release = threading.Event()
    node = node_name(0)

    def stalled_stream() -> Iterator[pb.LayerMessage]:
        step = cluster.version()
        weights = cluster.memoryx.store.weights(0, step)
        yield next(iter(encode_layer(0, step, pb.FORWARD, weights, sender=cluster.root_name)))
        release.wait()

    try:
        cluster.train_step(0)
        ch = channel(cluster.addresses[node], cluster.security)
        stalled = sgrpc.LayerSinkStub(ch).Deliver.future(stalled_stream(), timeout=120)
        # No wall-time assertion: deadlines that a node held by the stall (60 s) would miss.
        ngrpc.ComputeNodeStub(ch).Stats(pb.Empty(), timeout=5)
        cluster.train_step(1)  # every layer of step 1 is delivered to this node
        assert cluster.version() == 2
        assert not stalled.done()  # still open, still stalled
    finally:
        release.set()
        cluster.stop()


def test_streams_beyond_the_cap_are_refused_and_idle_ones_cancelled():
    cluster = build_services(Security.generate(max_streams=8, stream_idle_s=1.0))
    stall = _Stall()
    try:
        push = cluster.memoryx_stub.PushGradients
        stalled = _open_stalled(push, stall, cluster, 8)
        cluster.memoryx_stub.Stats(pb.Empty(), timeout=5)
        # The idle deadline ends each stalled stream and gives its slot back.
        for call in stalled:
            assert _code(call.result) == grpc.StatusCode.CANCELLED
        cluster.train_step(0)
        assert cluster.version() == 1
    finally:
        stall.release.set()
        cluster.stop()


def test_the_ninth_stream_over_a_cap_of_eight_is_resource_exhausted():
    cluster = build_services(Security.generate(max_streams=8, stream_idle_s=60))
    stall = _Stall()
    try:
        push = cluster.memoryx_stub.PushGradients
        stalled = _open_stalled(push, stall, cluster, 8)
        cluster.memoryx_stub.Stats(pb.Empty(), timeout=5)  # all 8 are admitted by now
        ninth = push.future(stall.stream(cluster), timeout=30)
        assert _code(ninth.result) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert all(not call.done() for call in stalled)
        cluster.memoryx_stub.Stats(pb.Empty(), timeout=5)  # unary calls keep their threads
    finally:
        stall.release.set()
        cluster.stop()


# -- fuzz ------------------------------------------------------------------------


@pytest.mark.parametrize("shared_memory", [False, True], ids=["bytes", "shared-memory"])
def test_fuzzed_messages_change_no_state_and_kill_no_service(shared_memory):
    # With shared memory on, a mutated chunk may name a segment, slot or generation: each is
    # checked (name of this run, bounds, seqlock) before anything is read.
    plan = SharedMemoryPlan.generate(slot_bytes=1024, ring_bytes=0)
    cluster = build_services(Security.generate(shared_memory=plan if shared_memory else None))
    try:
        cluster.train_step(0)
        report = fuzz(cluster, num_calls=600, seed=12)
    finally:
        cluster.stop()
        shm.reset()
        shm.remove_run_segments(plan)
    summary = report.to_json()
    assert report.num_calls == 600
    assert report.refused_state_changes == 0, report.violations
    assert report.unknown_errors == [], summary  # every refusal is a mapped status
    assert report.services_alive and report.step_after_fuzz_ok, summary
    # The fuzz reached the services' validation, not only the parser; a message that is not
    # protobuf is an INVALID_ARGUMENT too, never gRPC's INTERNAL.
    assert report.codes[grpc.StatusCode.INVALID_ARGUMENT] > 50, summary
    assert grpc.StatusCode.INTERNAL not in report.codes, summary
    assert report.accepted < report.num_calls
