"""Guarded gRPC servers on the process's event loop, for servicers written as coroutines.

Why: a sync gRPC server holds a thread for every open stream and a poller thread of its
own, and a host process of the emulator runs a server per emulated component (96 of them
at 192 nodes), so every message wakes a stream's thread on the way in and another on the
way out. A ``grpc.aio`` server on the loop of ``proto.loop_streams`` (the one the
process's client streams already run on) serves every stream of the process on that one
thread: at 96 endpoints a message costs the server a third of the CPU
(``benchmarks/bench_servers_per_process.py``). The servicer's handlers are coroutines or
async generators that read and answer on the loop and hand the work (a layer's compute)
to a thread, which sees its call through ``ThreadSideContext``.

The guard is the sync servers' (``proto.guard.Guard``): the run token on every call, the
cap on open streams, a stream whose client stays idle past ``stream_idle_s`` ended with
CANCELLED, a request that is not protobuf answered INVALID_ARGUMENT; and the same
health service, behind it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import inspect
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2_grpc

from proto import shm, threads
from proto.frames import WireError
from proto.guard import Guard, behavior_of, handler_kind, stream_message
from proto.loop_streams import process_loop
from proto.rpc import GRPC_OPTIONS, MAPPED_ERRORS, Security, bind_port, status_for

IDLE_DETAILS = "the stream's client sent nothing for longer than the run's stream_idle_s"


class LoopServer:
    """A started ``grpc.aio`` server on the process loop that any thread may stop, as a
    sync ``grpc.Server``."""

    def __init__(self, server: grpc.aio.Server, loop: asyncio.AbstractEventLoop):
        self._server = server
        self._loop = loop

    def stop(self, grace: float | None) -> threading.Event:
        """Stop serving (open calls are cancelled after ``grace`` s); set once stopped."""
        stopped = threading.Event()
        if self._loop.is_closed():
            stopped.set()
            return stopped
        future = asyncio.run_coroutine_threadsafe(self._server.stop(grace), self._loop)
        future.add_done_callback(lambda _: stopped.set())
        return stopped


def start_loop_server(
    register: Callable[[Any], None], host: str, *, security: Security
) -> tuple[LoopServer, str]:
    """``proto.rpc.start_server`` for async servicers: a guarded ``grpc.aio`` server on the
    process loop, on an OS-chosen port of ``host``; returns it and its ``host:port``.
    Call it from any thread but the loop's."""
    shm.activate(security.shared_memory)
    loop = process_loop()

    async def start() -> tuple[LoopServer, str]:
        guard = LoopGuard(security)
        server = grpc.aio.server(interceptors=[guard], options=GRPC_OPTIONS)
        register(server)
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        address = bind_port(server, host, security)
        await server.start()
        guard.start_watchdog()
        return LoopServer(server, loop), address

    return asyncio.run_coroutine_threadsafe(start(), loop).result()


class _LoopWatch:
    """One open stream of a loop server, for the idle watchdog (``Guard.enter``)."""

    __slots__ = ("waiting_since", "idle", "_task", "_loop")

    def __init__(self) -> None:
        self.waiting_since: float | None = None
        self.idle = False
        self._task = asyncio.current_task()
        self._loop = self._task.get_loop()

    def cancel(self) -> None:
        """From the watchdog's thread: end the stream as idle (its handler answers CANCELLED)."""
        self.idle = True
        self._loop.call_soon_threadsafe(self._task.cancel)

    async def end_if_idle(self, context: grpc.aio.ServicerContext) -> None:
        """In the handler, on a CancelledError: if the watchdog sent it, end the call with
        CANCELLED (a cancelled handler task alone would leave the call without a status
        until its deadline); else it is the call's own cancellation, raised on."""
        if not self.idle:
            raise asyncio.CancelledError
        asyncio.current_task().uncancel()
        await context.abort(grpc.StatusCode.CANCELLED, IDLE_DETAILS)


class LoopGuard(Guard, grpc.aio.ServerInterceptor):
    """``Guard`` for a ``grpc.aio`` server: the same checks, on handlers that are coroutines
    or async generators (a call to a sync handler fails with a TypeError, which gRPC answers
    as UNKNOWN: a servicer bug, found by the first call)."""

    async def intercept_service(self, continuation, handler_call_details):
        return self._select(await continuation(handler_call_details), handler_call_details)

    @staticmethod
    def _refusal(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, details: str):
        async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(code, details)

        return handler_kind(handler)(refuse)

    def _guarded(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        behavior = behavior_of(handler)
        streams_answers = inspect.isasyncgenfunction(behavior)
        if not (streams_answers or inspect.iscoroutinefunction(behavior)):
            raise TypeError(
                f"{behavior!r} is not a coroutine function or an async generator: a loop "
                "server runs every handler on its event loop (proto.loop_server)"
            )
        parse = handler.request_deserializer or (lambda raw: raw)
        guard = self

        async def parsed(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
            try:
                return parse(raw)
            except WireError as exc:  # valid protobuf naming a chunk that cannot be read
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            except Exception:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, "the request is not valid protobuf"
                )

        async def requests(watch: _LoopWatch, raw_requests: Any) -> AsyncIterator[Any]:
            iterator = raw_requests.__aiter__()
            while True:
                watch.waiting_since = time.monotonic()
                try:
                    raw = await iterator.__anext__()
                except StopAsyncIteration:
                    return
                finally:
                    watch.waiting_since = None
                yield stream_message(parse, raw)

        async def admit(context: grpc.aio.ServicerContext) -> _LoopWatch:
            watch = _LoopWatch()
            if not guard.enter(watch):
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, guard.full_message)
            context.add_done_callback(lambda _: guard.leave(watch))
            return watch

        async def request_of(watch: _LoopWatch, request: Any, context) -> Any:
            if handler.request_streaming:
                return requests(watch, request)
            return await parsed(request, context)

        if not (handler.request_streaming or handler.response_streaming):

            async def run(request: Any, context: grpc.aio.ServicerContext) -> Any:
                return await behavior(await parsed(request, context), context)

        elif streams_answers:
            # Only the waits for requests count as idle: an answer that waits is one the
            # client does not read, which its flow-control window bounds.
            async def run(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator:
                watch = await admit(context)
                try:
                    async for item in behavior(await request_of(watch, request, context), context):
                        yield item
                except asyncio.CancelledError:
                    await watch.end_if_idle(context)
                finally:
                    guard.leave(watch)

        else:  # answers with context.write (a health Watch) or a single answer

            async def run(request: Any, context: grpc.aio.ServicerContext) -> Any:
                watch = await admit(context)
                try:
                    return await behavior(await request_of(watch, request, context), context)
                except asyncio.CancelledError:
                    await watch.end_if_idle(context)
                finally:
                    guard.leave(watch)

        return handler_kind(handler)(
            run,
            request_deserializer=None,  # raw bytes in: parsed above
            response_serializer=handler.response_serializer,
        )


# -- servicers ---------------------------------------------------------------------------


def loop_errors(method: Callable[..., Any]) -> Callable[..., Any]:
    """``proto.rpc.rpc_errors`` for a coroutine handler."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except MAPPED_ERRORS as exc:
            await context.abort(*status_for(exc))

    return wrapper


def loop_stream_errors(method: Callable[..., Any]) -> Callable[..., Any]:
    """``proto.rpc.rpc_stream_errors`` for an async-generator handler."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext):
        try:
            async for item in method(self, request, context):
                yield item
        except MAPPED_ERRORS as exc:
            await context.abort(*status_for(exc))

    return wrapper


class ThreadSideContext:
    """A loop call's context as the call's threads use a sync one: ``is_active``,
    ``time_remaining`` and ``add_callback``, safe from any thread. The callbacks run once,
    when the call is over (on the loop) or the handler gives it up (``end``)."""

    def __init__(self, context: grpc.aio.ServicerContext):
        remaining = context.time_remaining()
        self._deadline = None if remaining is None else time.monotonic() + remaining
        self._lock = threading.Lock()
        self._over = False
        self._callbacks: list[Callable[[], None]] = []
        context.add_done_callback(self.end)

    def is_active(self) -> bool:
        return not self._over

    def time_remaining(self) -> float | None:
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - time.monotonic())

    def add_callback(self, callback: Callable[[], None]) -> bool:
        """Run ``callback`` when the call is over; False (not run) if it is over already."""
        with self._lock:
            if self._over:
                return False
            self._callbacks.append(callback)
            return True

    def end(self, *_: Any) -> None:
        with self._lock:
            if self._over:
                return
            self._over = True
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()


def settle_soon(loop: asyncio.AbstractEventLoop, future: asyncio.Future, result: Any) -> None:
    """From a thread: give ``future`` (of ``loop``) ``result``, or raise it if an exception;
    nothing if the loop is gone (the process exits)."""

    def settle() -> None:
        if future.done():
            return
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)

    with contextlib.suppress(RuntimeError):  # the loop is closed
        loop.call_soon_threadsafe(settle)


async def on_thread(fn: Callable[..., Any], *args: Any, name: str) -> Any:
    """``fn(*args)`` on a pooled thread (``proto.threads``), awaited on the loop."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def run() -> None:
        try:
            result = fn(*args)
        except BaseException as exc:  # raised where it is awaited
            result = exc
        settle_soon(loop, future, result)

    threads.start(run, name=name)
    return await future


# -- sync servicers on a loop server ------------------------------------------------------


class _Aborted(Exception):
    """A sync handler's ``context.abort``: the loop ends the call with this status."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code, self.details = code, details


class _ThreadCall(ThreadSideContext):
    """The context a sync handler gets on its thread: ``ThreadSideContext`` plus ``abort``."""

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise _Aborted(code, details)


class _FedRequests:
    """A sync handler's request iterator, fed on the loop from the call's async one.

    The loop reads ahead at most ``depth`` requests (then waits until the thread takes
    one). A call known to be cancelled or over before its requests ended ends the iterator
    with a bare ``grpc.RpcError``, as a sync server's request iterator does when its client
    cancels; but ``grpc.aio`` may end a cancelled call's requests as if they were complete
    and only then report the cancellation, so a handler also watches its context
    (``is_active``, ``add_callback``), as SwarmX's do.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, depth: int):
        self._loop = loop
        self._depth = depth
        self._ready = threading.Condition()
        self._items: collections.deque = collections.deque()
        self._over = False
        self._error: BaseException | None = None
        self._room: asyncio.Future | None = None

    async def feed(self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> None:
        error: BaseException | None = None
        try:
            async for item in requests:
                with self._ready:
                    self._items.append(item)
                    self._ready.notify()
                    room = None
                    if len(self._items) >= self._depth:
                        room = self._room = self._loop.create_future()
                if room is not None:
                    await room
            if context.cancelled():  # the requests of a cancelled call end as if complete
                error = grpc.RpcError("the call was cancelled before its requests ended")
        except asyncio.CancelledError:
            error = grpc.RpcError("the call ended before its requests did")
            raise
        except BaseException as exc:  # noqa: BLE001 - the handler's thread raises it
            error = exc
        finally:
            with self._ready:
                self._over, self._error = True, error
                self._ready.notify()

    def __iter__(self) -> _FedRequests:
        return self

    def __next__(self) -> Any:
        with self._ready:
            while not self._items and not self._over:
                self._ready.wait()
            if not self._items:
                if self._error is not None:
                    raise self._error
                raise StopIteration
            item = self._items.popleft()
            room, self._room = self._room, None
        if room is not None:
            settle_soon(self._loop, room, None)
        return item


def _threaded(handler: grpc.RpcMethodHandler, depth: int) -> grpc.RpcMethodHandler:
    """``handler`` as a loop server runs it: a sync behavior runs on a pooled thread with a
    ``_ThreadCall`` context (a request stream fed to it, answers handed back); an async
    one is left as it is."""
    behavior = behavior_of(handler)
    if inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior):
        return handler
    name = getattr(behavior, "__name__", "handler")

    def start(request: Any, context: grpc.aio.ServicerContext, deliver: Callable) -> tuple:
        """Run ``behavior`` on a thread; ``deliver(kind, value)`` on the loop for each of
        its answers (``_ANSWER``) and once at its end (``_DONE`` or ``_FAILED``)."""
        loop = asyncio.get_running_loop()
        call = _ThreadCall(context)
        feeder = None
        if handler.request_streaming:
            fed = _FedRequests(loop, depth)
            feeder = asyncio.ensure_future(fed.feed(request, context))
            request = fed

        def to_loop(kind: object, value: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: the process exits
                loop.call_soon_threadsafe(deliver, kind, value)

        def work() -> None:
            try:
                result = behavior(request, call)
                if handler.response_streaming:
                    for answer in result:
                        to_loop(_ANSWER, answer)
                    result = None
            except BaseException as exc:  # ends the call on the loop
                to_loop(_FAILED, exc)
            else:
                to_loop(_DONE, result)

        threads.start(work, name=name)
        return call, feeder

    async def finish(error: BaseException, context: grpc.aio.ServicerContext) -> None:
        if isinstance(error, _Aborted):
            await context.abort(error.code, error.details)
        raise error

    def close(call: _ThreadCall, feeder: asyncio.Future | None) -> None:
        call.end()  # the thread sees its call over (its callbacks run) if it still works
        if feeder is not None:
            feeder.cancel()

    if handler.response_streaming:

        async def run(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator:
            answers: asyncio.Queue = asyncio.Queue()
            call, feeder = start(request, context, lambda *kv: answers.put_nowait(kv))
            try:
                while True:
                    kind, value = await answers.get()
                    if kind is _ANSWER:
                        yield value
                    elif kind is _DONE:
                        return
                    else:
                        await finish(value, context)
            finally:
                close(call, feeder)

    else:

        async def run(request: Any, context: grpc.aio.ServicerContext) -> Any:
            done = asyncio.get_running_loop().create_future()
            call, feeder = start(request, context, lambda *kv: done.done() or done.set_result(kv))
            try:
                kind, value = await done
                if kind is _DONE:
                    return value
                await finish(value, context)
            finally:
                close(call, feeder)

    return handler_kind(handler)(
        run,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


_ANSWER, _DONE, _FAILED = object(), object(), object()


def threaded_stream_handler(behavior: Callable[..., Any], *, depth: int = 16) -> Callable:
    """The sync stream-stream handler ``behavior`` as an async one: it runs on a pooled
    thread, its requests fed and its answers handed back by the loop (as ``SyncOnLoop``
    runs a sync servicer's), for an async handler that leaves some calls to threads."""
    return _threaded(grpc.stream_stream_rpc_method_handler(behavior), depth).stream_stream


class _GenericThreaded(grpc.GenericRpcHandler):
    def __init__(self, inner: grpc.GenericRpcHandler, depth: int):
        self._inner = inner
        self._depth = depth
        self._converted: dict[str, tuple[Any, grpc.RpcMethodHandler]] = {}

    def service(self, handler_call_details):
        handler = self._inner.service(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        known = self._converted.get(method)
        if known is None or known[0] is not handler:
            known = self._converted[method] = (handler, _threaded(handler, self._depth))
        return known[1]


class SyncOnLoop:
    """Stands in for a loop server while a sync servicer registers (``register(SyncOnLoop(
    server), servicer)``): every sync handler runs on a pooled thread, its requests and
    answers going through the loop, which reads and writes the call.

    For a servicer that is written for threads (SwarmX's, whose layers block on their
    children): its calls lose the sync server's per-server poller, executor and
    completion queue, which in a host of many components cost most of its CPU.
    """

    def __init__(self, server: grpc.aio.Server, *, depth: int = 16):
        self._server = server
        self._depth = depth

    def add_generic_rpc_handlers(self, handlers) -> None:
        self._server.add_generic_rpc_handlers(
            tuple(_GenericThreaded(h, self._depth) for h in handlers)
        )

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self._server.add_registered_method_handlers(
            service, {name: _threaded(h, self._depth) for name, h in handlers.items()}
        )


__all__ = [
    "LoopGuard",
    "SyncOnLoop",
    "LoopServer",
    "ThreadSideContext",
    "loop_errors",
    "loop_stream_errors",
    "on_thread",
    "settle_soon",
    "threaded_stream_handler",
    "start_loop_server",
]
