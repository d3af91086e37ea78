"""SwarmX gRPC service: one broadcast/reduce node of the tree.

Down: each weight chunk is put on every child's outgoing stream as soon as
it arrives (cut-through); the node never holds a whole layer. Up: gradient
chunks from the children are summed chunk by chunk (see ``ChunkReduction``)
and each sum goes to the parent, or to MemoryX at the root, at once
(swarmx/reducing.py; a pipelined pass's sums on one stream per receiver).
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import grpc

from proto import memoryx_pb2_grpc as mgrpc
from proto import swarmx_pb2_grpc as sgrpc
from proto import tensor_pb2 as pb
from proto.domain import (
    Chunk,
    Header,
    LayerAck,
    LayerRequest,
    LinkStats,
    Phase,
    StreamItem,
    SwarmXStats,
)
from proto.frames import (
    BUNDLE_MAX_BYTES,
    WireError,
    from_wire_stream,
    recast_chunk,
    recast_header,
)
from proto.kept_streams import StreamPool
from proto.loop_server import (
    LoopServer,
    SyncOnLoop,
    loop_stream_errors,
    start_loop_server,
    threaded_stream_handler,
)
from proto.messages import (
    EMPTY,
    ack_to_wire,
    acks_in_messages,
    layer_request_from_wire,
    swarmx_stats_to_wire,
    weights_request_to_wire,
)
from proto.rpc import (
    CANCEL_CHECK_S,
    Security,
    StepConflict,
    channel,
    notifier,
    rpc_errors,
    rpc_stream_errors,
    time_left_s,
)
from proto.wire import fast_channel
from proto.wire import register as register_fast
from swarmx.gradient_link import GradientLink
from swarmx.pass_link import QUEUE_DEPTH, PassLink, child_results, drain, put
from swarmx.pass_relay import relay_pass
from swarmx.pass_root import root_pass
from swarmx.pass_run import PassRun
from swarmx.pieces import END, SplitLayer, joined_weights
from swarmx.reducing import ReduceSide, Reducing
from swarmx.reducing_loop import LoopReduceSide

_PHASES = tuple(Phase)


def _marked(
    stream: Iterable[StreamItem | pb.LayerMessage], request: LayerRequest
) -> Iterator[StreamItem]:
    """``stream`` with its header marked as of ``request``'s pass: its id (the nodes order
    its layers by it), and its place in the pass (SwarmX nodes below the root send it on
    the pass's streams to their compute nodes)."""
    for item in from_wire_stream(stream):
        if isinstance(item, Header):
            item = dataclasses.replace(
                item,
                pass_id=request.pass_id,
                pass_position=request.pass_position,
                pass_length=request.pass_length,
            )
        yield item


def _check_place(pass_id: int, position: int, length: int) -> None:
    """WireError unless a layer's place in its pass (a request's or a header's) is valid."""
    if not (pass_id and 1 <= position <= length):
        raise WireError(
            f"pass_position {position} of pass_length {length} "
            "needs a pass_id and 1 <= pass_position <= pass_length"
        )


@dataclass
class _LinkCounter:
    payload_bytes: int = 0
    num_chunks: int = 0


class SwarmXServicer(ReduceSide, sgrpc.SwarmXServicer, sgrpc.LayerSinkServicer):
    def __init__(self, name: str, *, security: Security):
        self.name = name
        self.security = security  # of the channels to children, parent and MemoryX
        self.children: tuple[str, ...] = ()
        self._child_stubs: list[sgrpc.LayerSinkStub] = []
        self._parent: sgrpc.SwarmXStub | None = None
        # At the root: the MemoryX servers by the first layer each holds (sorted).
        self._memoryx: list[tuple[int, mgrpc.MemoryXStub]] = []
        # At the root: layers split over several MemoryX servers, and those servers' stubs.
        self._split: dict[int, SplitLayer] = {}
        self._split_stubs: list[mgrpc.MemoryXStub] = []
        self._is_root = False
        # At the root: each (layer, phase)'s payload bytes in the last pass that sent it, so
        # that a run of small layers can go to the children as one message (pass_root).
        self.layer_bytes: dict[tuple[int, int], int] = {}
        # Open sums by (layer, step, pass id), and the gradient streams of the pass last
        # reduced here, by receiver (swarmx.reducing).
        self._reducing: dict[tuple[int, int, int], Reducing] = {}
        self._gradient_links: tuple[int, dict[int, GradientLink]] | None = None
        self._links_lock = threading.Lock()
        self._lock = threading.Lock()
        self._down: dict[str, _LinkCounter] = {}
        self._up = _LinkCounter()
        self._reduced_in = 0
        #: Wire dtype of each child's subtree where it differs from what arrives (mixed groups).
        self._recast: list[str | None] = []
        self._dtype: str | None = None
        # The pass whose layers go to the compute-node children on DeliverPass streams, and
        # the last (pass id, position) fully put on them.
        self._links: tuple[int, dict[int, PassLink]] | None = None
        self._pass_turn = threading.Condition()
        self._pass_done: tuple[int, int] | None = None
        # The passes relayed here from the parent now (swarmx.pass_relay), each with its
        # streams to the children; the streams kept between passes (proto.kept_streams).
        self.relays: set = set()
        self.stream_pool = StreamPool(idle_limit_s=security.stream_idle_s / 2)
        self._loop_reduce = LoopReduceSide(self)
        self._threaded_reduce_pass = threaded_stream_handler(self._reduce_pass_on_threads)
        self._threaded_run_pass = threaded_stream_handler(self._run_pass_on_threads)

    def connect(
        self,
        *,
        children: dict[str, str],
        parent: str | None,
        memoryx: str | dict[int, str] | None,
        child_dtypes: dict[str, str] | None = None,
        dtype: str | None = None,
        memoryx_split: dict[int, list[tuple[str, list[tuple]]]] | None = None,
    ) -> None:
        """Wire this node into the tree: children by name -> address, and one upstream.

        ``memoryx`` (root only) is one server's address, or the servers of a sharded
        MemoryX by the first whole layer each holds: each layer goes to the server that owns
        it. ``memoryx_split`` gives the layers split over several servers: per layer, each
        owner's address and pieces ``(key, name, shape, start, stop)``, in element order.
        A heterogeneous cluster gives ``dtype``, the weights' dtype arriving here, and
        ``child_dtypes``, what each child takes: weights are rounded per child on the way.
        Called again when a neighbour was replaced: sums still open from the
        interrupted pass can never complete, so they are ended first.
        """
        assert (parent is None) != (memoryx is None), "exactly one upstream: a parent or MemoryX"
        self._end_reductions("the tree was rewired")
        with self._lock:
            links, self._links = self._links, None
        for link in (links[1] if links else {}).values():
            link.cancel()  # a pass interrupted by the rewiring is run again
        for relay in list(self.relays):
            relay.cancel()
        self.stream_pool.clear()
        self.children = tuple(children)
        self._child_stubs = [
            sgrpc.LayerSinkStub(fast_channel(channel(a, self.security))) for a in children.values()
        ]
        self._parent = (
            sgrpc.SwarmXStub(fast_channel(channel(parent, self.security))) if parent else None
        )
        servers = {0: memoryx} if isinstance(memoryx, str) else dict(memoryx or {})
        addresses = sorted({a for owners in (memoryx_split or {}).values() for a, _ in owners})
        # One stub per server: a pass's gradients go to each server on one stream.
        stubs = {
            a: mgrpc.MemoryXStub(fast_channel(channel(a, self.security)))
            for a in {*servers.values(), *addresses}
        }
        self._memoryx = [(first, stubs[a]) for first, a in sorted(servers.items())]
        self._is_root = memoryx is not None
        self._split_stubs = [stubs[a] for a in addresses]
        self._split = {
            layer: SplitLayer.from_plain([(addresses.index(a), pieces) for a, pieces in owners])
            for layer, owners in (memoryx_split or {}).items()
        }
        self._down = {c: _LinkCounter() for c in self.children}
        self._dtype = dtype
        self._recast = [
            None
            if dtype is None or (child_dtypes or {}).get(c, dtype) == dtype
            else child_dtypes[c]
            for c in self.children
        ]

    def _per_child(self, item: StreamItem) -> list[StreamItem]:
        """``item`` as each child takes it: as it came, or its weights rounded."""
        if not any(self._recast):
            return [item] * len(self._recast)
        converted: dict[str, StreamItem] = {}
        out = []
        for target in self._recast:
            if target is None:
                out.append(item)
                continue
            if target not in converted:
                if isinstance(item, Header):
                    recast = recast_header(item, self._dtype, target)
                elif isinstance(item, Chunk):
                    if item.dtype != self._dtype:
                        raise WireError(
                            f"{self.name} expects weights in {self._dtype}, got {item.dtype}"
                        )
                    recast = recast_chunk(item, target)
                else:
                    recast = item
                converted[target] = recast
            out.append(converted[target])
        return out

    # -- broadcast ---------------------------------------------------------
    def _broadcast(
        self,
        messages: Iterable[StreamItem | pb.LayerMessage],
        context: grpc.ServicerContext,
        passing: LayerRequest | None = None,
        pass_timeout_s: float | None = None,
    ) -> LayerAck:
        """Forward every message to every child as it comes; the sum of the children's answers.

        ``passing``: the layer is one of a pipelined pass sent per pass
        (``LayerRequest.pass_position``): it goes to the children on the pass's
        ``DeliverPass`` streams, after the layer before it in the pass.
        """
        timeout_s = time_left_s(context)
        links: dict[int, PassLink] = {}
        if passing is not None:
            self._await_pass_turn(passing, context)
            links = self._pass_links(passing, pass_timeout_s or timeout_s * passing.pass_length)
        queues: list[queue.Queue | PassLink] = []  # what each child's items are put on
        calls: list = []
        for index, stub in enumerate(self._child_stubs):
            link = links.get(index)
            if link is None:
                q: queue.Queue = queue.Queue(maxsize=QUEUE_DEPTH)
                queues.append(q)
                calls.append(stub.Deliver.future(drain(q), timeout=timeout_s))
            else:
                queues.append(link)
                calls.append(link.slot(passing.layer, passing.phase))
        finished = False

        def cancel_all() -> None:
            if finished:
                return  # the layer is done; the pass's streams go on
            for call in calls:
                call.cancel()

        # If our own caller goes away (a sibling of ours failed), the subtree stops too.
        if not context.add_callback(cancel_all):
            cancel_all()  # our caller is gone already
        header: Header | None = None
        culprit = None  # a child whose call ended mid-stream
        sent = False
        try:
            for item in from_wire_stream(messages):
                # Children get a chunk as the bytes it came in (``Chunk.wire``), unless rounded.
                if header is None:
                    if not isinstance(item, Header):
                        raise WireError("a layer stream must start with a header")
                    header = item
                outgoing = self._per_child(item)
                if isinstance(item, Chunk):
                    for counter, out in zip(self._down.values(), outgoing, strict=True):
                        counter.payload_bytes += len(out.data)
                        counter.num_chunks += 1
                culprit = next(
                    (
                        call
                        for q, call, out in zip(queues, calls, outgoing, strict=True)
                        if not put(q, call, out)
                    ),
                    None,
                )
                if culprit is not None:
                    break
            sent = culprit is None
        except BaseException:
            cancel_all()
            raise
        finally:
            if culprit is not None:
                cancel_all()
            for index, (q, call) in enumerate(zip(queues, calls, strict=True)):
                if index not in links:
                    put(q, call, END)
            if passing is not None:
                self._pass_sent(passing, ok=sent)
        if culprit is not None:
            culprit.result()  # raises the child's error
            raise WireError("a child answered before it had received the whole layer stream")
        acks = child_results(calls)
        finished = True
        if header is None:
            raise WireError("empty layer stream")
        return LayerAck.total(acks, layer=header.layer, step=header.step, phase=header.phase)

    def _await_pass_turn(self, request: LayerRequest, context: grpc.ServicerContext) -> None:
        """Wait until the layer before ``request``'s in its pass is on the pass's streams."""

        def waiting() -> bool:
            return request.pass_position > 1 and self._pass_done != (
                request.pass_id,
                request.pass_position - 1,
            )

        with self._pass_turn:
            if not waiting():
                return
        # The call's end wakes the wait at once; the layer before it sent wakes it too.
        context.add_callback(notifier(self._pass_turn))
        with self._pass_turn:
            while waiting():
                if not context.is_active():
                    raise StepConflict(
                        f"{self.name}: layer {request.layer} of pass {request.pass_id} was "
                        "cancelled while it waited for the layer before it"
                    )
                self._pass_turn.wait(timeout=CANCEL_CHECK_S)

    def _pass_links(self, request: LayerRequest, pass_timeout_s: float) -> dict[int, PassLink]:
        """The pass's stream to each child (by child index; a SwarmX child relays it,
        ``swarmx.pass_relay``), opened by its first layer; the streams of an earlier pass
        that did not finish are cancelled."""
        stale: dict[int, PassLink] = {}
        with self._lock:
            if self._links is None or self._links[0] != request.pass_id:
                if self._links is not None:
                    stale = self._links[1]
                # The streams live as long as the pass.
                self._links = (
                    request.pass_id,
                    {
                        index: PassLink(stub, pass_timeout_s)
                        for index, stub in enumerate(self._child_stubs)
                    },
                )
            links = self._links[1]
        for link in stale.values():
            link.cancel()
        return links

    def _pass_sent(self, request: LayerRequest, *, ok: bool) -> None:
        """A layer of the pass is on its streams (``ok``), or failed: the pass is over."""
        ended: dict[int, PassLink] = {}
        with self._pass_turn:
            with self._lock:
                last = request.pass_position == request.pass_length
                ours = self._links is not None and self._links[0] == request.pass_id
                if ours and (not ok or last):
                    ended = self._links[1]
                    self._links = None
            if ok:
                self._pass_done = (request.pass_id, request.pass_position)
            self._pass_turn.notify_all()
        for link in ended.values():
            if ok:
                link.close()  # its answers still come
            else:
                link.cancel()

    def _memoryx_of(self, layer: int) -> mgrpc.MemoryXStub:
        """The MemoryX server that holds ``layer``."""
        index = bisect.bisect_right([first for first, _ in self._memoryx], layer) - 1
        return self._memoryx[max(index, 0)][1]

    def weight_sources(self, layer: int) -> tuple[SplitLayer | None, list[mgrpc.MemoryXStub]]:
        """Where ``layer``'s weights come from: its split over several MemoryX servers (or
        None) and the servers to ask, in the split's owner order."""
        split = self._split.get(layer)
        if split is None:
            return None, [self._memoryx_of(layer)]
        return split, [self._split_stubs[owner] for owner, _ in split.owners]

    def checked_request(self, message) -> LayerRequest:
        """A ``LayerRequest`` message, checked for a layer phase at this root."""
        if not self._is_root:
            raise WireError(f"{self.name} is not the root of the tree; send layers to the root")
        request = layer_request_from_wire(message)
        if request.phase not in _PHASES:
            raise WireError(f"phase {request.phase} is not FORWARD, BACKWARD or EVAL")
        if request.layer < 0 or request.step < 0:
            raise WireError(f"layer {request.layer} and step {request.step} must not be negative")
        if request.pass_position:
            _check_place(request.pass_id, request.pass_position, request.pass_length)
        return request

    def run_layer(
        self,
        request: LayerRequest,
        weights: Iterable[StreamItem | pb.LayerMessage] | None,
        context: grpc.ServicerContext,
        *,
        pass_timeout_s: float | None = None,
    ) -> LayerAck:
        """Broadcast ``request``'s layer: ``weights`` from MemoryX, or (None: a pass that needs
        no weights, DFA backward) a header-only stream. ``pass_timeout_s``: the deadline of
        the pass's streams to the compute nodes (default: the layer's deadline per layer)."""
        passing = request if request.pass_position else None
        if weights is None:
            weights = [
                Header(
                    layer=request.layer,
                    step=request.step,
                    phase=request.phase,
                    sender=self.name,
                    pass_id=request.pass_id,
                    pass_position=request.pass_position,
                    pass_length=request.pass_length,
                )
            ]
        elif request.pass_id:
            weights = _marked(weights, request)
        return self._broadcast(weights, context, passing, pass_timeout_s)

    @rpc_errors
    def RunLayer(self, request, context):
        request = self.checked_request(request)
        if request.without_weights:
            # The pass needs no weights (DFA backward): nothing from MemoryX.
            return ack_to_wire(self.run_layer(request, None, context))
        split, stubs = self.weight_sources(request.layer)
        sources = [
            stub.StreamWeights(weights_request_to_wire(request), timeout=time_left_s(context))
            for stub in stubs
        ]
        try:
            stream = sources[0] if split is None else joined_weights(split, sources)
            return ack_to_wire(self.run_layer(request, stream, context))
        finally:
            for source in sources:
                source.cancel()  # a no-op unless the broadcast stopped early

    @loop_stream_errors
    async def RunPass(self, request_iterator, context):
        """One pass's layer requests from the driver on one stream, run on the event loop
        (``swarmx.pass_root``); at a root whose MemoryX splits layers over several
        servers, on threads (``_run_pass_on_threads``: the split layers' pieces are joined
        there)."""
        if self._split:
            async for ack in self._threaded_run_pass(request_iterator, context):
                yield ack
            return
        async for acks in root_pass(self, request_iterator, context):
            for message in acks_in_messages(acks, BUNDLE_MAX_BYTES):
                yield message

    @rpc_stream_errors
    def _run_pass_on_threads(self, request_iterator, context):
        for ack in PassRun(self, context).acks(request_iterator):
            yield ack_to_wire(ack)

    @rpc_errors
    def Deliver(self, request_iterator, context):
        """One layer from the parent. A layer of a pass (its header says which) goes to the
        children on the pass's streams, as at the root: one ``DeliverPass`` call per child
        and pass instead of one ``Deliver`` call per child and layer. (A tree sends its
        passes on ``DeliverPass``; this serves a caller that sends layer by layer.)"""
        items = from_wire_stream(request_iterator)
        first = next(items, None)
        stream = items if first is None else itertools.chain((first,), items)
        return ack_to_wire(self._broadcast(stream, context, self.passing_of(first)))

    @loop_stream_errors
    async def DeliverPass(self, request_iterator, context):
        """A pass from the parent on one stream, relayed on the event loop
        (``swarmx.pass_relay``): each layer goes on to the children as it comes, one answer
        per layer as it completes."""
        async for acks in relay_pass(self, request_iterator, context):
            for message in acks_in_messages(acks, BUNDLE_MAX_BYTES):
                yield message

    def passing_of(self, first: StreamItem | None) -> LayerRequest | None:
        """The pass a layer from the parent belongs to, from its header (None: none)."""
        if not isinstance(first, Header) or not (first.pass_position or first.pass_length):
            return None
        _check_place(first.pass_id, first.pass_position, first.pass_length)
        return LayerRequest(
            layer=first.layer,
            step=first.step,
            phase=first.phase,
            dtype=self._dtype or "",
            pass_id=first.pass_id,
            pass_position=first.pass_position,
            pass_length=first.pass_length,
        )

    # -- stats -------------------------------------------------------------
    def stats(self) -> SwarmXStats:
        return SwarmXStats(
            name=self.name,
            down=tuple(
                LinkStats(
                    link=f"{self.name} -> {c}",
                    payload_bytes=v.payload_bytes,
                    num_chunks=v.num_chunks,
                )
                for c, v in self._down.items()
            ),
            up=LinkStats(
                link=f"{self.name} -> up",
                payload_bytes=self._up.payload_bytes,
                num_chunks=self._up.num_chunks,
            ),
            reduced_in_bytes=self._reduced_in,
        )

    def Stats(self, request, context):
        return swarmx_stats_to_wire(self.stats())

    def ResetStats(self, request, context):
        self._down = {c: _LinkCounter() for c in self.children}
        self._up = _LinkCounter()
        self._reduced_in = 0
        return EMPTY


def register(server: grpc.Server, servicer: SwarmXServicer) -> None:
    register_fast(sgrpc.add_SwarmXServicer_to_server, servicer, server)
    register_fast(sgrpc.add_LayerSinkServicer_to_server, servicer, server)


def serve(servicer: SwarmXServicer, host: str, *, security: Security) -> tuple[LoopServer, str]:
    """Serve ``servicer`` on an OS-chosen port of ``host``; the server and its ``host:port``.

    On this process's event loop (``proto.loop_server``), as compute nodes are served: the
    loop reads and writes every call, and each call's handler runs on a pooled thread, as
    this servicer is written for (``SyncOnLoop``).
    """
    return start_loop_server(
        lambda server: register(SyncOnLoop(server), servicer), host, security=security
    )
