"""The reduce side of a SwarmX node: gradient streams from its children, summed upward.

Gradient chunks from the children are summed chunk by chunk (``ChunkReduction``) and
each sum goes to the parent, or to MemoryX at the root, at once. A mixin of
``swarmx.service.SwarmXServicer``, whose state (children, upstream stubs, lock,
counters) it uses.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from proto import memoryx_pb2_grpc as mgrpc
from proto import swarmx_pb2_grpc as sgrpc
from proto.domain import Chunk, Header, Phase, StreamItem
from proto.frames import WireError, from_wire_stream
from proto.rpc import StepConflict, rpc_errors, time_left_s
from swarmx.pass_link import drain
from swarmx.pieces import END, SplitLayer, SplitPush
from swarmx.reduce import ChunkReduction


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
    _reducing: dict[tuple[int, int], Reducing]
    _parent: sgrpc.SwarmXStub | None
    _split: dict[int, SplitLayer]
    _split_stubs: list[mgrpc.MemoryXStub]
    _reduced_in: int
    _up: Any  # the servicer's counter of the bytes sent up
    _memoryx_of: Callable[[int], mgrpc.MemoryXStub]  # the MemoryX server that holds a layer

    # -- reduce (over the servicer's state: see SwarmXServicer.__init__) ---------------
    def _open_reduction(self, header: Header, context: grpc.ServicerContext) -> Reducing:
        key = (header.layer, header.step)
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
                split = self._split.get(header.layer) if self._parent is None else None
                if self._parent is not None:
                    upstream = self._parent.Reduce.future(drain(outbox), timeout=timeout_s)
                elif split is not None:
                    upstream = SplitPush(
                        split, lambda o: self._split_stubs[o].PushGradients, outbox, timeout_s
                    )
                else:
                    upstream = self._memoryx_of(header.layer).PushGradients.future(
                        drain(outbox), timeout=timeout_s
                    )
                entry = Reducing(reduction, upstream, outbox, num_open=len(self.children))
                self._reducing[key] = entry
            return entry

    @rpc_errors
    def Reduce(self, request_iterator, context):
        items = from_wire_stream(request_iterator)
        header = next(items, None)
        if not isinstance(header, Header):
            raise WireError("a gradient stream must start with a header")
        child = header.sender
        # Checked before a reduction (and its upstream stream) is opened for this header.
        if child not in self.children:
            raise WireError(f"gradient stream from {child!r}, which is not a child of {self.name}")
        if header.phase != Phase.BACKWARD:
            raise WireError(f"a gradient stream has phase BACKWARD, not {header.phase}")
        if min(header.layer, header.step, header.num_tensors, header.total_bytes) < 0:
            raise WireError("a gradient header's layer, step, num_tensors and total_bytes are >= 0")
        entry = self._open_reduction(header, context)
        received = 0
        try:
            entry.reduction.add_header(child, header, self.name)
            for index, chunk in enumerate(items):
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
            return entry.upstream.result()
        except grpc.FutureCancelledError:
            raise StepConflict(
                f"{self.name} abandoned the gradient of layer {header.layer} step {header.step}: "
                + "; ".join(entry.failed)
            ) from None
        finally:
            done.set()

    def _fail(self, entry: Reducing, reason: str) -> None:
        with self._lock:
            entry.failed.append(reason)
            # End the upstream stream now so that it is not left waiting.
            entry.outbox.put(END)
        entry.upstream.cancel()

    def _close(self, header: Header, entry: Reducing) -> None:
        with self._lock:
            entry.num_open -= 1
            if entry.num_open == 0:
                entry.outbox.put(END)
                if self._reducing.get((header.layer, header.step)) is entry:
                    del self._reducing[(header.layer, header.step)]
