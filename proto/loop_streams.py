"""Client streams on one ``grpc.aio`` event loop per process, fed and read by threads.

Why: a sync gRPC client stream keeps a request-consumer thread of its own and wakes the
caller's thread through the channel's poller for every message, and the CPU per message
grows with the streams a process holds (a host process of 192 nodes holds 96
components). On one event loop a message costs about a third of that, and the cost stays
flat as streams are added (``benchmarks/bench_servers_per_process.py``; benchmarks/
README.md, "Threads per stream"). The emulator's components are threads, so a stream here
is fed from threads (``ClientStream.put``, bounded: the producer waits while the loop
writes) and its answers are handed to a callback on the loop (``on_message``), which must
not block: it settles a slot or puts on a queue.

Every call made here carries the same run token, TLS and deadline as a sync call on
``proto.rpc.channel`` (its multicallable's ``on_loop()``).
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import os
import queue
import threading
from collections.abc import Callable
from typing import Any

import grpc
from grpc._cython import cygrpc

#: Messages a stream holds queued before a producer waits (bounds memory; cut-through).
QUEUE_DEPTH = 16

_END = object()  # ends a stream's requests


class _ProcessLoop:
    """The process's event loop, on a daemon thread started on first use (per pid: a
    forked child starts its own)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pid = 0

    def get(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None or self._pid != os.getpid():
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="grpc-loop", daemon=True).start()
                self._loop, self._pid = loop, os.getpid()
                atexit.register(_end_streams, loop)
            return self._loop


#: How long a process that exits waits for its streams to end, s.
_EXIT_WAIT_S = 1.0


def _end_streams(loop: asyncio.AbstractEventLoop) -> None:
    """At exit: cancel the streams still open (their peers see CANCELLED at once, and no
    task is left pending for the interpreter to complain about)."""

    async def cancel_all() -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    if loop.is_running():
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(cancel_all(), loop).result(_EXIT_WAIT_S)


_PROCESS_LOOP = _ProcessLoop()


def process_loop() -> asyncio.AbstractEventLoop:
    """The event loop every client stream of this process runs on, and the servers of
    ``proto.loop_server``."""
    return _PROCESS_LOOP.get()


class StreamError(grpc.RpcError):
    """A call that ended with a status other than OK, as a sync call's error."""

    def __init__(self, code: grpc.StatusCode, details: str | None):
        super().__init__(details)
        self._code, self._details = code, details or ""

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class StreamCancelled(StreamError):
    """The stream was cancelled here (``ClientStream.cancel``): CANCELLED, as a cancelled
    sync call's error."""

    def __init__(self, details: str = "the stream was cancelled"):
        super().__init__(grpc.StatusCode.CANCELLED, details)


class ClientStream:
    """One stream-stream call on the process loop.

    ``multicallable``: a stub method from ``proto.rpc.channel`` (its ``on_loop()`` gives the
    loop's twin). Threads ``put`` request messages, in order, and ``close`` the requests;
    ``on_message(message)`` runs on the loop for every answer, and ``on_end(error)`` once
    when the call is over (``error`` None if it ended with OK).
    """

    def __init__(
        self,
        multicallable: Any,
        timeout_s: float,
        on_message: Callable[[Any], None],
        on_end: Callable[[BaseException | None], None],
        *,
        depth: float = QUEUE_DEPTH,
    ):
        self._loop = process_loop()
        self._on_message = on_message
        self._on_end = on_end
        self._depth = depth
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._queued: collections.deque = collections.deque()
        self._writer_waiting: asyncio.Future | None = None
        self._sender_waiting: asyncio.Future | None = None  # a ``send`` waiting for room
        self._over = False  # the call is over: no more requests are taken
        self._done = False
        self._code = grpc.StatusCode.OK
        self._call: Any = None
        self._tasks: tuple = ()
        self._cancel_requested = False
        self._loop.call_soon_threadsafe(self._start, multicallable, timeout_s)

    # -- threads --------------------------------------------------------------------
    def put(self, message: Any, timeout: float | None = None) -> bool:
        """Queue ``message`` to send; False if the call is over (it will never be sent).

        Waits while ``depth`` messages are queued; ``timeout`` (s) bounds that wait and then
        raises ``queue.Full``, as ``queue.Queue.put`` (the caller checks whether its stream
        is still wanted).
        """
        with self._lock:
            if not self._room.wait_for(
                lambda: self._over or len(self._queued) < self._depth, timeout
            ):
                raise queue.Full
            if self._over:
                return False
            self._queued.append(message)
            waiter, self._writer_waiting = self._writer_waiting, None
        if waiter is not None:
            self._loop.call_soon_threadsafe(_wake, waiter)
        return True

    async def send(self, message: Any) -> bool:
        """``put`` for a caller on the loop itself: waits (without blocking the loop) while
        ``depth`` messages are queued; False if the call is over. One sender at a time."""
        while True:
            with self._lock:
                if self._over:
                    return False
                if len(self._queued) < self._depth:
                    self._queued.append(message)
                    waiter, self._writer_waiting = self._writer_waiting, None
                    break
                room = self._sender_waiting = self._loop.create_future()
            await room
        if waiter is not None:
            _wake(waiter)
        return True

    def room(self) -> int:
        """Messages ``put`` takes now without waiting (any number once the call is over:
        ``put`` then refuses at once)."""
        with self._lock:
            return self._depth if self._over else int(self._depth) - len(self._queued)

    def close(self) -> None:
        """No more requests: the call's request side ends once the queued ones are sent."""
        with self._lock:
            if self._over:
                return
            self._queued.append(_END)
            waiter, self._writer_waiting = self._writer_waiting, None
        if waiter is not None:
            self._loop.call_soon_threadsafe(_wake, waiter)

    def cancel(self) -> None:
        if self._done:
            return
        self._cancel_requested = True  # a call not started yet never starts
        self._loop.call_soon_threadsafe(self._cancel)

    def done(self) -> bool:
        """Whether the call is over (answered, failed or cancelled)."""
        return self._done

    def code(self) -> grpc.StatusCode:
        """The call's status once ``done``; OK before."""
        return self._code

    # -- the loop -------------------------------------------------------------------
    def _start(self, multicallable: Any, timeout_s: float) -> None:
        if self._cancel_requested:
            self._finish(StreamCancelled())
            return
        try:
            self._call = multicallable.on_loop()(None, timeout=timeout_s)
        except BaseException as exc:  # e.g. a channel that cannot be made
            self._finish(exc)
            return
        # Held here: the loop keeps only weak references to its tasks.
        self._tasks = (self._loop.create_task(self._write()), self._loop.create_task(self._read()))

    def _cancel(self) -> None:
        if self._call is not None:
            self._call.cancel()

    async def _next_request(self) -> Any:
        while True:
            with self._lock:
                if self._queued:
                    message = self._queued.popleft()
                    self._room.notify()
                    sender, self._sender_waiting = self._sender_waiting, None
                    if sender is not None:
                        _wake(sender)
                    return message
                if self._over:
                    return _END
                waiter = self._loop.create_future()
                self._writer_waiting = waiter
            await waiter

    async def _write(self) -> None:
        try:
            while (message := await self._next_request()) is not _END:
                await _send(self._call, message)
            await self._call.done_writing()
        except BaseException:  # noqa: BLE001 - the call ended; _read reports how
            self._mark_over()

    async def _read(self) -> None:
        error: BaseException | None = None
        try:
            while (message := await self._call.read()) is not grpc.aio.EOF:
                self._on_message(message)
        except asyncio.CancelledError:  # the call, or this task (the process exits)
            self._call.cancel()
            error = StreamCancelled()
        except BaseException as exc:
            error = exc
        if error is None and self._cancel_requested:
            error = StreamCancelled()
        if error is None:
            code = await self._call.code()
            if code != grpc.StatusCode.OK:
                error = StreamError(code, await self._call.details())
        self._finish(error)

    def _mark_over(self) -> None:
        """(On the loop.) No more requests: producers and the writer stop waiting."""
        with self._lock:
            self._over = True
            self._queued.clear()
            self._room.notify_all()
            waiter, self._writer_waiting = self._writer_waiting, None
            sender, self._sender_waiting = self._sender_waiting, None
        for future in (waiter, sender):
            if future is not None:
                _wake(future)

    def _finish(self, error: BaseException | None) -> None:
        self._mark_over()
        for task in self._tasks:
            # A write or the end of the requests that a cancel cut short may never resolve
            # (gRPC's): the writer would wait on it for ever.
            if task is not asyncio.current_task() and not task.done():
                task.cancel()
        if error is not None:
            code = getattr(error, "code", None)
            self._code = code() if callable(code) else grpc.StatusCode.UNKNOWN
        self._done = True
        self._on_end(error)


class _SendFailed(Exception):
    """A message could not be sent: the call is over (its status says how)."""


async def _send(call: Any, message: Any) -> None:
    """``call.write(message)``, but a send that fails leaves the call's status alone.

    ``grpc.aio``'s ``write`` records a failed send as the call's status (INTERNAL,
    "Internal error from Core"), over the status the server is sending: a send fails
    because the server has ended the call, so a refusal (UNAUTHENTICATED), a conflict
    (FAILED_PRECONDITION) or non-finite values (DATA_LOSS) would reach the caller as
    INTERNAL whenever a write was in flight. This is ``write`` without that line, on the
    internals of the pinned grpcio (1.85); another version falls back to ``write``.
    """
    cython_call = getattr(call, "_cython_call", None)
    metadata_sent = getattr(call, "_metadata_sent", None)
    if cython_call is None or metadata_sent is None or not hasattr(call, "_request_serializer"):
        await call.write(message)
        return
    if call.done():
        raise _SendFailed
    if not metadata_sent.is_set():
        await metadata_sent.wait()
        if call.done():
            raise _SendFailed
    raw = message if call._request_serializer is None else call._request_serializer(message)
    try:
        await cython_call.send_serialized_message(raw)
    except cygrpc.InternalError:
        raise _SendFailed from None
    except asyncio.CancelledError:
        if not call.cancelled():
            call.cancel()
        raise


def _wake(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)


__all__ = ["QUEUE_DEPTH", "ClientStream", "StreamCancelled", "StreamError", "process_loop"]
