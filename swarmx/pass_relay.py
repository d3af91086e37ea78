"""A SwarmX node's ``LayerSink.DeliverPass``: a pass from its parent on one stream,
relayed on the process's event loop.

A parent sends every layer of a pipelined pass to each child on one ``DeliverPass``
stream (``swarmx.pass_link.PassLink``), a SwarmX child as a compute node: a call's
set-up costs several times a small layer's messages. Here the loop that reads the
parent's stream puts each item on the pass's stream to every child as it comes
(cut-through; a small layer gathered into one message, encoded once for all children),
counts the children's answers as the loop reads them, and answers the parent once a layer
has every child's answer. No thread takes part: a relay below the root does nothing that
blocks, and a thread per layer, with a queue between it and the reader, cost more than the
relaying itself (about a third of a SwarmX host's CPU at 192 nodes, benchmarks/README.md).

A compute-node child answers a backward layer with its gradient when it fits one message
(``LayerHeader.gradient_in_answer``, set here): the gradient goes into the layer's sum
(``swarmx.reducing_loop``, with any child's ``ReducePass`` stream), and the layer is
answered once the sum is accepted upstream, the receiver's ``update_applied`` in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import grpc

from proto.domain import Chunk, Header, LayerAck, Phase
from proto.frames import (
    Bundle,
    Bundler,
    HeldLayers,
    PassItems,
    WireError,
    payload_bytes,
)
from proto.kept_streams import OwnedStream
from proto.loop_streams import ClientStream
from proto.messages import acks_from_wire, memoryx_counters
from proto.pass_stream import ReadDone, checked_pass_header
from proto.rpc import time_left_s
from proto.wire import encode

#: Layers of a pass read and not yet answered (a parent keeps two in flight): bounds what
#: a caller can make this node hold.
LAYERS_AHEAD = 4


class RelayedLayer:
    """A layer on its way down: the answers its children gave so far, and (backward) the
    sum of the gradients they answered with."""

    __slots__ = ("header", "acks", "sent", "sum", "summed", "holds_room")

    def __init__(self, header: Header, num_children: int):
        self.header = header
        self.acks: list[LayerAck | None] = [None] * num_children
        self.sent = False  # every item is on every child's stream
        # Whether its answer frees a place in the pass's window (``Relay.room``): a run of
        # small layers sent as one message takes one place, freed by its last layer's.
        self.holds_room = True
        # The sum of the gradients children answered with (``Header.gradient_in_answer``);
        # the layer is answered once its receiver has accepted it.
        self.sum: Any = None
        self.summed: set[int] = set()  # the children whose answers carried their gradient

    def answered(self) -> bool:
        return (
            self.sent
            and all(ack is not None for ack in self.acks)
            and (self.sum is None or self.sum.answer.done())
        )


class Relay:
    """One ``DeliverPass`` call at a SwarmX node: its streams to the children, the layers
    waiting for their answers, and the answers for the parent (``answers``)."""

    def __init__(self, servicer: Any, context: grpc.aio.ServicerContext):
        self._servicer = servicer
        self._context = context
        self._children = servicer.children
        self._stubs = list(servicer._child_stubs)
        self._recast = list(servicer._recast) if any(servicer._recast) else None
        self._timeout_s = time_left_s(context)
        self.answers: asyncio.Queue = asyncio.Queue()
        self.room = asyncio.Semaphore(LAYERS_AHEAD)
        self.links: list[ClientStream] = []
        self._pooled: list[OwnedStream] = []  # the links' entries in the pool, by child
        self.stream_over = False  # the parent's stream ended (``read``)
        self.pass_length: int | None = None  # the pass's layers, once the first is read
        self._whole = False  # (``read``) the pass's last layer is read
        self._links_closed = False  # (``read``) the children's streams end with this pass
        self._waiting: dict[tuple[int, int], RelayedLayer] = {}
        self.error: BaseException | None = None
        # Whole small layers (``Bundle`` s) held back to go to the children as one message
        # with the layers after them (``_send_layer``'s ``hold``), and those layers. A
        # heterogeneous tree, whose children get different bytes, sends layer by layer.
        self.held = HeldLayers()  # a run of small layers held back (``_gather``)
        self._gathered_layers: list[RelayedLayer] = []

    # -- the children's streams (callbacks on the loop) ---------------------------------
    def open_links(self) -> None:
        """The pass's stream to every child: kept from the pass before where it can carry
        this one (``proto.kept_streams``), else new."""
        pool = self._servicer.stream_pool
        self._pooled = []
        for index, stub in enumerate(self._stubs):
            link = pool.take(
                ("child", index),
                lambda timeout_s, wiring, stub=stub, index=index: OwnedStream(
                    stub.DeliverPass, timeout_s, wiring, tag=(index,)
                ),
                self._timeout_s,
            )
            link.owner = self
            self._pooled.append(link)
        self.links = [link.call for link in self._pooled]
        self._servicer.relays.add(self)

    def _answered(self, index: int, message: Any) -> None:
        # A child answers a run of layers it computed at once in one message.
        try:
            acks = acks_from_wire(message)
        except Exception as exc:  # a bad answer or gradient: the pass fails with it
            self.fail(exc)
            return
        for ack in acks:
            self._answered_layer(index, ack)

    def _answered_layer(self, index: int, ack: LayerAck) -> None:
        if self.error is not None:
            return  # the pass is over: a gradient that comes late must not open a sum
        key = (ack.layer, ack.phase)
        layer = self._waiting.get(key)
        if layer is None or layer.acks[index] is not None:
            self.fail(
                WireError(
                    f"{self._children[index]} answered layer {key[0]} phase {key[1]}, "
                    "which was not sent on its pass stream"
                )
            )
            return
        try:
            if ack.gradient:
                self._reduce(index, layer, ack)
        except Exception as exc:  # a bad gradient: the pass fails with it
            self.fail(exc)
            return
        layer.acks[index] = ack
        self._settle(key, layer)

    def _reduce(self, index: int, layer: RelayedLayer, ack: LayerAck) -> None:
        """Child ``index``'s gradient, carried in its answer to ``layer``, into the layer's
        sum (``swarmx.reducing_loop``, where the gradients of ``ReducePass`` streams go)."""
        side = self._servicer
        header, *chunks = ack.gradient
        ack.gradient = ()  # (summed: the answer no longer holds it)
        child = side._check_pass_gradient_header(
            header, self._children[index], layer.header.pass_id
        )
        if (header.layer, header.step) != (layer.header.layer, layer.header.step) or (
            layer.header.phase != Phase.BACKWARD
        ):
            raise WireError(
                f"{child} answered layer {layer.header.layer} phase {layer.header.phase} "
                f"with a gradient of layer {header.layer} step {header.step}"
            )
        reduce = side._loop_reduce
        entry = reduce.open(header, self._context)
        if layer.sum is None:
            layer.sum = entry
            key = (layer.header.layer, layer.header.phase)
            entry.answer.add_done_callback(lambda _: self._settle(key, layer))
        elif layer.sum is not entry:
            raise WireError(f"{child}'s gradient of layer {header.layer} opened a second sum")
        reduce.add_whole(child, header, chunks, entry)
        layer.summed.add(index)

    def _ended(self, index: int, error: BaseException | None) -> None:
        if error is None and any(layer.acks[index] is None for layer in self._waiting.values()):
            error = WireError("a child ended its pass stream before answering")
        if error is not None:
            self.fail(error)

    def _settle(self, key: tuple[int, int], layer: RelayedLayer) -> None:
        # (Called at each thing the layer waits for; its sum's answer comes by a callback
        # the loop runs later, so the layer may be settled by then.)
        if not layer.answered() or self.error is not None or self._waiting.get(key) is not layer:
            return
        header = layer.header
        total = LayerAck.total(layer.acks, layer=header.layer, step=header.step, phase=header.phase)
        if layer.sum is not None:
            # The children that answered with their gradient left it to the sum's receiver
            # to say whether the update was applied.
            try:
                upstream = self._servicer._loop_reduce.result(header, layer.sum)
            except Exception as exc:
                self.fail(exc)
                return
            total.update_applied = upstream.update_applied and all(
                ack.update_applied
                for index, ack in enumerate(layer.acks)
                if index not in layer.summed
            )
            total.memoryx = memoryx_counters(upstream) or total.memoryx
        del self._waiting[key]
        if layer.holds_room:
            self.room.release()
        self.answers.put_nowait(total)

    def fail(self, error: BaseException) -> None:
        """The pass ends with ``error`` (the first one): every child's stream is cancelled,
        and so is every sum of its gradients still open (and with it the stream up)."""
        if self.error is not None:
            return
        self.error = error
        self.answers.put_nowait(error)
        self.room.release()  # a reader waiting for room sees it
        self.cancel()
        self.abandon_sums(f"{self._servicer.name}: {error}")

    def abandon_sums(self, reason: str) -> None:
        """(On the loop.) Fail the sums of the gradients answered here that are still open:
        they can never complete."""
        for layer in list(self._waiting.values()):
            if layer.sum is not None and layer.sum.live:
                self._servicer._loop_reduce.fail(layer.sum, reason)

    def cancel(self) -> None:
        for link in self.links:
            link.cancel()

    def release_links(self) -> None:
        """Every layer of the pass is answered: the children's streams go back to the pool
        for the next pass (a failed pass cancels them instead; those of a pass cut short
        end once they are answered)."""
        if self.error is None and not self._links_closed:
            for index, link in enumerate(self._pooled):
                link.owner = None
                self._servicer.stream_pool.give_back(("child", index), link)
        self._pooled, self.links = [], []

    def ended(self, finished: bool) -> None:
        """The pass is over, every layer answered (``finished``) or not (its streams were
        cancelled). A subclass ends what else it opened."""
        if finished:
            self.release_links()

    # -- the parent's stream ----------------------------------------------------------
    async def read(self, items: PassItems) -> None:
        """Put the items of one pass from the parent's stream on every child's, layer by
        layer, at most ``LAYERS_AHEAD`` unanswered: up to the pass's last layer (its
        ``pass_length``), or to the end of the parent's stream (``stream_over``)."""
        num_read = 0
        try:
            pass_id: int | None = None
            while True:
                await self.room.acquire()
                item = await anext(items, None)
                if item is None:
                    self.stream_over = True
                    if self.links and not self._whole:
                        # The parent ended its stream mid-pass: so do the children's (the
                        # answers still come), and no next pass takes them.
                        for link in self.links:
                            link.close()
                        self._links_closed = True
                    break
                if self.error is not None:
                    break
                header = checked_pass_header(item, pass_id, with_place=True)
                self._servicer.passing_of(header)  # its place in the pass, checked
                pass_id = header.pass_id
                self.pass_length = header.pass_length
                key = (header.layer, header.phase)
                if key in self._waiting:
                    raise WireError(
                        f"layer {header.layer} phase {header.phase} came twice in one pass"
                    )
                if not self.links:
                    self.open_links()
                layer = self._waiting[key] = RelayedLayer(header, len(self.links))
                num_read += 1
                # A run of small layers that came in one message goes on as one.
                if not await self._send_layer(layer, items, hold=items.buffered):
                    return  # a child's stream is over: its end failed the pass
                layer.sent = True
                self._settle(key, layer)
                if header.pass_position == header.pass_length:
                    self._whole = True
                    break  # the next pass on the stream is the next relay's
        except Exception as exc:
            self.fail(exc)
        finally:
            self.answers.put_nowait(ReadDone(num_read))

    async def _send_layer(
        self, layer: RelayedLayer, items: AsyncIterator, hold: Callable[[], bool] | None = None
    ) -> bool:
        """``layer``'s header and chunks, read from ``items`` and put on every child's
        stream as they come; False if a child's stream is over.

        A small layer (one ``Bundle``) is held back while ``hold()`` says that the next
        layer of the pass is on its way (its turn is next, and it has a place in the
        window): the run of small layers then goes as one message (``_gather``), and the
        children answer it with one. Otherwise what is held goes now."""
        header = layer.header
        remaining = header.num_tensors
        if header.phase == Phase.BACKWARD:
            # A compute-node child answers with its gradient, which is summed here
            # (``_reduce``): one message up instead of a ``ReducePass`` stream's two and the
            # layer's answer. (A SwarmX child asks the same of its own children.)
            header = dataclasses.replace(header, gradient_in_answer=True)
        bundlers = [Bundler() for _ in (self._recast or (None,))]
        item: Header | Chunk = header
        while True:
            if not await self._put(item, bundlers, layer, last=remaining == 0):
                return False
            if remaining == 0:
                if hold is not None and self.held:
                    await asyncio.sleep(0)  # the reader, given room, starts the next layer
                    if hold():
                        return True
                return await self._flush_gathered()
            item = await anext(items, None)
            if not isinstance(item, Chunk):
                raise WireError(
                    f"layer {header.layer} of a pass stream ended with {remaining} of "
                    f"{header.num_tensors} tensors still to come"
                )
            if item.offset + len(item.data) >= item.tensor_bytes:
                remaining -= 1

    async def _put(
        self, item: Header | Chunk, bundlers: list[Bundler], layer: RelayedLayer, *, last: bool
    ) -> bool:
        """``item`` on every child's stream (the layer's ``last`` one: what its bundler
        gathered goes too)."""
        if self._recast is None:
            outgoing = [item]
            if isinstance(item, Chunk):
                for counter in self._servicer._down.values():  # (a stats reset replaces them)
                    counter.payload_bytes += len(item.data)
                    counter.num_chunks += 1
        else:
            outgoing = self._servicer._per_child(item)  # weights rounded per child
            if isinstance(item, Chunk):
                for counter, out in zip(self._servicer._down.values(), outgoing, strict=True):
                    counter.payload_bytes += len(out.data)
                    counter.num_chunks += 1
        for index, (bundler, out) in enumerate(zip(bundlers, outgoing, strict=True)):
            ready = bundler.add(out)
            if last:
                ready += bundler.flush()
            if self._recast is None:
                if len(ready) == 1 and isinstance(ready[0], Bundle):
                    if not await self._gather(ready[0], layer):
                        return False
                    continue
                if ready and not await self._flush_gathered():
                    return False
            # Encoded once for every child that takes the same items.
            messages = [encode(m) for m in ready]
            targets = self.links if self._recast is None else (self.links[index],)
            if not await self._send(targets, messages):
                return False
        return True

    async def _gather(self, bundle: Bundle, layer: RelayedLayer) -> bool:
        """Hold back ``layer``, whole in ``bundle``, to go with the small layers held before
        it (what is held goes first if the two would pass ``BUNDLE_MAX_BYTES``). The run
        takes one place in the window: the layer before it gives its place up."""
        size = payload_bytes(bundle.items)
        if not self.held.fits(size) and not await self._flush_gathered():
            return False
        if self._gathered_layers:
            self._gathered_layers[-1].holds_room = False
            self.room.release()
        self.held.add(bundle, size)
        self._gathered_layers.append(layer)
        return True

    async def _flush_gathered(self) -> bool:
        """The small layers held back, to every child as one message; False if a child's
        stream is over."""
        if not self.held:
            return True
        self._gathered_layers = []
        return await self._send(self.links, [encode(self.held.take())])

    @staticmethod
    async def _send(targets, messages: list[bytes]) -> bool:
        for link in targets:
            for message in messages:
                if not await link.send(message):
                    return False
        return True


async def relay_pass(
    servicer: Any, request_iterator: AsyncIterator, context: grpc.aio.ServicerContext
) -> AsyncIterator[list[LayerAck]]:
    """The answers to a ``DeliverPass`` stream at SwarmX node ``servicer``: its passes one
    after another (a parent keeps its stream to a child from one pass to the next,
    ``proto.kept_streams``), each layer's as it completes (those complete at once together);
    the first failure (a bad stream, a child's error) ends the stream, and the end of the
    call (its caller cancelled it) cancels the children's streams."""
    items = PassItems(request_iterator)
    while True:
        relay = Relay(servicer, context)
        # Closed with this stream (its caller cancelled it), not whenever it is collected:
        # its end cancels the children's streams.
        async with contextlib.aclosing(answered(relay, relay.read(items))) as answers:
            async for acks in answers:
                yield acks
        if relay.stream_over:
            return


async def answered(relay: Relay, reading: Coroutine) -> AsyncIterator[list[LayerAck]]:
    """``relay``'s answers, as each layer completes, while ``reading`` (a task) puts the
    layers on the children's streams: the answers to the layers that completed at once
    (a child answered a run of small layers in one message) together, in pass order. The
    first failure ends them, and so does the end of the caller's stream (the children's
    streams are then cancelled)."""
    servicer = relay._servicer
    reader = asyncio.ensure_future(reading)
    finished = False
    try:
        num_answered, num_read = 0, None
        while num_read is None or num_answered < num_read:
            ready = [await relay.answers.get()]
            while not relay.answers.empty():
                ready.append(relay.answers.get_nowait())
            acks = []
            for answer in ready:
                if isinstance(answer, ReadDone):
                    num_read = answer.num_layers
                elif isinstance(answer, BaseException):
                    if acks:
                        yield acks
                    raise answer
                else:
                    acks.append(answer)
            if acks:
                num_answered += len(acks)
                if num_answered == relay.pass_length:
                    # Before the last answer goes up: the next pass may come at once.
                    relay.release_links()
                yield acks
        finished = True
    finally:
        reader.cancel()
        if not finished:
            relay.cancel()
            relay.abandon_sums(f"{servicer.name}: the pass's stream ended")
        relay.ended(finished)
        servicer.relays.discard(relay)
        await asyncio.gather(reader, return_exceptions=True)


__all__ = ["LAYERS_AHEAD", "Relay", "RelayedLayer", "answered", "relay_pass"]
