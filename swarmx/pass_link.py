"""A SwarmX node's streams to its children: one ``DeliverPass`` per pass and child.

A pipelined pass sends its layers to each child (a compute node, or a SwarmX node that
relays them: ``swarmx.pass_relay``) on one stream instead of one ``Deliver`` call per
layer (a call's set-up costs several times a message's). Each
layer's answer still comes back as its own ``LayerAck``, matched by (layer, phase); a child
sends the answers to a run of layers it computed at once in one message (``following``).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import grpc

from proto.domain import LayerAck, StreamItem
from proto.frames import Bundler, WireError
from proto.loop_streams import ClientStream
from proto.messages import ack_from_wire
from proto.rpc import is_cancelled
from swarmx.pieces import END  # ends a queued stream; shared with the split-layer push

# Chunks buffered per child before the sender waits: bounds memory, keeps cut-through.
QUEUE_DEPTH = 16
# How often a sender blocked on a full child queue checks whether that child is gone.
POLL_S = 0.05


def drain(q: queue.Queue) -> Iterator[StreamItem]:
    while (item := q.get()) is not END:
        yield item


def put(q: queue.Queue, call: grpc.Future, item: object) -> bool:
    """Queue ``item`` for a child; False if the child's call ended and will never take it."""
    while True:
        try:
            q.put(item, timeout=POLL_S)
            return True
        except queue.Full:
            if call.done():
                return False


def child_results(calls: list[grpc.Future]) -> list[LayerAck]:
    """Every child's answer; as soon as one child fails, cancel the others and raise its error.

    The waiting thread is woken once: when the last child answers or the first one fails
    (not at every answer, which a tree of SwarmX nodes with ``fanout`` children each pays
    per layer).
    """
    over = threading.Lock()
    over.acquire()  # released when the wait is over
    state = {"left": len(calls), "over": False}
    guard = threading.Lock()

    def answered(call: grpc.Future) -> None:
        with guard:
            state["left"] -= 1
            if state["over"] or (state["left"] and call.code() == grpc.StatusCode.OK):
                return
            state["over"] = True
        over.release()

    for call in calls:
        call.add_done_callback(answered)
    if calls:
        over.acquire()
    failed = [c for c in calls if c.done() and c.code() != grpc.StatusCode.OK]
    if failed:
        # A child that failed on its own explains more than one that was cancelled.
        failed.sort(key=lambda c: c.cancelled())
        for call in calls:
            call.cancel()
        failed[0].result()  # raises
    return [ack_from_wire(c.result()) for c in calls]


class AnswerSlots:
    """The layers waiting for their answers on one stream (``self.call``, a
    ``ClientStream``), by key: each answer settles its layer's slot on the loop, and the
    stream's end or failure fails every layer still waiting (and any registered later)."""

    call: ClientStream

    def __init__(self, ended_early: str):
        self._lock = threading.Lock()
        self._waiting: dict[tuple[int, int], Slot] = {}
        self._error: BaseException | None = None
        self._ended_early = ended_early  # the error of a stream that ends with layers waiting

    def _answer(self, key: tuple[int, int], message, what: str) -> None:
        """On the loop: settle the slot of ``key`` (``what`` names it in the error of an
        answer that nothing waits for: the stream is then failed)."""
        with self._lock:
            slot = self._waiting.pop(key, None)
        if slot is None:
            self._fail(WireError(f"{what}, which was not sent on it"))
            self.call.cancel()
            return
        slot.settle(result=message)

    def _ended(self, error: BaseException | None) -> None:
        self._fail(error or WireError(self._ended_early))

    def _fail(self, error: BaseException) -> None:
        with self._lock:
            if self._error is None:
                self._error = error
            error = self._error
            waiting = list(self._waiting.values())
            self._waiting.clear()
        for slot in waiting:
            slot.settle(error=error)


class PassLink(AnswerSlots):
    """One ``DeliverPass`` stream to a child, carrying every layer of one pass.

    Layers go on it whole and in pass order (``put``, as on a ``queue.Queue``: the
    ``put`` helper above), a small one gathered into one message; the call runs on the
    process's event loop (``proto.loop_streams``), which hands each answer to the layer's
    ``Slot``. A failed or cancelled stream fails every layer waiting on it.
    """

    def __init__(self, stub, timeout_s: float):
        # stub: the child's LayerSinkStub (protobuf types stay in the servicer's module).
        super().__init__("a child ended its pass stream before answering")
        self._bundler = Bundler()
        self.call = ClientStream(stub.DeliverPass, timeout_s, self._answered, self._ended)

    def slot(self, layer: int, phase: int) -> Slot:
        """Where the answer for (``layer``, ``phase``) will come; register before sending it."""
        slot = Slot(self)
        with self._lock:
            error = self._error
            if error is None:
                self._waiting[(layer, phase)] = slot
        if error is not None:
            slot.settle(error=error)
        return slot

    def put(self, item: object, timeout: float | None = None) -> None:
        """Send ``item`` (``END``: the pass has no more layers); raises ``queue.Full`` if
        the call is over, as a full queue whose reader has gone. One layer's items come
        from one thread at a time (the pass's layers take turns)."""
        if self.call.done():
            raise queue.Full
        ready = self._bundler.flush() if item is END else self._bundler.add(item)
        for message in ready:
            if not self.call.put(message):
                return  # the call is over: its end fails the layers waiting
        if item is END:
            self.call.close()

    def _answered(self, message) -> None:
        # A child answers a run of layers it computed at once in one message.
        for answer in (message, *message.following):
            if answer is not message and len(answer.following):
                self._fail(WireError("an answer that follows another carries none of its own"))
                self.call.cancel()
                return
            key = (answer.layer, answer.phase)
            self._answer(key, answer, f"a pass stream answered layer {key[0]} phase {key[1]}")

    def close(self) -> None:
        """No more layers in this pass: end the request stream (the answers still come)."""
        put(self, self.call, END)

    def cancel(self) -> None:
        self.call.cancel()


class Slot:
    """One layer's answer on a ``PassLink``: the parts of a ``grpc.Future`` that
    ``_broadcast``, ``_put`` and ``child_results`` use."""

    def __init__(self, link: PassLink):
        self._link = link
        # Held until the answer is in: a waiter takes and gives it back. A bare lock, not
        # an Event (a Condition and two locks): a pass makes one per layer and child.
        self._unsettled = threading.Lock()
        self._unsettled.acquire()
        self._settled = False
        self._result = None
        self._error: BaseException | None = None
        self._callbacks: list = []

    def settle(self, *, result=None, error: BaseException | None = None) -> None:
        with self._link._lock:
            if self._settled:
                return
            self._result, self._error = result, error
            self._settled = True
            callbacks, self._callbacks = self._callbacks, []
        self._unsettled.release()
        for callback in callbacks:
            callback(self)

    def add_done_callback(self, callback) -> None:
        with self._link._lock:
            if not self._settled:
                self._callbacks.append(callback)
                return
        callback(self)

    def done(self) -> bool:
        # A link that ended can take no more of this layer's stream either.
        return self._settled or self._link.call.done()

    def cancelled(self) -> bool:
        error = self._error
        return is_cancelled(error)

    def code(self) -> grpc.StatusCode:
        if not self._settled:
            return grpc.StatusCode.OK if not self._link.call.done() else self._link.call.code()
        if self._error is None:
            return grpc.StatusCode.OK
        if isinstance(self._error, grpc.RpcError):
            return self._error.code()
        return grpc.StatusCode.UNKNOWN

    def cancel(self) -> None:
        self._link.cancel()  # the pass cannot go on without this layer

    def result(self):
        if not self._settled:
            with self._unsettled:  # released once settled
                pass
        if self._error is not None:
            raise self._error
        return self._result


__all__ = ["QUEUE_DEPTH", "AnswerSlots", "PassLink", "Slot", "drain", "put"]
