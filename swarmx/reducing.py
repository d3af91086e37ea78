"""The reduce side of a SwarmX node: gradient streams from its children, summed upward.

Gradient chunks from the children are summed chunk by chunk (``ChunkReduction``) and
each sum goes to the parent, or to MemoryX at the root, at once. A pass's gradient
streams (``ReducePass``) are summed on the event loop (``swarmx.reducing_loop``); this
module keeps the per-layer ``Reduce`` and the threaded pass path a root with split layers
uses. A mixin of ``swarmx.service.SwarmXServicer``, whose state (children, upstream
stubs, lock, counters) it uses.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from proto import memoryx_pb2_grpc as mgrpc
from proto import swarmx_pb2_grpc as sgrpc
from proto import threads
from proto.domain import Chunk, Header, Phase, StreamItem
from proto.frames import WireError, from_wire_stream
from proto.loop_server import loop_stream_errors
from proto.loop_streams import process_loop
from proto.pass_stream import ReadDone
from proto.rpc import StepConflict, is_cancelled, rpc_errors, rpc_stream_errors, time_left_s
from swarmx.gradient_link import GradientLink
from swarmx.pass_link import drain
from swarmx.pass_run import ERROR_GRACE_S
from swarmx.pieces import END, SplitLayer, SplitPush
from swarmx.reduce import ChunkReduction
from swarmx.reducing_loop import LoopReduceSide


@dataclass
class Reducing:
    reduction: ChunkReduction
    upstream: grpc.Future
    outbox: queue.Queue
    num_open: int
    failed: list[str] = field(default_factory=list)

    @property
    def live(self) -> bool:
        """Still able to finish: not failed, and its upstream call not ended (e.g. by deadline)."""
        return not self.failed and not self.upstream.done()


class ReduceSide:
    """``SwarmX.Reduce``: this node's children's gradient streams, summed and sent up."""

    name: str
    children: tuple[str, ...]
    _lock: threading.Lock
    _reducing: dict[tuple[int, int, int], Reducing]
    _links_lock: threading.Lock
    _parent: sgrpc.SwarmXStub | None
    _split: dict[int, SplitLayer]
    _split_stubs: list[mgrpc.MemoryXStub]
    _reduced_in: int
    _up: Any  # the servicer's counter of the bytes sent up
    _memoryx_of: Callable[[int], mgrpc.MemoryXStub]  # the MemoryX server that holds a layer

    _gradient_links: tuple[int, dict[int, GradientLink]] | None
    _loop_reduce: LoopReduceSide  # the sums of the pass streams read on the loop
    # ``_reduce_pass_on_threads`` as a loop handler (a root whose MemoryX splits layers).
    _threaded_reduce_pass: Callable[..., AsyncIterator]

    # -- reduce (over the servicer's state: see SwarmXServicer.__init__) ---------------
    def _open_reduction(self, header: Header, context: grpc.ServicerContext) -> Reducing:
        # A pass's reductions are its own: a re-run (a new pass id) never joins a stale one.
        key = (header.layer, header.step, header.pass_id)
        stale: list[GradientLink] = []
        stale_sums: list[Reducing] = []
        with self._lock:
            entry = self._reducing.get(key)
            # A failed attempt of this layer and step may linger, or one whose upstream call
            # ended (its deadline passed); a re-run starts afresh.
            if entry is None or not entry.live:
                outbox: queue.Queue = queue.Queue()

                def emit(item: StreamItem) -> None:
                    if isinstance(item, Chunk):
                        self._up.payload_bytes += len(item.data)
                        self._up.num_chunks += 1
                    outbox.put(item)

                reduction = ChunkReduction(self.children, emit)
                # The sum goes up under the deadline of the child stream that opened it.
                timeout_s = time_left_s(context)
                if header.pass_id:
                    stale = self._stale_links(header.pass_id)
                    # Sums of an earlier pass that did not finish: they never will.
                    stale_sums = [
                        self._reducing.pop(k)
                        for k in list(self._reducing)
                        if k[2] and k[2] != header.pass_id
                    ]
                split = self._split.get(header.layer) if self._parent is None else None
                if self._parent is not None:
                    upstream = self._push(self._parent.Reduce, self._parent.ReducePass)(
                        header, drain(outbox), timeout_s
                    )
                elif split is not None:
                    upstream = SplitPush(
                        split,
                        lambda o: _LayerPush(self, self._split_stubs[o], header),
                        outbox,
                        timeout_s,
                    )
                else:
                    stub = self._memoryx_of(header.layer)
                    upstream = self._push(stub.PushGradients, stub.PushPass)(
                        header, drain(outbox), timeout_s
                    )
                entry = Reducing(reduction, upstream, outbox, num_open=len(self.children))
                self._reducing[key] = entry
        for link in stale:
            link.cancel()  # of an earlier pass that did not finish: it is run again
        for old in stale_sums:
            self._fail(old, f"pass {header.pass_id} runs the step again")
        return entry

    def _push(self, per_layer, per_pass) -> Callable[[Header, Iterator, float], Any]:
        """How a layer's sum goes up: on its own call (``per_layer``, a layer outside a
        pipelined pass), or on the pass's one stream to that receiver (``per_pass``)."""

        def push(header: Header, messages: Iterator, timeout_s: float):
            if not header.pass_id:
                return per_layer.future(messages, timeout=timeout_s)
            with self._links_lock:
                links = self._gradient_links[1] if self._gradient_links else {}
                link = links.get(id(per_pass))
                if link is None or link.ended:  # (a stream cancelled or refused is no use)
                    # It lives as long as the pass's gradients: under the deadline of the child
                    # stream that opened it (a pass stream's deadline is its layers' summed).
                    link = GradientLink(per_pass, header.pass_id, timeout_s)
                    links[id(per_pass)] = link
                    self._gradient_links = (header.pass_id, links)
            return link.send(header.layer, header.step, messages)

        return push

    def _stale_links(self, pass_id: int) -> list[GradientLink]:
        """Forget the gradient streams of a pass before ``pass_id``; those not closed (the
        pass did not finish) are returned to be cancelled."""
        with self._links_lock:
            if self._gradient_links is None or self._gradient_links[0] == pass_id:
                return []
            links = self._gradient_links[1]
            self._gradient_links = None
        return [link for link in links.values() if not link.closed]

    def _end_reductions(self, reason: str) -> None:
        """End every open sum and pass stream (the tree was rewired: they cannot complete)."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: the process exits
            process_loop().call_soon_threadsafe(self._loop_reduce.end_all, reason)
        with self._lock:
            lingering = list(self._reducing.values())
            self._reducing.clear()
        for entry in lingering:
            self._fail(entry, reason)
        with self._links_lock:
            links, self._gradient_links = self._gradient_links, None
        for link in (links[1] if links else {}).values():
            link.cancel()

    def _check_gradient_header(self, header: StreamItem | None, sender: str | None = None) -> str:
        """A gradient stream's header, checked before a reduction (and its upstream stream)
        is opened for it; the child that sent it."""
        if not isinstance(header, Header):
            raise WireError("a gradient stream must start with a header")
        child = header.sender
        if child not in self.children:
            raise WireError(f"gradient stream from {child!r}, which is not a child of {self.name}")
        if sender is not None and child != sender:
            raise WireError(f"a gradient pass stream of {sender!r} carries a layer of {child!r}")
        if header.phase != Phase.BACKWARD:
            raise WireError(f"a gradient stream has phase BACKWARD, not {header.phase}")
        if min(header.layer, header.step, header.num_tensors, header.total_bytes) < 0:
            raise WireError("a gradient header's layer, step, num_tensors and total_bytes are >= 0")
        return child

    def _check_pass_gradient_header(
        self, header: StreamItem | None, sender: str | None, pass_id: int | None
    ) -> str:
        """``_check_gradient_header`` for a layer of a gradient pass stream whose first layer
        (if any yet) came from ``sender`` with ``pass_id``."""
        child = self._check_gradient_header(header, sender)
        if header.pass_id <= 0 or pass_id not in (None, header.pass_id):
            raise WireError(
                f"each layer of a gradient pass stream has the pass id of its first "
                f"({pass_id}), not {header.pass_id}"
            )
        return child

    def _add_layer(self, child: str, header: Header, entry: Reducing, chunks: Iterator) -> None:
        """One child's stream of one layer into its sum; a bad one fails the sum."""
        received = 0
        try:
            entry.reduction.add_header(child, header, self.name)
            for index, chunk in enumerate(chunks):
                if not isinstance(chunk, Chunk):
                    raise WireError(f"child {child!r} sent a second header")
                entry.reduction.add_chunk(child, index, chunk)
                received += len(chunk.data)
        except BaseException as exc:
            self._fail(entry, f"{child}: {exc}")
            self._close(header, entry)
            raise
        with self._lock:
            self._reduced_in += received

    def _answer(self, header: Header, entry: Reducing):
        """The layer's answer from upstream (the wire ack), once its sum is accepted there."""
        try:
            return entry.upstream.result()
        except (grpc.FutureCancelledError, grpc.RpcError):
            if not entry.failed:
                raise
            raise StepConflict(
                f"{self.name} abandoned the gradient of layer {header.layer} step {header.step}: "
                + "; ".join(entry.failed)
            ) from None

    @rpc_errors
    def Reduce(self, request_iterator, context):
        items = from_wire_stream(request_iterator)
        header = next(items, None)
        child = self._check_gradient_header(header)
        entry = self._open_reduction(header, context)
        self._add_layer(child, header, entry, items)
        done = threading.Event()

        def abandoned() -> None:
            # This child went away (cancelled) while its siblings still wait for the sum:
            # the sum can never be complete, so end it for everyone instead of hanging.
            if not done.is_set():
                self._fail(entry, f"{child} cancelled its gradient stream")

        if not context.add_callback(abandoned):
            abandoned()  # this child is gone already
        self._close(header, entry)
        try:
            return self._answer(header, entry)
        finally:
            done.set()

    @loop_stream_errors
    async def ReducePass(self, request_iterator, context):
        """A child's gradient layers of one pipelined pass on one stream, summed on the
        event loop (``swarmx.reducing_loop``); at a root whose MemoryX holds layers split
        over several servers, on threads (``_reduce_pass_on_threads``, whose split pushes
        are written for them)."""
        if self._parent is None and self._split:
            handler = self._threaded_reduce_pass
        else:
            handler = self._loop_reduce.reduce_pass
        async for ack in handler(request_iterator, context):
            yield ack

    @rpc_stream_errors
    def _reduce_pass_on_threads(self, request_iterator, context):
        """``ReducePass`` on threads.

        A thread reads each layer into its sum as it comes (as ``Reduce`` does); each
        layer's answer is sent once its sum is accepted upstream, in the order read, while
        later layers still stream. A child that goes away fails its open sums.
        """
        items = from_wire_stream(request_iterator)
        answers: queue.Queue = queue.Queue()
        lock = threading.Lock()
        unanswered: list[Reducing] = []
        gone: list[bool] = []
        failure: list[BaseException] = []  # why the reader stopped early
        read_over = threading.Event()

        def abandoned() -> None:
            # The child went away (or sent a bad stream): its open sums can never complete.
            with lock:
                gone.append(True)
                entries = list(unanswered)
            for entry in entries:
                self._fail(entry, f"{child or 'a child'} ended its gradient pass stream")

        child: str | None = None

        def read() -> None:
            nonlocal child
            num_read = 0
            try:
                pass_id = None
                while (header := next(items, None)) is not None:
                    child = self._check_pass_gradient_header(header, child, pass_id)
                    pass_id = header.pass_id
                    entry = self._open_reduction(header, context)
                    with lock:
                        unanswered.append(entry)
                        stop = bool(gone)
                    if stop:
                        self._fail(entry, f"{child} ended its gradient pass stream")
                    self._add_layer(child, header, entry, _layer_chunks(header, items))
                    self._close(header, entry)
                    answers.put((header, entry))
                    num_read += 1
            except BaseException as exc:
                failure.append(exc)
                answers.put(exc)
                abandoned()  # its sums read so far fail now, not at their deadline
            finally:
                read_over.set()
                answers.put(ReadDone(num_read))

        if not context.add_callback(abandoned):
            abandoned()
        threads.start(read, name=f"{self.name}-reduce-pass")
        num_answered = 0
        num_read = None
        while num_read is None or num_answered < num_read:
            answer = answers.get()
            if isinstance(answer, ReadDone):
                num_read = answer.num_layers
            elif isinstance(answer, BaseException):
                abandoned()
                raise answer
            else:
                header, entry = answer
                try:
                    ack = self._answer(header, entry)
                except Exception as exc:
                    if is_cancelled(exc):
                        # Most likely the child's bad stream cancelled the pass's stream up
                        # (a failed sum cancels it): the reader is about to say why.
                        read_over.wait(ERROR_GRACE_S)
                    if failure:  # the child's stream failed it: that is the error to answer
                        raise failure[0] from None
                    raise
                with lock:
                    unanswered.remove(entry)
                num_answered += 1
                yield ack

    def _fail(self, entry: Reducing, reason: str) -> None:
        with self._lock:
            entry.failed.append(reason)
            # End the upstream stream now so that it is not left waiting.
            entry.outbox.put(END)
        entry.upstream.cancel()

    def _close(self, header: Header, entry: Reducing) -> None:
        key = (header.layer, header.step, header.pass_id)
        with self._lock:
            entry.num_open -= 1
            if entry.num_open != 0:
                return
            entry.outbox.put(END)
            if self._reducing.get(key) is entry:
                del self._reducing[key]
        if header.pass_id and header.layer == 0:
            # Backward layer 0 is a pass's last: its gradient streams end (answers still come).
            with self._links_lock:
                links = self._gradient_links
            if links is not None and links[0] == header.pass_id:
                for link in links[1].values():
                    link.close()


class _LayerPush:
    """A split layer's part for one owner, pushed as ``SwarmXServicer._push`` pushes a layer:
    quacks like the stub method ``SplitPush`` calls ``future`` on."""

    def __init__(self, side: ReduceSide, stub: mgrpc.MemoryXStub, header: Header):
        self._push = side._push(stub.PushGradients, stub.PushPass)
        self._header = header

    def future(self, messages: Iterator, timeout: float):
        return self._push(self._header, messages, timeout)


def _layer_chunks(header: Header, items: Iterator[StreamItem]) -> Iterator[StreamItem]:
    """The chunks of ``header``'s layer on a stream of several layers: until each of its
    ``num_tensors`` tensors is complete (a tensor's last chunk reaches its tensor_bytes)."""
    left = header.num_tensors
    while left > 0:
        item = next(items, None)
        if item is None:
            raise WireError(
                f"a gradient pass stream ended in layer {header.layer} ({left} of "
                f"{header.num_tensors} tensors to come)"
            )
        if isinstance(item, Chunk) and item.offset + len(item.data) >= item.tensor_bytes:
            left -= 1
        yield item
