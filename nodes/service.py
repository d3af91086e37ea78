"""Compute-node gRPC service: LayerSink.Deliver plus stats, over a NodeWorker.

The service runs on the process's event loop (``proto.loop_server``): its streams are read
and answered there, and each layer computes on a thread of its own, or, if it is short and
so are the node's layers in passes of its kind (``INLINE_COMPUTE_MAX_S``,
``LONG_LAYER_S``), on the loop.

A layer stream is validated against the layer's layout before the node
computes anything. In the backward pass the node sends its gradients to its
SwarmX parent and answers only when the reduced gradient has reached
MemoryX, so the root's answer means "this layer's update is applied". The
gradients of a pipelined pass (``LayerHeader.pass_id``) go on one
``SwarmX.ReducePass`` stream per pass, each layer still answered on its own;
on a pass stream whose sender asks for it (``LayerHeader.gradient_in_answer``),
a gradient that fits one message goes in the layer's answer instead, and the
parent, which sums it, says when the update is applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
from collections.abc import Callable

import grpc

from nodes.gradient_out import GradientOut
from nodes.worker import NodeStateError, NodeWorker, process_computing
from proto import node_pb2_grpc as ngrpc
from proto import swarmx_pb2_grpc as sgrpc
from proto import threads
from proto.domain import Header, LayerAck, NodeStats, Phase
from proto.frames import BUNDLE_MAX_BYTES, from_wire_stream_async
from proto.loop_server import (
    LoopServer,
    ThreadSideContext,
    loop_errors,
    loop_stream_errors,
    on_thread,
    start_loop_server,
)
from proto.messages import (
    EMPTY,
    ack_from_wire,
    ack_to_wire,
    acks_in_messages,
    node_stats_to_wire,
)
from proto.pass_stream import ReadDone, checked_pass_header
from proto.rpc import CANCEL_CHECK_S, Security, StepConflict, channel, notifier
from proto.serde import (
    DEFAULT_CHUNK_BYTES,
    Expected,
    LayerAssembler,
    WireError,
)
from proto.wire import fast_channel
from proto.wire import register as register_fast

#: Layers of a pass stream read and not yet computed, at most: the one computing and the
#: next one streaming in (as the root keeps two in flight).
PASS_LAYERS_AHEAD = 2
#: A pass layer whose last compute here took less than this (CPU time of the thread that
#: computed it, ``LayerResult.cpu_seconds``) runs on the event loop that read it, s:
#: handing it to a thread and its answer back costs more than such a compute (thread
#: wake-ups and GIL hand-offs: mlp-digits layers compute in 0.1-1 ms).
INLINE_COMPUTE_MAX_S = 0.002
#: ... unless a layer of the node took this long (CPU time) or longer last time in a pass
#: of the same kind (training, or evaluation), s: such a node keeps a thread for each layer
#: of such a pass, short or not, and its loop free to read the next layer while one computes.
#: gpt-10m at 1 node (blocks of 0.1-0.5 s; its embedding and head short) took 1.15x
#: torch's step with its short layers on the loop against 1.10x with none there (medians
#: of five alternating runs, 2026-12-03; benchmarks/README.md).
LONG_LAYER_S = 0.05
#: The computed layers of a pass stream whose futures are kept before the done ones go (a
#: stream carries one pass after another).
_LAYERS_OVER_KEPT = 64


class _PassCall(ThreadSideContext):
    """The context a pass stream's layers see: the call's, which the stream also ends
    (``end``) when it stops, so that layers waiting for their turn give up and their
    gradient calls are cancelled. A pass's gradient stream lives under the pass's deadline."""


class ComputeNodeServicer(ngrpc.ComputeNodeServicer, sgrpc.LayerSinkServicer):
    def __init__(
        self,
        worker: NodeWorker,
        *,
        name: str,
        security: Security,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ):
        self.worker = worker
        self.security = security  # of the channel to the SwarmX parent
        self.name = name
        self._gradients = GradientOut(name, chunk_bytes)  # (its parent: ``connect``)
        # One layer computed at a time, as on the wafer.
        self._lock = threading.Lock()
        # Guards the counters a layer updates after its compute: a backward layer's answer
        # must not wait on the next layer's compute (``_lock``), or the root starts streaming
        # the layer after that only once the node is idle again.
        self._counters_lock = threading.Lock()
        # (pass id, phase, layer) computed last: a pipelined pass computes in order.
        self._turn = threading.Condition()
        self._computed: tuple[int, int, int] | None = None
        # The CPU time each (phase, layer) took to compute last, s (``INLINE_COMPUTE_MAX_S``),
        # and, by kind of pass (evaluation or not), those that took ``LONG_LAYER_S`` or more:
        # while any does, no layer of such a pass runs on the loop.
        self._compute_s: dict[tuple[int, int], float] = {}
        self._long_layers: dict[bool, set[tuple[int, int]]] = {False: set(), True: set()}
        self._reset_counters()

    def _reset_counters(self) -> None:
        self.weight_bytes_received = 0
        self.gradient_bytes_sent = 0
        self.flops = 0.0
        self.compute_seconds = 0.0

    def connect(self, parent: str) -> None:
        self._gradients.parent = sgrpc.SwarmXStub(fast_channel(channel(parent, self.security)))

    @loop_errors
    async def Deliver(self, request_iterator, context):
        items = from_wire_stream_async(request_iterator)
        header = await anext(items, None)
        # Read and checked on the loop, before the node's turn and lock: in a pipelined pass
        # this layer streams in while the node still computes the one before it (the root
        # keeps at most two in flight), and a client that stalls mid-stream (until the
        # stream's idle deadline) holds no thread, let alone the node.
        assembler, params = await self._read_layer(header, items, until_complete=False)
        call = ThreadSideContext(context)
        ack = await on_thread(
            self._run_layer, assembler.header, params, assembler, call, name=f"{self.name}-layer"
        )
        return ack_to_wire(ack)

    @loop_stream_errors
    async def DeliverPass(self, request_iterator, context):
        """The layers of pipelined passes on one stream (``LayerSink.DeliverPass``): the
        parent keeps its stream to the node from one pass to the next
        (``proto.kept_streams``), and a pass begins once the last layer of the one before
        it (its ``pass_length``-th) is read.

        The stream is read on the event loop: each layer is checked and assembled as it
        comes, while the layer before it computes; each layer then runs as ``Deliver`` runs
        it, in pass order, on a thread of its own (a backward layer waits for its reduced
        gradient there), or, if it computed in less than ``INLINE_COMPUTE_MAX_S`` last
        time, no layer of the node took ``LONG_LAYER_S`` in such a pass and it can start
        at once, on the loop (its answer sent once its sum is in). At
        most ``PASS_LAYERS_AHEAD`` layers are read and not yet computed. One ack per layer
        is answered as it completes, in pass order; the acks ready at the same moment (a
        run of small layers that came in one message and computed on the loop) go in one
        message (``LayerAck.following``).
        """
        loop = asyncio.get_running_loop()
        passing = _PassCall(context)
        answers: asyncio.Queue = asyncio.Queue()
        room = asyncio.Semaphore(PASS_LAYERS_AHEAD)
        layers_over: list[asyncio.Future] = []

        def free_room() -> None:  # from a layer's thread once it has computed
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(room.release)

        def answer_with(index: int, over: asyncio.Future, done: Callable[[], LayerAck]) -> None:
            """(On the loop.) Answer layer ``index`` with ``done()``, or its error."""
            try:
                answers.put_nowait((index, done()))
            except BaseException as exc:  # answered as the pass's error
                answers.put_nowait(exc)
            if not over.done():
                over.set_result(None)

        def run_here(index: int, header: Header, assembler, params: dict, over) -> bool:
            """Compute the layer on the loop if it is short and can start at once (False:
            it cannot; a thread runs it). A backward layer is answered once its sum is in."""
            try:
                computed = self._compute_now(header, params, assembler, passing)
            except BaseException as exc:
                answer_with(index, over, functools.partial(_raise, exc))
                room.release()
                return True
            if computed is None:
                return False
            room.release()
            ack, call, sent = computed
            if call is None:
                answer_with(index, over, lambda: ack)
                return True

            def upstream_done(_call) -> None:  # on the loop, or a thread that settled it
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(
                        answer_with,
                        index,
                        over,
                        lambda: self._with_upstream(header, ack, call, sent),
                    )

            call.add_done_callback(upstream_done)
            return True

        def run(index: int, header: Header, assembler: LayerAssembler, params: dict, over) -> None:
            try:
                answer = (index, self._run_layer(header, params, assembler, passing, free_room))
            except BaseException as exc:  # answered as the pass's error
                answer = exc

            def answered() -> None:  # one wake-up of the loop for both
                answers.put_nowait(answer)
                if not over.done():
                    over.set_result(None)

            with contextlib.suppress(RuntimeError):  # the loop is closed: the process exits
                loop.call_soon_threadsafe(answered)

        async def read() -> None:
            num_read = 0
            # The pass's end wakes a reader waiting for room.
            passing.add_callback(free_room)
            try:
                items = from_wire_stream_async(request_iterator)
                pass_id = None
                while True:
                    await room.acquire()
                    if not passing.is_active():
                        return
                    header = await anext(items, None)
                    if header is None:
                        return
                    # The parent keeps the stream from one pass to the next: a new pass
                    # begins once the last layer of the one before is read.
                    header = checked_pass_header(header, pass_id)
                    last = header.pass_length and header.pass_position == header.pass_length
                    pass_id = None if last else header.pass_id
                    assembler, params = await self._read_layer(header, items, until_complete=True)
                    over = loop.create_future()
                    if not passing.is_active():  # ended (on this loop) while it was read
                        return
                    layer = (num_read, header, assembler, params, over)
                    del params  # (the layer's thread or compute drops them when done)
                    if not run_here(*layer):
                        threads.start(run, *layer, name=f"{self.name}-layer")
                    del layer
                    if len(layers_over) >= _LAYERS_OVER_KEPT:  # (a stream of many passes)
                        layers_over[:] = [f for f in layers_over if not f.done()]
                    layers_over.append(over)
                    num_read += 1
            except Exception as exc:
                answers.put_nowait(exc)
            finally:
                answers.put_nowait(ReadDone(num_read))

        reader = asyncio.ensure_future(read())
        try:
            # In pass order: a layer whose thread posts its answer late (descheduled after
            # its compute) is still answered before the next one. An error ends it at once.
            # The answers ready at the same moment (a run of small layers computed on the
            # loop one after another) go in one message (``LayerAck.following``).
            done: dict[int, LayerAck] = {}
            num_answered, num_read = 0, None
            while num_read is None or num_answered < num_read:
                ready = [await answers.get()]
                while not answers.empty():
                    ready.append(answers.get_nowait())
                in_order: list[LayerAck] = []
                failed: BaseException | None = None
                for answer in ready:
                    if isinstance(answer, ReadDone):
                        num_read = answer.num_layers
                    elif isinstance(answer, BaseException):
                        failed = failed or answer
                    else:
                        done.update((answer,))
                        while num_answered in done:
                            in_order.append(done.pop(num_answered))
                            num_answered += 1
                for message in acks_in_messages(in_order, BUNDLE_MAX_BYTES):
                    yield message
                if failed is not None:
                    raise failed
        finally:
            # The call ends only once its layers have: none changes the node afterwards.
            reader.cancel()
            passing.end()
            await asyncio.gather(reader, *layers_over, return_exceptions=True)

    async def _read_layer(
        self, header, items, *, until_complete: bool
    ) -> tuple[LayerAssembler, dict]:
        """One layer's stream, checked against its layout: its assembler and weights.

        ``until_complete``: the stream goes on after the layer (a pass stream), so reading
        stops once the layer is whole; else it reads to the end of the stream.
        """
        if not isinstance(header, Header):
            raise WireError("a layer stream must start with a header")
        if not 0 <= header.layer < self.worker.num_layers:
            raise WireError(
                f"layer {header.layer} does not exist; this model has layers 0..{self.worker.num_layers - 1}"
            )
        if header.phase not in (Phase.FORWARD, Phase.BACKWARD, Phase.EVAL):
            raise WireError(f"unknown phase {header.phase}")
        if header.step < 0:
            raise WireError(f"step {header.step} must not be negative")
        assembler = LayerAssembler(
            Expected(
                header.layer,
                header.step,
                header.phase,
                self._layout(header),
                self.worker.backend.wire_dtype,
                sparse=True,  # masked weights may come as values + index
            )
        )
        assembler.add(header)
        while not (until_complete and assembler.complete):
            item = await anext(items, None)
            if item is None:
                break
            assembler.add(item)
        return assembler, assembler.finish()

    def _run_layer(
        self,
        header: Header,
        params: dict,
        assembler: LayerAssembler,
        context,
        computed: Callable[[], None] | None = None,
    ) -> LayerAck:
        """Compute a read layer in its turn; a backward one's ack waits for its reduced
        gradient. ``computed`` is called once the layer is computed (or failed to)."""
        try:
            self._wait_turn(header, context)
            with self._lock:
                ack, call, sent = self._compute(header, params, assembler, context)
        finally:
            del params
            if computed is not None:
                computed()
        if call is None:
            return ack
        # Waited for outside the lock: the next layer of the pass computes meanwhile.
        return self._with_upstream(header, ack, call, sent)

    def _compute_now(self, header: Header, params: dict, assembler: LayerAssembler, context):
        """(On the loop.) ``_compute`` for a layer that computed in less than
        ``INLINE_COMPUTE_MAX_S`` last time, on a node with no layer of ``LONG_LAYER_S`` in
        a pass of its kind, if it can start at once: its turn has come and no layer of this
        node, or node of this process, computes. None if not."""
        last_s = self._compute_s.get((header.phase, header.layer))
        if (
            last_s is None
            or last_s >= INLINE_COMPUTE_MAX_S
            or self._long_layers[header.phase == Phase.EVAL]
            or process_computing()
        ):
            return None
        if not self._lock.acquire(blocking=False):
            return None
        try:
            with self._turn:
                if not self._ready(header):
                    return None
            return self._compute(header, params, assembler, context)
        finally:
            self._lock.release()

    def _with_upstream(self, header: Header, ack: LayerAck, call, sent: int) -> LayerAck:
        """A backward layer's ack once its gradient's sum is applied upstream (``call`` is
        done, or this waits for it)."""
        try:
            upstream = ack_from_wire(call.result())
        except grpc.FutureCancelledError:
            raise StepConflict(
                f"{self.name}: gradient of layer {header.layer} step {header.step} was abandoned"
            ) from None
        with self._counters_lock:
            self.gradient_bytes_sent += sent
        ack.gradient_bytes = sent
        ack.update_applied = upstream.update_applied
        ack.memoryx = upstream.memoryx
        return ack

    def _ready(self, header: Header) -> bool:
        """Whether the layer before ``header``'s in its pipelined pass is computed (or none is).

        A pass runs forward (or eval) layers 0..L-1, and a training pass goes on with the
        backward layers L-1..0: the backward of layer L-1 comes after its forward.
        """
        if not header.pass_id:
            return True  # not pipelined: computed at once (the worker checks the order)
        last = self.worker.num_layers - 1
        if header.phase == Phase.BACKWARD:
            before = (
                (Phase.FORWARD, last)
                if header.layer == last
                else (Phase.BACKWARD, header.layer + 1)
            )
        elif header.layer == 0:
            return True
        else:
            before = (header.phase, header.layer - 1)
        return self._computed == (header.pass_id, *before)

    def _wait_turn(self, header: Header, context: grpc.ServicerContext) -> None:
        with self._turn:
            if self._ready(header):
                return
        # The call's end wakes the wait at once; the layer before it computing wakes it too.
        context.add_callback(notifier(self._turn))
        with self._turn:
            while not self._ready(header):
                if not context.is_active():
                    raise StepConflict(
                        f"{self.name}: layer {header.layer} of pass {header.pass_id} was "
                        "cancelled while it waited for the layer before it"
                    )
                self._turn.wait(timeout=CANCEL_CHECK_S)

    def _compute(self, header: Header, params: dict, assembler: LayerAssembler, context):
        """Run the layer (under the lock); for a backward pass, start sending its gradients.

        Returns the ack so far, the upstream gradient call (None unless backward) and the
        gradient payload bytes it carries.
        """
        self.weight_bytes_received += assembler.payload_bytes
        ack = LayerAck(
            layer=header.layer,
            step=header.step,
            phase=header.phase,
            num_nodes=1,
            bytes_to_nodes=assembler.payload_bytes,
            update_applied=True,
        )
        try:
            if header.phase == Phase.BACKWARD:
                grads, result = self.worker.backward(header.layer, header.step, params)
            elif header.phase == Phase.FORWARD:
                result = self.worker.forward(header.layer, header.step, params)
            else:
                result = self.worker.evaluate(header.layer, header.step, params)
        except NodeStateError as exc:
            raise StepConflict(str(exc)) from None
        del params  # the wafer drops a layer's weights as soon as it has used them
        self.flops += result.flops
        self.compute_seconds += result.compute_seconds
        key = (header.phase, header.layer)
        # CPU time, not wall time: on a loaded machine a short layer descheduled mid-compute
        # would otherwise count as long and send the node's layers to threads, whose
        # hand-offs load the machine more (192 nodes on 2 cores: a third of the layers).
        self._compute_s[key] = result.cpu_seconds
        long_layers = self._long_layers[header.phase == Phase.EVAL]
        if result.cpu_seconds < LONG_LAYER_S:
            long_layers.discard(key)
        else:
            long_layers.add(key)
        ack.loss_sum = result.loss_sum
        ack.num_targets = result.num_targets
        ack.num_correct = result.num_correct
        ack.flops = result.flops
        ack.compute_seconds = result.compute_seconds
        call, sent = None, 0
        if header.phase == Phase.BACKWARD:
            out = self._gradients.send(
                header,
                grads,
                # Gradients of pruned weights are not sent, except when MemoryX asks for
                # them (RigL regrows where the dense gradient is large).
                None if header.dense_gradients else assembler.masks,
                context,
                on_pass_stream=isinstance(context, _PassCall),
            )
            if out.in_answer is not None:
                # The parent sums it and says whether the update was applied.
                ack.gradient = out.in_answer
                ack.gradient_bytes = out.payload_bytes
                ack.update_applied = False
                with self._counters_lock:
                    self.gradient_bytes_sent += out.payload_bytes
            else:
                call, sent = out.call, out.payload_bytes
                # If the layer is abandoned (a sibling failed, so SwarmX cancels this
                # Deliver), stop waiting for a sum that will never complete.
                if not context.add_callback(call.cancel):
                    call.cancel()  # this Deliver was cancelled already
        with self._turn:
            self._computed = (header.pass_id, header.phase, header.layer)
            self._turn.notify_all()
        return ack, call, sent

    def _layout(self, header: Header) -> list:
        """Tensors the stream must carry: none for a backward pass that needs no weights (DFA)."""
        if header.phase == Phase.BACKWARD and not self.worker.backend.needs_weights_in_backward:
            return []
        return self.worker.layouts[header.layer]

    def stats(self) -> NodeStats:
        return NodeStats(
            rank=self.worker.rank,
            weight_bytes_received=self.weight_bytes_received,
            gradient_bytes_sent=self.gradient_bytes_sent,
            activation_bytes_held=self.worker.activation_bytes,
            peak_activation_bytes=self.worker.peak_activation_bytes,
            weight_bytes_held=self.worker.weight_bytes_held,
            flops=self.flops,
            compute_seconds=self.compute_seconds,
            backend_stats=self.worker.backend.stats(),
            layer_input_bytes_held=self.worker.layer_input_bytes,
            peak_layer_input_bytes=self.worker.peak_layer_input_bytes,
        )

    async def Stats(self, request, context):
        return node_stats_to_wire(self.stats())

    async def ResetStats(self, request, context):
        self._reset_counters()
        return EMPTY


def register(server: grpc.aio.Server, servicer: ComputeNodeServicer) -> None:
    ngrpc.add_ComputeNodeServicer_to_server(servicer, server)
    register_fast(sgrpc.add_LayerSinkServicer_to_server, servicer, server)


def serve(
    servicer: ComputeNodeServicer, host: str, *, security: Security
) -> tuple[LoopServer, str]:
    """Serve ``servicer`` on an OS-chosen port of ``host``, on this process's event loop
    (``proto.loop_server``); the server and its ``host:port``."""
    return start_loop_server(lambda server: register(server, servicer), host, security=security)


def _raise(error: BaseException):
    raise error
