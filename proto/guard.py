"""The guard in front of every server: the run token, a cap on streams, idle streams cancelled.

``Guard`` is the interceptor of a sync server (``proto.rpc.start_server``); the event-loop
servers (``proto.loop_server``) use a subclass that wraps async handlers. One watchdog
thread per process cancels the streams that wait on their client longer than the run's
``stream_idle_s``.
"""

from __future__ import annotations

import functools
import hmac
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import grpc

from proto.frames import WireError

if TYPE_CHECKING:
    from proto.rpc import Security

#: Call-metadata key of the run token (lower case, as gRPC requires).
TOKEN_METADATA_KEY = "authorization"
BEARER = "Bearer "


def handler_kind(handler: grpc.RpcMethodHandler) -> Callable[..., grpc.RpcMethodHandler]:
    return {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]


def behavior_of(handler: grpc.RpcMethodHandler) -> Callable[..., Any]:
    return {
        (False, False): handler.unary_unary,
        (False, True): handler.unary_stream,
        (True, False): handler.stream_unary,
        (True, True): handler.stream_stream,
    }[(handler.request_streaming, handler.response_streaming)]


def stream_message(parse: Callable[[bytes], Any], raw: bytes) -> Any:
    """A request stream's message, parsed; a WireError if it is not valid protobuf, which
    the servicer's error mapping (``rpc_errors``) answers INVALID_ARGUMENT."""
    try:
        return parse(raw)
    except WireError:
        raise  # valid protobuf naming a chunk that cannot be read (proto.shm)
    except Exception:
        raise WireError("a message of the request stream is not valid protobuf") from None


WRONG_TOKEN = (
    "missing or wrong run token: send this run's token as call metadata "
    f"'{TOKEN_METADATA_KEY}: Bearer <token>' (the token file is in the run directory)"
)


class _Watch:
    """One open stream: since when (monotonic) it has been waiting on its client, if it is."""

    __slots__ = ("context", "waiting_since")

    def __init__(self, context: grpc.ServicerContext):
        self.context = context
        self.waiting_since: float | None = None

    def cancel(self) -> None:
        # The handler's blocked read or write fails and its thread and slot come back.
        self.context.cancel()


class Guard(grpc.ServerInterceptor):
    """Token check for every call; a cap and an idle deadline for every stream."""

    def __init__(self, security: Security):
        self._expected = (BEARER + security.token).encode()
        self._idle_s = security.stream_idle_s
        self._slots = threading.BoundedSemaphore(security.max_streams)
        self._max_streams = security.max_streams
        self._watches: set[_Watch] = set()
        self._lock = threading.Lock()
        # Per method: (the servicer's handler, its guarded and its refusing wrapper). A
        # service's handlers never change, so each wrapper is built once, not per call.
        self._wrapped: dict[str, tuple[Any, grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def intercept_service(self, continuation, handler_call_details):
        return self._select(continuation(handler_call_details), handler_call_details)

    def _select(self, handler: grpc.RpcMethodHandler | None, handler_call_details):
        """The handler a call gets: ``handler`` guarded, or a refusal for a wrong token."""
        if handler is None:
            return None  # unknown method: gRPC answers UNIMPLEMENTED
        wrapped = self._wrapped.get(handler_call_details.method)
        if wrapped is None or wrapped[0] is not handler:
            refusal = self._refusal(handler, grpc.StatusCode.UNAUTHENTICATED, WRONG_TOKEN)
            wrapped = (handler, self._guarded(handler), refusal)
            self._wrapped[handler_call_details.method] = wrapped
        presented = b""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == TOKEN_METADATA_KEY:
                presented = value.encode() if isinstance(value, str) else value
        if not hmac.compare_digest(presented, self._expected):
            return wrapped[2]
        return wrapped[1]

    @staticmethod
    def _refusal(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, details: str):
        """A handler of ``handler``'s kind that ends the call with ``code`` and reads nothing."""

        def refuse(request: Any, context: grpc.ServicerContext) -> Any:
            context.abort(code, details)

        # No deserializer: a refused request is never parsed.
        return handler_kind(handler)(refuse)

    def _guarded(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """``handler`` that parses its own requests, and for a stream takes a slot and a watch.

        Parsing here, not in gRPC, lets a message that is not valid protobuf get
        INVALID_ARGUMENT (gRPC's own deserializer answers INTERNAL).
        """
        behavior = behavior_of(handler)
        parse = handler.request_deserializer or (lambda raw: raw)
        guard = self

        def parsed(raw: bytes, context: grpc.ServicerContext) -> Any:
            try:
                return parse(raw)
            except WireError as exc:  # valid protobuf naming a chunk that cannot be read
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            except Exception:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the request is not valid protobuf")

        def admit(context: grpc.ServicerContext) -> tuple[_Watch, Callable[[], None]]:
            watch = _Watch(context)
            if not guard.enter(watch):
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, guard.full_message)
            return watch, functools.partial(guard.leave, watch)

        def requests(watch: _Watch, iterator: Iterator[bytes]) -> Iterator[Any]:
            while True:
                watch.waiting_since = time.monotonic()
                try:
                    raw = next(iterator)
                except StopIteration:
                    return
                finally:
                    watch.waiting_since = None
                yield stream_message(parse, raw)

        if not (handler.request_streaming or handler.response_streaming):

            def run(request: Any, context: grpc.ServicerContext) -> Any:
                return behavior(parsed(request, context), context)

        elif handler.response_streaming:

            def run(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                watch, release = admit(context)
                context.add_callback(release)
                try:
                    if handler.request_streaming:
                        request = requests(watch, request)
                    else:
                        request = parsed(request, context)
                    for item in behavior(request, context):
                        # Until gRPC asks for the next item it is sending this one, which
                        # waits on the client's flow control.
                        watch.waiting_since = time.monotonic()
                        yield item
                        watch.waiting_since = None
                finally:
                    release()

        else:

            def run(request: Any, context: grpc.ServicerContext) -> Any:
                watch, release = admit(context)
                try:
                    return behavior(requests(watch, request), context)
                finally:
                    release()

        return handler_kind(handler)(
            run,
            request_deserializer=None,  # raw bytes in: parsed above
            response_serializer=handler.response_serializer,
        )

    def enter(self, watch: Any) -> bool:
        """Take a stream slot for ``watch`` (``waiting_since``, ``cancel()``) and watch
        it for idleness; False if every slot is taken."""
        if not self._slots.acquire(blocking=False):
            return False
        with self._lock:
            self._watches.add(watch)
        return True

    def leave(self, watch: Any) -> None:
        """The stream ``enter`` admitted is over. Once (the call's end and the handler's end
        both call it): the watch leaves the set once, under the lock, and only then is its
        slot given back."""
        with self._lock:
            if watch not in self._watches:
                return
            self._watches.discard(watch)
        self._slots.release()

    @property
    def full_message(self) -> str:
        return f"this service already serves {self._max_streams} streams; try again later"

    def start_watchdog(self) -> None:
        _IDLE_WATCHDOG.watch(self)

    @property
    def check_period_s(self) -> float:
        """How often this server's streams are checked for idleness, s."""
        return min(1.0, self._idle_s / 4)

    def cancel_idle(self, now: float) -> None:
        """Cancel the streams that have waited on their client longer than ``stream_idle_s``."""
        with self._lock:
            idle = [
                w
                for w in self._watches
                if w.waiting_since is not None and now - w.waiting_since > self._idle_s
            ]
        for watch in idle:
            watch.cancel()


class _IdleWatchdog:
    """One thread per process that ends the idle streams of every guarded server in it.

    Not one per server: a process hosting many emulated nodes runs a server per node, and
    a thread each woke every second (more often while it waited for the GIL), so the
    wake-ups of a step grew as the number of nodes times the step's length.
    """

    def __init__(self) -> None:
        self._guards: weakref.WeakSet[Guard] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._changed = threading.Event()

    def watch(self, guard: Guard) -> None:
        with self._lock:
            self._guards.add(guard)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="grpc-idle", daemon=True)
                self._thread.start()
        self._changed.set()  # a shorter period than the one slept on takes effect now

    def _run(self) -> None:
        while True:
            with self._lock:
                guards = list(self._guards)
            period_s = min((g.check_period_s for g in guards), default=1.0)
            if self._changed.wait(period_s):
                self._changed.clear()
                continue
            now = time.monotonic()
            for guard in guards:
                guard.cancel_idle(now)


_IDLE_WATCHDOG = _IdleWatchdog()
