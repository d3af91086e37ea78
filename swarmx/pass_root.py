"""The root's ``SwarmX.RunPass`` on the process's event loop: a pass's layers from MemoryX
to the children, without threads.

The driver sends a pass's layer requests on one stream; for each, the root asks MemoryX
for the layer's weights on one ``StreamPass`` call per server, kept from pass to pass
(``proto.kept_streams``), as soon as the request arrives: MemoryX streams it while the
layers before it are still at the nodes (a run of small layers whose requests came
together in one message, MemoryX answers in one); and, once fewer than
``MAX_IN_FLIGHT`` layers are unanswered, puts the layer's items on every child's pass
stream as they come (``swarmx.pass_relay``, which a SwarmX node below the root runs for
its parent's stream). Each layer is answered to the driver once every
child has answered it, in pass order. The first failure ends the pass and cancels its
streams, to the children and to MemoryX.

A run of small layers goes to each child as one message (``Relay._gather``): a small
layer is held back while the next layer's request is in, has its place in the window and
fit, in the last pass that sent it, with the layers held into one ``LayerBundle`` (at most
``BUNDLE_MAX_BYTES``). The run takes one place in the window, so a pass of a small model
goes down as one message per child and comes back as one (the nodes answer a run they
computed at once together, ``LayerAck.following``), and the answers that complete at once
go to the driver together too. Per-message work is most of a small model's step
(benchmarks/README.md); each layer keeps its own header, answer, sum and update.

A root whose MemoryX splits layers over several servers joins their pieces on threads
(``swarmx.pass_run.PassRun``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Iterable
from typing import Any

import grpc

from proto.domain import Header, LayerRequest, StreamItem
from proto.frames import BUNDLE_MAX_BYTES, WireError, from_wire_stream_async
from proto.kept_streams import KeptStream
from proto.loop_streams import ClientStream
from proto.messages import unfolded, weights_requests_to_wire
from proto.pass_stream import ReadDone
from proto.rpc import time_left_s
from swarmx.pass_relay import Relay, RelayedLayer, answered
from swarmx.pass_run import MAX_IN_FLIGHT, StreamEnd, checked_pass_request


async def _messages(queue: asyncio.Queue) -> AsyncIterator:
    """The messages a ``ClientStream`` put on ``queue``, its error raised at the end."""
    while not isinstance(message := await queue.get(), StreamEnd):
        yield message
    if message.error is not None:
        raise message.error


class _WeightStream(KeptStream):
    """One MemoryX server's ``StreamPass`` call, its answers read on the loop as items; kept
    for the next pass once a pass has read all it asked for (``proto.kept_streams``)."""

    def __init__(self, stub: Any, timeout_s: float, wiring: int):
        answers: asyncio.Queue = asyncio.Queue()
        call = ClientStream(
            stub.StreamPass,
            timeout_s,
            answers.put_nowait,
            lambda error: answers.put_nowait(StreamEnd(error)),
        )
        super().__init__(call, timeout_s, wiring)
        self.items: AsyncIterator[StreamItem] = from_wire_stream_async(_messages(answers))


class _LoopWeights:
    """The weights of one pass's layers from MemoryX: one ``StreamPass`` call per server
    (kept from the pass before where it can be), taken by the first layer of the pass it
    holds, its answers read on the loop."""

    def __init__(self, servicer: Any, timeout_s: float):
        self._servicer = servicer
        self._timeout_s = timeout_s
        self._calls: dict[Any, _WeightStream] = {}
        self._closed = False

    def _call(self, stub) -> _WeightStream:
        stream = self._calls.get(stub)
        if stream is None:
            if self._closed:  # (a pass cancelled by a rewiring opens no more streams)
                raise WireError("the pass is over; its MemoryX streams are closed")
            stream = self._calls[stub] = self._servicer.stream_pool.take(
                ("memoryx", id(stub)),
                lambda timeout_s, wiring: _WeightStream(stub, timeout_s, wiring),
                self._timeout_s,
            )
        return stream

    def _stub(self, request: LayerRequest):
        _, stubs = self._servicer.weight_sources(request.layer)
        return stubs[0]  # (split layers take the threaded pass)

    def asked_with(
        self, request: LayerRequest, ready: Iterable[LayerRequest], layer_bytes: dict
    ) -> list[LayerRequest]:
        """``request`` and those ``ready`` after it to ask for in the same message: while
        each needs weights from the same server and the last pass's layers of their kinds
        (``layer_bytes``) fit into one ``LayerBundle`` together (MemoryX answers such a
        run as one message). Sizes from the last pass: a pass's first asks go one by one.
        A run stops at a step's end (a pass of several steps): MemoryX sends the next
        step's layers once this step's updates are in, and those wait for what it holds."""
        run = [request]
        total = layer_bytes.get((request.layer, request.phase))
        if total is None:
            return run
        stub = self._stub(request)
        for after in ready:
            size = layer_bytes.get((after.layer, after.phase))
            if (
                after.without_weights
                or size is None
                or total + size > BUNDLE_MAX_BYTES
                or self._stub(after) is not stub
                or after.step != request.step
            ):
                break
            run.append(after)
            total += size
        return run

    async def ask(self, requests: list[LayerRequest]) -> None:
        """Ask for consecutive layers of the pass, all from one server, in one message."""
        # A call that is over refuses it: its end fails the layer's read.
        await self._call(self._stub(requests[0])).call.send(weights_requests_to_wire(requests))

    async def header(self, request: LayerRequest) -> tuple[Header, AsyncIterator[StreamItem]]:
        """The header of ``request``'s layer (marked with its place in the pass), and the
        stream its chunks follow on."""
        items = self._call(self._stub(request)).items
        header = await anext(items, None)
        if not isinstance(header, Header):
            raise WireError("each layer of a pass stream starts with a header")
        if (header.layer, header.step, header.phase) != (
            request.layer,
            request.step,
            request.phase,
        ):
            raise WireError(
                f"MemoryX sent layer {header.layer} step {header.step} phase {header.phase} "
                f"for a request of layer {request.layer} step {request.step} phase "
                f"{request.phase}"
            )
        return _placed(header, request), items

    def close(self, *, cancel: bool) -> None:
        """No more requests: the calls go back to the pool for the next pass, every answer
        asked for having been read (``cancel``: the calls end instead)."""
        self._closed = True
        calls, self._calls = self._calls, {}
        for stub, stream in calls.items():
            if cancel:
                stream.call.cancel()
            else:
                self._servicer.stream_pool.give_back(("memoryx", id(stub)), stream)


def _placed(header: Header, request: LayerRequest) -> Header:
    """``header`` marked with ``request``'s pass: its id (the nodes order its layers by it)
    and its place (SwarmX nodes below send it on the pass's streams)."""
    return dataclasses.replace(
        header,
        pass_id=request.pass_id,
        pass_position=request.pass_position,
        pass_length=request.pass_length,
    )


class _PassRequests:
    """The driver's requests of one pass, checked, one by one as they come. Those a message
    brought together (``LayerRequest.following``) and not read yet are ``ready``: the root
    asks MemoryX for their weights together."""

    def __init__(self, servicer: Any, request_iterator: AsyncIterator):
        self._servicer = servicer
        self._messages = aiter(request_iterator)
        self.ready: collections.deque[LayerRequest] = collections.deque()
        self._num_checked = 0
        self._first: LayerRequest | None = None

    async def next(self) -> LayerRequest | None:
        """The next request (None: the stream ended before a pass began)."""
        if not self.ready:
            message = await anext(self._messages, None)
            if message is None:
                return checked_pass_request(self._servicer, None, self._num_checked, self._first)
            for part in unfolded(message):
                request = checked_pass_request(self._servicer, part, self._num_checked, self._first)
                self._first = self._first or request
                self._num_checked += 1
                self.ready.append(request)
        return self.ready.popleft()

    def more(self) -> bool:
        """Whether the message that brought the pass's last requests brought more (the
        next pass on the stream comes in a message of its own)."""
        return bool(self.ready)


class _RootRelay(Relay):
    """One ``RunPass`` call at the root: the driver's requests read, each layer's weights
    from MemoryX put on the children's streams."""

    def __init__(self, servicer: Any, context: grpc.aio.ServicerContext):
        super().__init__(servicer, context)
        self.room = asyncio.Semaphore(MAX_IN_FLIGHT)
        self._weights = _LoopWeights(servicer, time_left_s(context))
        # The layers being put on the children's streams, each a task that waits for the
        # one before it: the reader goes on reading requests (and asking MemoryX for their
        # weights) while a layer streams, as the threaded pass does. Their requests, alike.
        self._sending: list[asyncio.Task] = []
        self._requests: list[LayerRequest] = []

    def cancel(self) -> None:
        super().cancel()
        self._weights.close(cancel=True)

    def ended(self, finished: bool) -> None:
        for task in self._sending:
            task.cancel()
        self._weights.close(cancel=not finished)
        super().ended(finished)

    async def read_requests(self, request_iterator: AsyncIterator) -> None:
        """Check and start each request in turn, at most ``MAX_IN_FLIGHT`` unanswered; the
        request after those is read and its weights asked for while they are under way."""
        num_read = 0
        asked = 0  # the pass position up to which weights are asked for
        first: LayerRequest | None = None
        try:
            requests = _PassRequests(self._servicer, request_iterator)
            while first is None or num_read < first.pass_length:
                request = await requests.next()
                if request is None:
                    self.stream_over = True  # the driver ended its stream between passes
                    return
                first = first or request
                self.pass_length = first.pass_length
                if not request.without_weights and request.pass_position > asked:
                    run = self._weights.asked_with(
                        request, requests.ready, self._servicer.layer_bytes
                    )
                    await self._weights.ask(run)
                    asked = run[-1].pass_position
                await self.room.acquire()
                if self.error is not None:
                    return
                num_read += 1
                before = self._sending[-1] if self._sending else None
                self._requests.append(request)
                self._sending.append(asyncio.ensure_future(self._run_after(before, request)))
            if self._sending and not await self._sending[-1]:
                return  # a layer failed, and with it the pass
            self._weights.close(cancel=False)
            if requests.more():
                raise WireError(f"a pass of pass_length {first.pass_length} has more requests")
        except Exception as exc:
            self.fail(exc)
        finally:
            self.answers.put_nowait(ReadDone(num_read))

    async def _run_after(self, before: asyncio.Task | None, request: LayerRequest) -> bool:
        """``_run`` once the layer before (``before``) is on the children's streams; False
        if it or this one failed (the pass has failed)."""
        try:
            if before is not None and not await before:
                return False
            return await self._run(request)
        except Exception as exc:
            self.fail(exc)
            return False

    async def _run(self, request: LayerRequest) -> bool:
        """Put ``request``'s layer on every child's stream; False if a child's is over."""
        if request.without_weights:  # (DFA backward) a header-only stream
            header = Header(
                layer=request.layer,
                step=request.step,
                phase=request.phase,
                sender=self._servicer.name,
            )
            header, items = _placed(header, request), None
        else:
            header, items = await self._weights.header(request)
        key = (header.layer, header.phase)
        if key in self._waiting:
            raise WireError(f"layer {header.layer} phase {header.phase} came twice in one pass")
        if not self.links:
            self.open_links()
        layer = self._waiting[key] = RelayedLayer(header, len(self.links))
        self._servicer.layer_bytes[key] = header.total_bytes
        position = request.pass_position
        if not await self._send_layer(layer, items, hold=lambda: self._next_joins(position)):
            return False
        layer.sent = True
        self._settle(key, layer)
        return True

    def _next_joins(self, position: int) -> bool:
        """Whether the layer after the one at ``position`` of the pass, small as well, is
        to go with the small layers held back: its request is read and has a place in the
        window, it needs weights, and the last pass's layer of its kind fit with them into
        one message. (Sizes from the last pass: a pass's first layers go one by one.) Not
        across a step's end: the next step's first layer waits for this step's updates."""
        if len(self._requests) <= position:
            return False
        after = self._requests[position]  # (positions count from 1)
        if after.step != self._requests[position - 1].step:
            return False
        size = self._servicer.layer_bytes.get((after.layer, after.phase))
        return not after.without_weights and size is not None and self.held.fits(size)


async def root_pass(servicer: Any, request_iterator: AsyncIterator, context) -> AsyncIterator:
    """The answers to a ``RunPass`` call at root ``servicer``, as each layer completes
    (those complete at once together, ``answered``): its passes one after another (the
    driver keeps its stream from one pass to the next, ``proto.clients.SwarmXClient``)."""
    messages = aiter(request_iterator)
    while True:
        relay = _RootRelay(servicer, context)
        # Closed with the call (the driver cancelled it), not whenever it is collected.
        reading = answered(relay, relay.read_requests(messages))
        async with contextlib.aclosing(reading) as answers:
            async for acks in answers:
                yield acks
        if relay.stream_over:
            return


__all__ = ["root_pass"]
