"""Client streams on the process's event loop (``proto.loop_streams``), against real
guarded gRPC servers on loopback."""

from __future__ import annotations

import asyncio
import queue
import threading
import time

import grpc
import pytest

from proto.loop_streams import ClientStream, StreamCancelled, _end_streams, process_loop
from proto.rpc import Security, channel, start_server

_SERVICE = "test.Echo"
_TIMEOUT_S = 10.0


def _echo(requests, context):
    yield from requests


class _Silent:
    """Reads nothing and answers nothing until ``release`` is set."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def __call__(self, requests, context):
        self.release.wait(_TIMEOUT_S)
        return iter(())


def _server(handler, security: Security):
    def register(server: grpc.Server) -> None:
        method = grpc.stream_stream_rpc_method_handler(handler)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(_SERVICE, {"Run": method}),)
        )

    return start_server(register, "127.0.0.1", security=security)


@pytest.fixture
def security() -> Security:
    return Security.generate()


@pytest.fixture
def serve(security):
    """Starts a guarded server with a handler (``_echo``, a ``_Silent``...): its address.
    Every server stops, and every silent handler is let go, at the test's end."""
    servers: list = []
    silents: list[_Silent] = []

    def start(handler) -> str:
        if isinstance(handler, _Silent):
            silents.append(handler)
        server, address = _server(handler, security)
        servers.append(server)
        return address

    yield start
    for silent in silents:
        silent.release.set()
    for server in servers:
        server.stop(None)


def _method(address: str, security: Security):
    return channel(address, security).stream_stream(f"/{_SERVICE}/Run")


class _Record:
    """What a stream's callbacks saw, in order; ``ended`` once it is over."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.error: BaseException | None = None
        self.ended = threading.Event()
        self.loop_threads: set[int] = set()

    def on_message(self, message: bytes) -> None:
        self.loop_threads.add(threading.get_ident())
        self.messages.append(message)

    def on_end(self, error: BaseException | None) -> None:
        self.error = error
        self.ended.set()


def test_messages_go_in_order_and_every_answer_comes_on_the_loop(security, serve):
    address = serve(_echo)
    record = _Record()
    stream = ClientStream(_method(address, security), _TIMEOUT_S, record.on_message, record.on_end)
    sent = [f"message {i}".encode() * (i + 1) for i in range(50)]
    for message in sent:
        assert stream.put(message)
    stream.close()
    assert record.ended.wait(_TIMEOUT_S)
    assert record.error is None and stream.done() and stream.code() == grpc.StatusCode.OK
    assert record.messages == sent
    assert len(record.loop_threads) == 1 and threading.get_ident() not in record.loop_threads
    assert not stream.put(b"late")  # over: never sent


def test_streams_from_many_threads_share_one_loop_thread(security, serve):
    address = serve(_echo)
    records = [_Record() for _ in range(8)]

    def one(record: _Record) -> None:
        stream = ClientStream(
            _method(address, security), _TIMEOUT_S, record.on_message, record.on_end
        )
        for i in range(20):
            stream.put(bytes([i]))
        stream.close()

    workers = [threading.Thread(target=one, args=(r,)) for r in records]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    for record in records:
        assert record.ended.wait(_TIMEOUT_S) and record.error is None
        assert record.messages == [bytes([i]) for i in range(20)]
    assert len(set().union(*(r.loop_threads for r in records))) == 1
    assert process_loop() is process_loop()


def test_a_stream_without_the_runs_token_is_unauthenticated(security, serve):
    address = serve(_echo)
    record = _Record()
    stranger = Security.generate()  # another run's token
    stream = ClientStream(_method(address, stranger), _TIMEOUT_S, record.on_message, record.on_end)
    stream.put(b"hello")
    stream.close()
    assert record.ended.wait(_TIMEOUT_S)
    assert record.messages == []
    assert record.error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert stream.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_stream_past_its_deadline_fails_with_deadline_exceeded(security, serve):
    address = serve(_Silent())
    record = _Record()
    stream = ClientStream(_method(address, security), 0.3, record.on_message, record.on_end)
    stream.put(b"hello")
    assert record.ended.wait(_TIMEOUT_S)
    assert record.error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert stream.done() and stream.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_a_full_stream_holds_its_producer_and_a_cancel_frees_it(security, serve):
    """Flow control reaches the producer: once the server stops reading, ``put`` waits
    (``queue.Full`` with a timeout), and cancelling the stream ends the wait with False."""
    address = serve(_Silent())
    record = _Record()
    stream = ClientStream(
        _method(address, security), _TIMEOUT_S, record.on_message, record.on_end, depth=2
    )
    chunk = b"x" * (1 << 20)
    with pytest.raises(queue.Full):
        for _ in range(64):  # far more than the transport's windows hold
            stream.put(chunk, timeout=0.5)
    outcome: list[bool] = []
    blocked = threading.Thread(target=lambda: outcome.append(stream.put(chunk)))
    blocked.start()
    stream.cancel()
    blocked.join(_TIMEOUT_S)
    assert outcome == [False]
    assert record.ended.wait(_TIMEOUT_S)
    assert isinstance(record.error, StreamCancelled)
    assert stream.code() == grpc.StatusCode.CANCELLED


def test_send_on_the_loop_waits_for_room_without_blocking_the_loop(security, serve):
    """``send`` (a caller on the loop itself) waits for room as ``put`` does, while the
    loop goes on serving other streams; its messages go in order; a cancel ends the wait
    with False."""
    loop = process_loop()
    address = serve(_echo)
    record = _Record()
    echoed = ClientStream(_method(address, security), _TIMEOUT_S, record.on_message, record.on_end)
    sent = [b"%d" % i * 100 for i in range(40)]

    async def send_all():
        return [await echoed.send(message) for message in sent]

    assert asyncio.run_coroutine_threadsafe(send_all(), loop).result(_TIMEOUT_S) == [True] * 40
    echoed.close()
    assert record.ended.wait(_TIMEOUT_S) and record.messages == sent

    silent = _Silent()
    stalled = ClientStream(
        _method(serve(silent), security), _TIMEOUT_S, lambda m: None, lambda e: None, depth=2
    )
    chunk = b"x" * (1 << 20)

    async def fill():
        pending = None
        for _ in range(64):
            pending = asyncio.ensure_future(stalled.send(chunk))
            done, _ = await asyncio.wait({pending}, timeout=0.5)
            if not done:
                return pending  # waits for room
        return None

    pending = asyncio.run_coroutine_threadsafe(fill(), loop).result(_TIMEOUT_S)
    assert pending is not None and not pending.done()
    # The loop still serves: another stream's message goes and comes back meanwhile.
    other = _Record()
    again = ClientStream(_method(address, security), _TIMEOUT_S, other.on_message, other.on_end)
    again.put(b"still served")
    again.close()
    assert other.ended.wait(_TIMEOUT_S) and other.messages == [b"still served"]
    stalled.cancel()
    assert asyncio.run_coroutine_threadsafe(_result(pending), loop).result(_TIMEOUT_S) is False


async def _result(future):
    return await future


def test_a_stream_cancelled_before_it_starts_never_calls(security, serve):
    calls: list[int] = []

    def counted(requests, context):
        calls.append(1)
        return _echo(requests, context)

    address = serve(counted)
    record = _Record()
    gate = threading.Event()
    process_loop().call_soon_threadsafe(gate.wait, _TIMEOUT_S)  # holds the loop
    stream = ClientStream(_method(address, security), _TIMEOUT_S, record.on_message, record.on_end)
    stream.cancel()
    gate.set()
    assert record.ended.wait(_TIMEOUT_S)
    assert isinstance(record.error, StreamCancelled) and calls == []


def test_a_method_not_from_the_runs_channel_has_no_loop_twin():
    plain = grpc.insecure_channel("127.0.0.1:1").stream_stream("/x/y")
    record = _Record()
    stream = ClientStream(plain, _TIMEOUT_S, record.on_message, record.on_end)
    assert record.ended.wait(_TIMEOUT_S)
    assert isinstance(record.error, AttributeError) and stream.done()


def test_at_exit_the_open_streams_are_cancelled(security, serve):
    """What the exit hook does: every stream still open ends as cancelled, its peer's
    call with it, and no task of the loop is left pending."""
    address = serve(_Silent())
    record = _Record()
    stream = ClientStream(_method(address, security), 30.0, record.on_message, record.on_end)
    stream.put(b"hello")
    assert not record.ended.wait(0.2)  # open: the server neither reads nor answers
    _end_streams(process_loop())
    assert record.ended.is_set() and isinstance(record.error, StreamCancelled)
    assert stream.done() and not stream.put(b"late")


def _ends_at_once(requests, context):
    return iter(())  # answers nothing and reads nothing: the call is over


def test_a_call_the_server_ends_leaves_no_writer_behind(security, serve):
    """A writer that waits on flow control when the server ends the call is ended too:
    nothing of the stream stays pending on the loop (a producer's ``put`` says False)."""
    address = serve(_ends_at_once)
    record = _Record()
    stream = ClientStream(
        _method(address, security), _TIMEOUT_S, record.on_message, record.on_end, depth=2
    )
    chunk = b"x" * (1 << 20)
    while stream.put(chunk):
        pass
    assert record.ended.wait(_TIMEOUT_S)  # (how: gRPC's, e.g. INTERNAL for the lost write)
    deadline = time.monotonic() + _TIMEOUT_S
    while not all(task.done() for task in stream._tasks) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert all(task.done() for task in stream._tasks)


@pytest.mark.parametrize("pause_s", [0.0, 0.1])
def test_a_cancelled_call_leaves_no_writer_behind(security, serve, pause_s):
    """However the cancel meets the writer (writing, ending the requests, or waiting for
    more), once the call is over nothing of the stream stays pending on the loop."""
    address = serve(_Silent())
    streams = []
    for _ in range(20):
        record = _Record()
        stream = ClientStream(
            _method(address, security), _TIMEOUT_S, record.on_message, record.on_end
        )
        stream.put(b"hello")
        stream.close()
        time.sleep(pause_s)
        stream.cancel()
        assert record.ended.wait(_TIMEOUT_S) and isinstance(record.error, StreamCancelled)
        streams.append(stream)
    tasks = [task for stream in streams for task in stream._tasks]
    deadline = time.monotonic() + _TIMEOUT_S
    while not all(task.done() for task in tasks) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert all(task.done() for task in tasks)


def _refuses(requests, context):
    context.abort(grpc.StatusCode.FAILED_PRECONDITION, "step 3 was never begun")


def test_the_servers_status_survives_a_write_in_flight(security, serve):
    """A server that ends the call while the client still writes: the caller gets the
    server's status and details, not the INTERNAL of the lost write (grpc.aio's ``write``
    would record that over it)."""
    address = serve(_refuses)
    chunk = b"x" * (256 << 10)
    for _ in range(10):
        record = _Record()
        stream = ClientStream(
            _method(address, security), _TIMEOUT_S, record.on_message, record.on_end
        )
        while stream.put(chunk):
            pass
        assert record.ended.wait(_TIMEOUT_S)
        assert record.error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert record.error.details() == "step 3 was never begun"
        assert stream.code() == grpc.StatusCode.FAILED_PRECONDITION
