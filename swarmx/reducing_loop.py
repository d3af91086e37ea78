"""``SwarmX.ReducePass`` on the process's event loop: a child's gradient layers of one pass,
summed with its siblings' and sent up as each chunk's sum is ready.

The loop that reads a child's stream adds each chunk to its layer's sum (``ChunkReduction``,
as ``swarmx.reducing`` does on threads), and the sums go up on one stream per pass and
receiver (the parent's ``ReducePass``, or at the root MemoryX's ``PushPass``), written by
one task that sends the layers whole and in the order they were opened. Each layer is
answered to the child once the receiver accepts its sum. A compute node's gradient that
came whole in its answer to the layer (``swarmx.pass_relay``) joins the same sum
(``add_whole``). No thread takes part: a thread
per stream, a feeder per layer and the queues between them cost a SwarmX node more than
its sums (benchmarks/README.md).

A child that sends a bad stream, or goes away, fails the sums it has a part in, which
cancels the pass's stream up; its siblings are told why (FAILED_PRECONDITION) at once. A
new pass ends the sums and streams of an earlier one that did not finish.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from typing import Any

import grpc

from proto.domain import Chunk, Header
from proto.frames import (
    Bundle,
    Bundler,
    HeldLayers,
    WireError,
    from_wire_stream_async,
    payload_bytes,
)
from proto.kept_streams import KeptStream, StreamPool
from proto.loop_streams import ClientStream
from proto.messages import unfolded
from proto.pass_stream import ReadDone
from proto.rpc import StepConflict, is_cancelled, time_left_s
from swarmx.pass_run import ERROR_GRACE_S
from swarmx.reduce import ChunkReduction


class _Sum:
    """One layer's sum at this node in one pass: the children's chunks summed as they
    come, the summed items waiting to go up, and the receiver's answer."""

    def __init__(self, side: Any, header: Header, up: _UpStream):
        self.key = (header.layer, header.step, header.pass_id)
        self.up = up
        self.outbox: collections.deque = collections.deque()
        self.reduction = ChunkReduction(side.children, self._emit)
        self._side = side  # counts the bytes sent up (``_up``, replaced by a stats reset)
        self.num_open = len(side.children)  # children whose part is not all in
        self.closed = False  # every child's part is in: the outbox holds the rest
        self.failed: list[str] = []
        self.answer: asyncio.Future = asyncio.get_running_loop().create_future()
        # An answer nobody waits for any more (the pass failed) is not an error to log.
        self.answer.add_done_callback(lambda f: f.cancelled() or f.exception())

    def _emit(self, item: Any) -> None:
        if isinstance(item, Chunk):
            counter = self._side._up
            counter.payload_bytes += len(item.data)
            counter.num_chunks += 1
        self.outbox.append(item)

    @property
    def live(self) -> bool:
        """Still able to finish: not failed, and not answered (nor its stream over)."""
        return not self.failed and not self.answer.done()


class _UpStream(KeptStream):
    """One pass's summed layers to one receiver, on one stream: each layer whole, in the
    order its sum opened (``add``); each answer settles its layer's ``_Sum``.

    ``kept`` (MemoryX's ``PushPass``, which reads one pass after another): the stream
    carries the next pass too; once its pass's last sum is answered it goes back to the
    node's stream pool (``proto.kept_streams``) instead of ending."""

    def __init__(
        self,
        method: Any,
        pass_id: int,
        timeout_s: float,
        wiring: int = 0,
        *,
        kept: tuple[StreamPool, Any] | None = None,
    ):
        self.pass_id = pass_id
        self._sums: collections.deque[_Sum] = collections.deque()  # not yet all sent
        self._waiting: dict[tuple[int, int], _Sum] = {}  # by (layer, step): not answered
        self._wake = asyncio.Event()
        self.closing = False
        self._kept = kept  # the pool and key to go back to once the pass is answered
        self.pass_over = False  # (kept) the pass's last layer is opened
        self.in_pool = False  # (kept) its pass is answered: it waits for the next
        super().__init__(
            ClientStream(method, timeout_s, self._answered, self._ended), timeout_s, wiring
        )
        self._pump = asyncio.ensure_future(self._send())

    def begin(self, pass_id: int) -> None:
        """(Kept) carry ``pass_id``'s sums from now on."""
        self.pass_id = pass_id
        self.pass_over = self.in_pool = False

    def add(self, entry: _Sum) -> None:
        self._sums.append(entry)
        self._waiting[entry.key[:2]] = entry
        self._wake.set()

    def poke(self) -> None:
        """Something new to send (or a sum closed or failed)."""
        self._wake.set()

    def close(self) -> None:
        """The pass's last layer is opened: the stream ends once its sums are sent (kept:
        it goes back to the pool once they are answered)."""
        if self._kept is not None:
            self.pass_over = True
            self._give_back_if_answered()
            return
        self.closing = True
        self._wake.set()

    def _give_back_if_answered(self) -> None:
        if self.pass_over and not self._waiting and not self._sums and not self.call.done():
            pool, key = self._kept
            self.in_pool = True
            pool.give_back(key, self)

    def cancel(self) -> None:
        self.call.cancel()
        self._pump.cancel()

    async def _idle(self) -> None:
        self._wake.clear()
        await self._wake.wait()

    async def _send(self) -> None:
        # Whole small layers (each a ``Bundle``) are held while the next layer's sum is
        # complete too, and go up together in one message (within ``BUNDLE_MAX_BYTES``):
        # the layers a node answered at once complete at once (the receiver answers such
        # a message in one, ``LayerAck.following``).
        held = HeldLayers()
        while True:
            while not self._sums:
                if self.closing:
                    self.call.close()  # the answers still come
                    return
                await self._idle()
            head = self._sums[0]
            bundler = Bundler()
            while True:
                while head.outbox and not head.failed:
                    for message in bundler.add(head.outbox.popleft()):
                        if not await self._put(message, held):
                            return  # the call is over: its end fails the sums waiting
                if head.failed:
                    return  # the stream is cancelled: no layer after it can complete
                if head.closed and not head.outbox:
                    break
                await self._idle()
            for message in bundler.flush():
                if not await self._put(message, held):
                    return
            self._sums.popleft()
            after = self._sums[0] if self._sums else None
            joins = after is not None and after.closed and not after.failed
            if held and not joins and not await self.call.send(held.take()):
                return

    async def _put(self, message: Any, held: HeldLayers) -> bool:
        """Send ``message`` (a whole small layer: hold it); False if the call is over."""
        if isinstance(message, Bundle):
            size = payload_bytes(message.items)
            if not held.fits(size) and not await self.call.send(held.take()):
                return False
            held.add(message, size)
            return True
        if held and not await self.call.send(held.take()):
            return False
        return await self.call.send(message)

    def _answered(self, message: Any) -> None:
        try:
            answers = unfolded(message, "answer")
        except WireError as exc:
            self._ended(exc)
            self.call.cancel()
            return
        for answer in answers:
            entry = self._waiting.pop((answer.layer, answer.step), None)
            if entry is None:
                self._ended(
                    WireError(
                        f"a gradient pass stream answered layer {answer.layer} step "
                        f"{answer.step}, which was not sent on it"
                    )
                )
                self.call.cancel()
                return
            if not entry.answer.done():
                entry.answer.set_result(answer)
        if self._kept is not None:
            self._give_back_if_answered()

    def _ended(self, error: BaseException | None) -> None:
        if error is None and self._waiting:
            error = WireError("the receiver ended a gradient pass stream before answering")
        waiting = list(self._waiting.values())
        self._waiting.clear()
        for entry in waiting:
            if not entry.answer.done():
                entry.answer.set_exception(error)
        self._pump.cancel()

    @property
    def ended(self) -> bool:
        return self.closing or self.pass_over or self.in_pool or self.call.done()


class _Part:
    """One child's part of one layer's sum, as its items come."""

    __slots__ = ("reduce", "child", "entry", "left", "index", "received")

    def __init__(self, reduce: LoopReduceSide, child: str, header: Header, entry: _Sum):
        self.reduce, self.child, self.entry = reduce, child, entry
        self.left = header.num_tensors  # tensors not yet complete
        self.index = self.received = 0
        try:
            entry.reduction.add_header(child, header, reduce._side.name)
        except BaseException as exc:
            self.failed(exc)
            raise
        entry.up.poke()

    def add(self, item: Any) -> None:
        if not isinstance(item, Chunk):
            raise WireError(f"child {self.child!r} sent a second header")
        self.entry.reduction.add_chunk(self.child, self.index, item)
        self.index += 1
        self.received += len(item.data)
        if item.offset + len(item.data) >= item.tensor_bytes:
            self.left -= 1
        if self.entry.outbox:
            self.entry.up.poke()

    def failed(self, error: BaseException) -> None:
        """A bad part: the sum fails with it."""
        self.reduce.fail(self.entry, f"{self.child}: {error}")
        self.reduce.close_part(self.entry)

    def done(self) -> None:
        self.reduce._side._reduced_in += self.received


class LoopReduceSide:
    """The loop's sums and up streams of a ``SwarmXServicer`` (its ``ReduceSide`` state:
    children, upstream stubs, counters); touched on the loop only."""

    def __init__(self, side: Any):
        self._side = side
        self.sums: dict[tuple[int, int, int], _Sum] = {}
        self._streams: tuple[int, dict[int, _UpStream]] | None = None

    # -- sums ---------------------------------------------------------------------
    def _receiver(self, layer: int) -> Any:
        side = self._side
        if side._parent is not None:
            return side._parent.ReducePass
        return side._memoryx_of(layer).PushPass

    def open(self, header: Header, context: grpc.aio.ServicerContext) -> _Sum:
        entry = self.sums.get((header.layer, header.step, header.pass_id))
        if entry is not None and entry.live:
            return entry
        self._end_other_passes(header.pass_id)
        method = self._receiver(header.layer)
        streams = self._streams[1] if self._streams else {}
        up = streams.get(id(method))
        if up is None or up.ended:
            # It lives as long as the pass's gradients: under the deadline of the child
            # stream that opened it (a pass stream's deadline covers its layers). MemoryX
            # reads one pass after another on its stream: that one is kept.
            timeout_s = time_left_s(context)
            if self._side._parent is None:
                pool, key = self._side.stream_pool, ("up", id(method))
                up = pool.take(
                    key,
                    lambda timeout_s, wiring: _UpStream(
                        method, header.pass_id, timeout_s, wiring, kept=(pool, key)
                    ),
                    timeout_s,
                )
                up.begin(header.pass_id)
            else:
                up = _UpStream(method, header.pass_id, timeout_s)
            streams[id(method)] = up
            self._streams = (header.pass_id, streams)
        entry = self.sums[(header.layer, header.step, header.pass_id)] = _Sum(
            self._side, header, up
        )
        up.add(entry)
        return entry

    def _end_other_passes(self, pass_id: int) -> None:
        """Sums and streams of an earlier pass that did not finish: they never will."""
        stale = [key for key in self.sums if key[2] != pass_id]
        for key in stale:
            self.fail(self.sums.pop(key), f"pass {pass_id} runs the step again")
        if self._streams is not None and self._streams[0] != pass_id:
            streams = self._streams[1]
            self._streams = None
            for up in streams.values():
                if not up.closing and not up.in_pool:  # (in the pool: the next pass's)
                    up.cancel()

    def fail(self, entry: _Sum, reason: str) -> None:
        entry.failed.append(reason)
        entry.up.cancel()  # the pass's stream up: no later layer can complete either

    def close_part(self, entry: _Sum) -> None:
        """One child's part of ``entry`` is all in."""
        entry.num_open -= 1
        if entry.num_open:
            return
        entry.closed = True
        if self.sums.get(entry.key) is entry:
            del self.sums[entry.key]
        entry.up.poke()
        layer, _, pass_id = entry.key
        if pass_id and layer == 0 and self._streams and self._streams[0] == pass_id:
            # Backward layer 0 is a pass's last: its streams end (answers still come).
            for up in self._streams[1].values():
                up.close()

    def end_all(self, reason: str) -> None:
        """End every sum and stream (the tree was rewired: they cannot complete)."""
        sums, self.sums = list(self.sums.values()), {}
        for entry in sums:
            self.fail(entry, reason)
        streams, self._streams = self._streams, None
        for up in (streams[1] if streams else {}).values():
            up.cancel()

    async def answer(self, header: Header, entry: _Sum) -> Any:
        """The layer's answer from upstream, once its sum is accepted there."""
        try:
            return await entry.answer
        except grpc.RpcError:  # (a cancel of the waiting task itself goes on as it is)
            self._explain(header, entry)
            raise

    def result(self, header: Header, entry: _Sum) -> Any:
        """``answer`` of a sum whose answer is in (``entry.answer`` is done)."""
        if entry.answer.cancelled():
            raise StepConflict(f"the sum of layer {header.layer} step {header.step} was dropped")
        try:
            return entry.answer.result()
        except grpc.RpcError:
            self._explain(header, entry)
            raise

    def _explain(self, header: Header, entry: _Sum) -> None:
        """Raise why a failed sum's stream up failed, if it was failed here (else return)."""
        if entry.failed:
            raise StepConflict(
                f"{self._side.name} abandoned the gradient of layer {header.layer} step "
                f"{header.step}: " + "; ".join(entry.failed)
            ) from None

    # -- one child's stream ---------------------------------------------------------
    async def add_layer(self, child: str, header: Header, entry: _Sum, items: Any) -> None:
        """One child's layer into its sum (a bad one fails the sum)."""
        part = _Part(self, child, header, entry)
        try:
            while part.left > 0:
                item = await anext(items, None)
                if item is None:
                    raise WireError(
                        f"a gradient pass stream ended in layer {header.layer} ({part.left} "
                        f"of {header.num_tensors} tensors to come)"
                    )
                part.add(item)
        except BaseException as exc:
            part.failed(exc)
            raise
        part.done()

    def add_whole(self, child: str, header: Header, chunks: list, entry: _Sum) -> None:
        """One child's layer, whole (the child's answer to the layer carried it), into its
        sum; its part is then all in (a bad one fails the sum)."""
        part = _Part(self, child, header, entry)
        try:
            for item in chunks:
                if part.left <= 0:
                    raise WireError(
                        f"child {child!r} answered layer {header.layer} with more chunks than "
                        f"its {header.num_tensors} tensors"
                    )
                part.add(item)
            if part.left > 0:
                raise WireError(
                    f"child {child!r} answered layer {header.layer} with {part.left} of its "
                    f"{header.num_tensors} tensors missing"
                )
        except BaseException as exc:
            part.failed(exc)
            raise
        part.done()
        self.close_part(entry)

    async def reduce_pass(
        self, request_iterator: AsyncIterator, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        """One child's ``ReducePass``: its layers read into their sums as they come, each
        answered (the receiver's wire ack) once its sum is accepted, in the order read."""
        side = self._side
        items = from_wire_stream_async(request_iterator)
        answers: asyncio.Queue = asyncio.Queue()
        mine: list[_Sum] = []  # sums with this child's part, not yet answered to it
        failure: list[BaseException] = []  # why the reader stopped early
        child: str | None = None

        def abandoned() -> None:
            # The child went away (or sent a bad stream): its open sums can never complete.
            for entry in list(mine):
                if entry.live:
                    self.fail(entry, f"{child or 'a child'} ended its gradient pass stream")

        async def read() -> None:
            nonlocal child
            num_read = 0
            try:
                pass_id = None
                while (header := await anext(items, None)) is not None:
                    child = side._check_pass_gradient_header(header, child, pass_id)
                    pass_id = header.pass_id
                    entry = self.open(header, context)
                    mine.append(entry)
                    await self.add_layer(child, header, entry, items)
                    self.close_part(entry)
                    answers.put_nowait((header, entry))
                    num_read += 1
            except Exception as exc:
                failure.append(exc)
                answers.put_nowait(exc)
                abandoned()  # its sums read so far fail now, not at their deadline
            finally:
                answers.put_nowait(ReadDone(num_read))

        reader = asyncio.ensure_future(read())
        finished = False
        try:
            num_answered, num_read = 0, None
            while num_read is None or num_answered < num_read:
                answer = await answers.get()
                if isinstance(answer, ReadDone):
                    num_read = answer.num_layers
                    continue
                if isinstance(answer, BaseException):
                    raise answer
                header, entry = answer
                try:
                    ack = await self.answer(header, entry)
                except Exception as exc:
                    if is_cancelled(exc) and not reader.done():
                        # Most likely the child's bad stream cancelled the pass's stream up
                        # (a failed sum cancels it): the reader is about to say why.
                        await asyncio.wait({reader}, timeout=ERROR_GRACE_S)
                    if failure:  # the child's stream failed it: that is the error to answer
                        raise failure[0] from None
                    raise
                mine.remove(entry)
                num_answered += 1
                yield ack
            finished = True
        finally:
            if not finished:
                abandoned()
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)


__all__ = ["LoopReduceSide"]
