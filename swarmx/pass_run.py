"""The root's side of ``SwarmX.RunPass``: every layer phase of one pass on one call.

The driver sends the pass's layer requests on one stream (all at once, or each when
it is due); the root runs each as ``RunLayer`` runs it (fetch from MemoryX, broadcast,
the children's answers summed), at most two at a time, the next one streaming while
the nodes compute this one, and answers each in request order. The weights come from MemoryX on one
``StreamPass`` call per server and pass (``PassWeights``), not one ``StreamWeights``
call per layer: a call's set-up costs several times a small layer's messages.

A layer that fails ends the pass: the call ends with its error, which cancels the
layers still in flight (their broadcasts watch the call), the pass's streams to the
nodes and its MemoryX streams. The driver runs the step again as a new pass.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import grpc

from proto import threads
from proto.domain import LayerAck, LayerRequest, StreamItem
from proto.frames import WireError, from_wire_stream, next_layer
from proto.loop_streams import ClientStream
from proto.messages import unfolded, weights_request_to_wire
from proto.rpc import CANCEL_CHECK_S, StepConflict, is_cancelled, time_left_s
from swarmx.pieces import joined_weights

#: Layer requests of a pass the root reads ahead of their answers: the layer the nodes
#: compute and the next one streaming (the driver's window; a disk-tiered MemoryX uses 1).
#: On the event-loop root (``swarmx.pass_root``) a run of small layers sent as one message
#: (at most ``proto.frames.BUNDLE_MAX_BYTES``) takes one place.
MAX_IN_FLIGHT = 2
#: How long a pass whose first failure is a cancelled stream waits for the failure that
#: cancelled it (another layer's), to answer with that one, s.
ERROR_GRACE_S = 1.0


class StreamEnd:
    """How a MemoryX stream ended: ``error`` None if well."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException | None):
        self.error = error


def _answers(answers: queue.SimpleQueue) -> Iterator:
    """The messages a ``ClientStream`` put on ``answers``, as a sync call's iterator gives
    them (its error raised at the end)."""
    while not isinstance(message := answers.get(), StreamEnd):
        yield message
    if message.error is not None:
        raise message.error


def checked_pass_request(
    servicer: Any, message, num_read: int, first: LayerRequest | None
) -> LayerRequest | None:
    """Request ``num_read + 1`` of a pass at the root, checked: a layer phase the root can
    run, in its place in the pass that ``first`` (None: this one) opened. ``message`` None:
    the driver's stream ended; None for a pass that never began, an error mid-pass."""
    if message is None:
        if first is None:
            return None
        raise WireError(f"the pass ended after {num_read} of its {first.pass_length} layers")
    request = servicer.checked_request(message)
    expected = (first.pass_id, first.pass_length) if first else None
    if (
        not request.pass_id
        or request.pass_position != num_read + 1
        or (expected and (request.pass_id, request.pass_length) != expected)
    ):
        raise WireError(
            f"request {num_read + 1} of a pass has pass_id {request.pass_id}, "
            f"pass_position {request.pass_position} and pass_length "
            f"{request.pass_length}: a pass's requests share a nonzero pass_id "
            "and pass_length and count pass_position 1, 2, ... in order"
        )
    return request


class PassWeights:
    """The weights of one pass's layers from MemoryX: one ``StreamPass`` call per server.

    A server's call opens with the first layer of the pass it holds. ``ask`` sends a
    layer's request as soon as the driver's arrives (MemoryX streams it while the layer
    before it is still being broadcast); ``layer`` reads it, in pass order, once that
    layer's turn has come. A split layer asks each of its owners and joins their streams.
    """

    def __init__(self, servicer: Any, timeout_s: float):
        self._servicer = servicer
        self._timeout_s = timeout_s
        # Per server (its stub): the call (on the process's event loop) and the items of
        # its answer stream.
        self._calls: dict[Any, tuple[ClientStream, Iterator[StreamItem]]] = {}
        self._lock = threading.Lock()
        self._closed = False
        # Positions of the layers asked for, in order: a layer is read once it is first.
        self._reads: list[int] = []
        self._turn = threading.Condition()
        self._cancelled = False

    def _call(self, stub) -> tuple[ClientStream, Iterator[StreamItem]]:
        with self._lock:
            entry = self._calls.get(stub)
            if entry is None:
                if self._closed:
                    raise WireError("the pass is over; its MemoryX streams are closed")
                answers: queue.SimpleQueue = queue.SimpleQueue()
                call = ClientStream(
                    stub.StreamPass,
                    self._timeout_s,
                    answers.put,
                    lambda e: answers.put(StreamEnd(e)),
                )
                entry = (call, from_wire_stream(_answers(answers)))
                self._calls[stub] = entry
            return entry

    def ask(self, request: LayerRequest) -> None:
        _, stubs = self._servicer.weight_sources(request.layer)
        message = weights_request_to_wire(request)
        with self._turn:
            self._reads.append(request.pass_position)
        for stub in stubs:
            self._call(stub)[0].put(message)  # (a call that is over fails its reader)

    def layer(self, request: LayerRequest) -> Iterator[StreamItem]:
        """The layer's weight stream, read once the layers asked before it are (the
        servers' streams carry them in that order)."""
        with self._turn:
            while not self._cancelled and self._reads[0] != request.pass_position:
                self._turn.wait()
            if self._cancelled:
                raise StepConflict("the pass ended before this layer's weights were read")
        try:
            split, stubs = self._servicer.weight_sources(request.layer)
            sources = [next_layer(self._call(stub)[1]) for stub in stubs]
            yield from sources[0] if split is None else joined_weights(split, sources)
        finally:
            with self._turn:
                self._reads.remove(request.pass_position)
                self._turn.notify_all()

    def close(self, *, cancel: bool) -> None:
        """End the requests (the pass asked for all its layers); ``cancel``: the calls too."""
        with self._lock:
            self._closed = True
            calls = list(self._calls.values())
        if cancel:
            with self._turn:
                self._cancelled = True
                self._turn.notify_all()
        for call, _ in calls:
            call.close()
            if cancel:
                call.cancel()


class PassRun:
    """One ``RunPass`` call at the root: reads the requests, runs each layer on a thread
    of its own, and gives the answers in request order (``acks``)."""

    def __init__(self, servicer: Any, context: grpc.ServicerContext):
        self._servicer = servicer
        self._context = context
        self._timeout_s = time_left_s(context)
        self._weights = PassWeights(servicer, self._timeout_s)
        self._room = threading.Semaphore(MAX_IN_FLIGHT)
        self._changed = threading.Condition()
        self._answers: dict[int, LayerAck] = {}  # by pass position
        self._error: BaseException | None = None
        self._num_read: int | None = None  # set once every request is read
        self._finished = False  # every layer answered

    def acks(self, requests: Iterable[Any]) -> Iterator[LayerAck]:
        # However the call ends (the driver cancels, the deadline passes), the pass ends.
        if not self._context.add_callback(self._ended):
            return
        threads.start(self._read, requests, name="swarmx-pass-read")
        position = 1
        failed = True
        try:
            while True:
                with self._changed:
                    while (
                        self._error is None
                        and position not in self._answers
                        and (self._num_read is None or position <= self._num_read)
                    ):
                        self._changed.wait()
                    if self._error is not None and is_cancelled(self._error):
                        # Most likely another layer's failure cancelled the pass's streams:
                        # that one's error explains more, and is about to come.
                        self._changed.wait_for(lambda: not is_cancelled(self._error), ERROR_GRACE_S)
                    if self._error is not None:
                        raise self._error
                    if position not in self._answers:
                        break  # every request answered
                    ack = self._answers.pop(position)
                yield ack
                position += 1
            failed = False
            self._finished = True
        finally:
            # A failure ends the call: its broadcasts still in flight see it and stop.
            self._weights.close(cancel=failed)
            if failed:
                self._fail(StepConflict("the pass ended"))  # the reader stops reading

    def _ended(self) -> None:
        """The call ended: a pass that did not finish stops reading, and its streams end."""
        self._fail(StepConflict("the pass ended"))
        if not self._finished:
            self._weights.close(cancel=True)

    def _fail(self, error: BaseException) -> None:
        with self._changed:
            if self._error is None or (is_cancelled(self._error) and not is_cancelled(error)):
                self._error = error
            self._changed.notify_all()
        self._room.release()  # a reader waiting for room sees the failure at once

    def _read(self, requests: Iterable[Any]) -> None:
        """Check and start each request in turn, at most ``MAX_IN_FLIGHT`` unanswered; the
        request after those is read and its weights asked for while they run."""
        num_read = 0
        first: LayerRequest | None = None
        try:
            # (Several requests in one message are read as if each came alone.)
            iterator = (request for message in requests for request in unfolded(message))
            while first is None or num_read < first.pass_length:
                message = next(iterator, None)
                request = checked_pass_request(self._servicer, message, num_read, first)
                if request is None:
                    return  # an empty pass: nothing to answer
                first = first or request
                if not request.without_weights:
                    # MemoryX streams it while the layers in flight finish (flow control
                    # bounds how far): the layer's turn finds its weights on the way.
                    self._weights.ask(request)
                # A failure or the call's end releases room (``_fail``): no poll waits.
                while not self._room.acquire(timeout=CANCEL_CHECK_S):
                    if self._error is not None or not self._context.is_active():
                        return
                if self._error is not None or not self._context.is_active():
                    return
                num_read += 1
                threads.start(self._run, request, name="swarmx-pass-layer")
            self._weights.close(cancel=False)
            if next(iterator, None) is not None:
                raise WireError(f"a pass of pass_length {first.pass_length} has more requests")
        except BaseException as exc:
            self._fail(exc)
        finally:
            with self._changed:
                self._num_read = num_read
                self._changed.notify_all()

    def _run(self, request: LayerRequest) -> None:
        try:
            weights = None if request.without_weights else self._weights.layer(request)
            ack = self._servicer.run_layer(
                request, weights, self._context, pass_timeout_s=time_left_s(self._context)
            )
        except BaseException as exc:
            self._fail(exc)
            return
        finally:
            self._room.release()
        with self._changed:
            self._answers[request.pass_position] = ack
            self._changed.notify_all()


__all__ = ["MAX_IN_FLIGHT", "PassRun", "PassWeights", "StreamEnd", "checked_pass_request"]
