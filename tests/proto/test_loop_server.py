"""Servers on the process's event loop (``proto.loop_server``), over real gRPC on loopback:
the same guard as the sync servers (token, stream cap, idle streams, unparsable requests),
the health service, and the context a call's threads see."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from proto import tensor_pb2 as pb
from proto.loop_server import (
    IDLE_DETAILS,
    SyncOnLoop,
    ThreadSideContext,
    _FedRequests,
    loop_errors,
    on_thread,
    start_loop_server,
)
from proto.loop_streams import process_loop
from proto.rpc import Security, StepConflict, channel, is_cancelled, rpc_errors

_SERVICE = "test.Echo"
_TIMEOUT_S = 10.0


class _Echo:
    """Stream: echoes every request; Unary: answers the request; Held: reads one request,
    then waits for ``release`` (a thread) before answering it; Fails: a mapped error."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.ended = threading.Event()
        self.thread_saw: list = []

    async def Stream(self, requests, context):
        async for request in requests:
            yield request

    async def Unary(self, request, context):
        return request

    async def Held(self, requests, context):
        async for request in requests:
            call = ThreadSideContext(context)
            call.add_callback(self.ended.set)
            self.thread_saw.append(call.is_active())
            await on_thread(self.release.wait, _TIMEOUT_S, name="held")
            self.thread_saw.append(call.is_active())
            return request
        return pb.Empty()

    @loop_errors
    async def Fails(self, request, context):
        await on_thread(_conflict, name="fails")


def _conflict() -> None:
    raise StepConflict("version 3 is gone")


def _register(echo, *, methods=("Stream", "Unary", "Held", "Fails"), wrap=lambda server: server):
    """Registers ``echo``'s ``methods`` (on what ``wrap`` makes of the server: ``SyncOnLoop``
    for a sync echo)."""
    kinds = {
        "Stream": grpc.stream_stream_rpc_method_handler,
        "Unary": grpc.unary_unary_rpc_method_handler,
        "Held": grpc.stream_unary_rpc_method_handler,
        "Fails": grpc.unary_unary_rpc_method_handler,
    }

    def register(server) -> None:
        codec = {
            "request_deserializer": pb.Empty.FromString,
            "response_serializer": pb.Empty.SerializeToString,
        }
        handlers = {name: kinds[name](getattr(echo, name), **codec) for name in methods}
        wrap(server).add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(_SERVICE, handlers),)
        )

    return register


@pytest.fixture
def started():
    """Starts a loop server for an ``_Echo`` with a run's security: (echo, address, security)."""
    servers = []
    echoes = []

    def start(**security_kw):
        security = Security.generate(**security_kw)
        echo = _Echo()
        server, address = start_loop_server(_register(echo), "127.0.0.1", security=security)
        servers.append(server)
        echoes.append(echo)
        return echo, address, security

    yield start
    for echo in echoes:
        echo.release.set()
    for server in servers:
        assert server.stop(grace=None).wait(_TIMEOUT_S)


def _method(ch: grpc.Channel, name: str, kind: str):
    return getattr(ch, kind)(
        f"/{_SERVICE}/{name}",
        request_serializer=pb.Empty.SerializeToString,
        response_deserializer=pb.Empty.FromString,
    )


def _code(fn) -> grpc.StatusCode:
    try:
        fn()
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_calls_with_the_token_are_served_and_without_it_refused(started):
    _, address, security = started()
    ch = channel(address, security)
    assert _method(ch, "Unary", "unary_unary")(pb.Empty(), timeout=_TIMEOUT_S) == pb.Empty()
    echoed = list(
        _method(ch, "Stream", "stream_stream")(iter([pb.Empty()] * 3), timeout=_TIMEOUT_S)
    )
    assert len(echoed) == 3
    bare = grpc.insecure_channel(address)
    unary = _method(bare, "Unary", "unary_unary")
    assert _code(lambda: unary(pb.Empty(), timeout=_TIMEOUT_S)) == grpc.StatusCode.UNAUTHENTICATED
    stream = _method(bare, "Stream", "stream_stream")
    assert _code(lambda: list(stream(iter([pb.Empty()]), timeout=_TIMEOUT_S))) == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    wrong = channel(address, Security.generate())
    assert _code(
        lambda: _method(wrong, "Unary", "unary_unary")(pb.Empty(), timeout=_TIMEOUT_S)
    ) == (grpc.StatusCode.UNAUTHENTICATED)


def test_the_health_service_answers_behind_the_token(started):
    _, address, security = started()
    request = health_pb2.HealthCheckRequest(service="")
    answer = health_pb2_grpc.HealthStub(channel(address, security)).Check(
        request, timeout=_TIMEOUT_S
    )
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    bare = health_pb2_grpc.HealthStub(grpc.insecure_channel(address))
    assert _code(lambda: bare.Check(request, timeout=_TIMEOUT_S)) == grpc.StatusCode.UNAUTHENTICATED


def test_a_request_that_is_not_protobuf_is_an_invalid_argument(started):
    _, address, security = started()
    ch = channel(address, security)
    garbage = b"\xff\xff\xff"
    raw_unary = ch.unary_unary(f"/{_SERVICE}/Unary")
    raw_stream = ch.stream_stream(f"/{_SERVICE}/Stream")
    assert _code(lambda: raw_unary(garbage, timeout=_TIMEOUT_S)) == grpc.StatusCode.INVALID_ARGUMENT
    # In a stream the servicer's errors decide; an unmapped WireError is the servicer's bug,
    # here UNKNOWN: what matters is that the call ends and the server lives on.
    assert (
        _code(lambda: list(raw_stream(iter([garbage]), timeout=_TIMEOUT_S))) != grpc.StatusCode.OK
    )
    assert _method(ch, "Unary", "unary_unary")(pb.Empty(), timeout=_TIMEOUT_S) == pb.Empty()


def test_a_mapped_error_on_a_thread_keeps_its_status(started):
    _, address, security = started()
    fails = _method(channel(address, security), "Fails", "unary_unary")
    with pytest.raises(grpc.RpcError) as caught:
        fails(pb.Empty(), timeout=_TIMEOUT_S)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "version 3 is gone" in caught.value.details()


def _stalled(release: threading.Event):
    yield pb.Empty()
    release.wait(_TIMEOUT_S)


def test_streams_beyond_the_cap_are_refused_and_an_idle_one_is_cancelled(started):
    _, address, security = started(max_streams=2, stream_idle_s=0.6)
    ch = channel(address, security)
    stream = _method(ch, "Stream", "stream_stream")
    release = threading.Event()
    try:
        held = [stream(_stalled(release), timeout=_TIMEOUT_S) for _ in range(2)]
        for call in held:  # both admitted: their first request is echoed
            assert next(call) == pb.Empty()
        third = stream(_stalled(release), timeout=_TIMEOUT_S)
        assert _code(lambda: list(third)) == grpc.StatusCode.RESOURCE_EXHAUSTED
        # Unary calls take no stream slot.
        assert _method(ch, "Unary", "unary_unary")(pb.Empty(), timeout=_TIMEOUT_S) == pb.Empty()
        # The idle deadline ends the stalled streams with CANCELLED (not at their deadline)...
        started_s = time.monotonic()
        for call in held:
            with pytest.raises(grpc.RpcError) as caught:
                list(call)
            assert caught.value.code() == grpc.StatusCode.CANCELLED
            assert caught.value.details() == IDLE_DETAILS
        assert time.monotonic() - started_s < _TIMEOUT_S / 2
        # ...and gives their slots back.
        assert len(list(stream(iter([pb.Empty()] * 2), timeout=_TIMEOUT_S))) == 2
    finally:
        release.set()


def test_a_client_that_cancels_ends_the_context_its_threads_see(started):
    echo, address, security = started()
    held = _method(channel(address, security), "Held", "stream_unary")
    release = threading.Event()
    call = held.future(_stalled(release), timeout=_TIMEOUT_S)
    try:
        deadline = time.monotonic() + _TIMEOUT_S
        while not echo.thread_saw and time.monotonic() < deadline:
            time.sleep(0.01)
        assert echo.thread_saw == [True]
        call.cancel()
        assert echo.ended.wait(_TIMEOUT_S)  # the callbacks ran at the call's end
    finally:
        release.set()
        echo.release.set()


def test_the_thread_side_context_runs_callbacks_once_and_refuses_late_ones():
    class _Context:
        def __init__(self):
            self.done = []

        def time_remaining(self):
            return 5.0

        def add_done_callback(self, callback):
            self.done.append(callback)

    context = _Context()
    call = ThreadSideContext(context)
    runs = []
    assert call.is_active() and 4.0 < call.time_remaining() <= 5.0
    assert call.add_callback(lambda: runs.append(1))
    for callback in context.done:
        callback(context)
    call.end()  # the handler giving up after the call's end runs nothing twice
    assert runs == [1] and not call.is_active()
    assert not call.add_callback(lambda: runs.append(2))
    assert runs == [1]


def test_a_sync_handler_is_refused_by_a_loop_server():
    def sync(request, context):
        return request

    def register(server) -> None:
        handler = grpc.unary_unary_rpc_method_handler(
            sync,
            request_deserializer=pb.Empty.FromString,
            response_serializer=pb.Empty.SerializeToString,
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(_SERVICE, {"Unary": handler}),)
        )

    security = Security.generate()
    server, address = start_loop_server(register, "127.0.0.1", security=security)
    try:
        unary = _method(channel(address, security), "Unary", "unary_unary")
        assert _code(lambda: unary(pb.Empty(), timeout=_TIMEOUT_S)) != grpc.StatusCode.OK
    finally:
        server.stop(grace=None).wait(_TIMEOUT_S)


def test_a_loop_server_stops_from_any_thread():
    security = Security.generate()
    server, address = start_loop_server(_register(_Echo()), "127.0.0.1", security=security)
    assert server.stop(grace=None).wait(_TIMEOUT_S)
    unary = _method(channel(address, security), "Unary", "unary_unary")
    assert _code(lambda: unary(pb.Empty(), timeout=2)) == grpc.StatusCode.UNAVAILABLE
    asyncio.run(asyncio.sleep(0))  # an unrelated loop in this thread is unaffected


# -- sync servicers on a loop server (SyncOnLoop) ------------------------------------------


class _SyncEcho:
    """A servicer written for threads, as SwarmX's is."""

    def __init__(self) -> None:
        self.ended = threading.Event()
        self.stream_error: list[BaseException] = []
        self.stream_over: list[bool] = []
        self.thread_names: list[str] = []

    def Stream(self, requests, context):
        self.thread_names.append(threading.current_thread().name)
        context.add_callback(self.ended.set)
        try:
            yield from requests
        except grpc.RpcError as exc:
            self.stream_error.append(exc)
        finally:
            self.stream_over.append(True)

    @rpc_errors
    def Unary(self, request, context):
        if not context.is_active() or context.time_remaining() is None:
            raise AssertionError("a live call with a deadline")
        raise StepConflict("version 3 is gone")


@pytest.fixture
def sync_echo():
    security = Security.generate()
    echo = _SyncEcho()
    server, address = start_loop_server(
        _register(echo, methods=("Stream", "Unary"), wrap=SyncOnLoop),
        "127.0.0.1",
        security=security,
    )
    yield echo, channel(address, security)
    server.stop(grace=None).wait(_TIMEOUT_S)


def test_a_sync_servicer_runs_on_threads_behind_a_loop_server(sync_echo):
    echo, ch = sync_echo
    stream = _method(ch, "Stream", "stream_stream")
    assert len(list(stream(iter([pb.Empty()] * 40), timeout=_TIMEOUT_S))) == 40
    assert echo.thread_names and "loop" not in echo.thread_names[0]
    assert echo.ended.wait(_TIMEOUT_S)  # its callbacks ran at the call's end
    # The sync handler's abort (rpc_errors) keeps its status and details.
    with pytest.raises(grpc.RpcError) as caught:
        _method(ch, "Unary", "unary_unary")(pb.Empty(), timeout=_TIMEOUT_S)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert caught.value.details() == "version 3 is gone"


def test_a_cancelled_call_ends_a_sync_handlers_requests_and_its_context(sync_echo):
    echo, ch = sync_echo
    release = threading.Event()
    call = _method(ch, "Stream", "stream_stream")(_stalled(release), timeout=_TIMEOUT_S)
    try:
        assert next(call) == pb.Empty()
        started_s = time.monotonic()
        call.cancel()
        # The handler's callbacks run and its thread stops reading, long before the
        # call's deadline: its request iterator ends (or raises a cancelled RpcError).
        assert echo.ended.wait(_TIMEOUT_S / 2)
        deadline = time.monotonic() + _TIMEOUT_S / 2
        while not echo.stream_over and time.monotonic() < deadline:
            time.sleep(0.01)
        assert echo.stream_over == [True]
        assert all(is_cancelled(e) for e in echo.stream_error)
        assert time.monotonic() - started_s < _TIMEOUT_S / 2
    finally:
        release.set()


def test_requests_are_read_ahead_at_most_depth_for_a_sync_handler():
    loop = process_loop()
    pulled = []

    async def source():
        for i in range(100):
            pulled.append(i)
            yield i

    class _Live:
        def cancelled(self) -> bool:
            return False

    fed = _FedRequests(loop, depth=4)
    feeding = asyncio.run_coroutine_threadsafe(fed.feed(source(), _Live()), loop)
    time.sleep(0.2)
    assert len(pulled) <= 5  # 4 queued, and the one whose append filled the queue
    assert next(fed) == 0
    time.sleep(0.2)
    assert len(pulled) <= 6
    assert list(fed) == list(range(1, 100))
    feeding.result(_TIMEOUT_S)
