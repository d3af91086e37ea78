"""One pass's gradient layers sent up on one stream: ``SwarmX.ReducePass`` or ``MemoryX.PushPass``.

A pipelined pass sends each backward layer's gradient upward (compute node -> SwarmX
parent -> ... -> root -> MemoryX). One stream per link and pass carries them all,
instead of one call per layer (a call's set-up costs several times a small layer's
messages). Each layer's answer still comes back on its own, while later layers
stream, matched by (layer, step): the optimizer is applied as each layer completes.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterable, Iterator

from proto import threads
from proto.frames import WireError, bundled
from proto.loop_streams import ClientStream
from proto.messages import unfolded
from swarmx.pass_link import AnswerSlots, Slot
from swarmx.pieces import END


class GradientLink(AnswerSlots):
    """One pass's gradient stream to one receiver: the layers' streams, each whole, in the
    order they are sent. A failed or cancelled stream fails every layer waiting on it.

    The call runs on the process's event loop (``proto.loop_streams``). A layer given as a
    list goes onto it from the sender's thread; one given as an iterator (a sum whose
    chunks come as the children's do) is read on a thread of the pool, one layer after
    the other.
    """

    def __init__(self, method: Callable[..., Iterator], pass_id: int, timeout_s: float):
        # method: the receiver stub's ReducePass or PushPass (protobuf stays in the stubs).
        super().__init__("the receiver ended a gradient pass stream before answering")
        self.pass_id = pass_id
        self._order = threading.Lock()  # held while a layer's messages go on the stream
        self._closed = False
        # Layers waiting for the one before them to be read (only while one is being read).
        self._backlog: queue.SimpleQueue = queue.SimpleQueue()
        self._feeding = False
        self.call = ClientStream(method, timeout_s, self._answered, self._ended)

    def send(self, layer: int, step: int, messages: Iterable) -> LayerSlot:
        """Queue one layer's gradient stream (a header and its chunks); where its answer comes.

        ``messages`` is read once the layers before it are queued: it may block until its
        chunks exist (cut-through), and must end (e.g. when the sum fails).
        """
        slot = LayerSlot(self)
        listed = isinstance(messages, list | tuple)
        direct = start_feeder = False
        # A listed layer goes on from this thread, whole: none other may go on meanwhile.
        with self._order if listed else contextlib.nullcontext():
            with self._lock:
                error = self._error
                if error is None and self._closed:
                    error = WireError(f"the gradient stream of pass {self.pass_id} is closed")
                if error is None:
                    self._waiting[(layer, step)] = slot
                    direct = listed and not self._feeding
                    if not direct:
                        self._backlog.put(messages)
                        start_feeder = not self._feeding
                        self._feeding = True
            if error is not None:
                slot.settle(error=error)
            elif direct:
                self._put_layer(messages)
        if start_feeder:
            threads.start(self._feed, name="swarmx-gradient-send")
        return slot

    def takes_now(self, num_messages: int) -> bool:
        """Whether a listed layer of ``num_messages`` goes on at once, without waiting for
        room or for a layer still being read: its sender may be the event loop itself."""
        with self._lock:
            return not self._feeding and self.call.room() >= num_messages

    def _put_layer(self, messages: Iterable) -> None:
        for message in bundled(messages):
            if not self.call.put(message):
                return  # the call is over: its end fails the layers waiting

    def _feed(self) -> None:
        """Send the layers in the backlog, in order, until it is empty."""
        while True:
            with self._lock:
                try:
                    messages = self._backlog.get_nowait()
                except queue.Empty:
                    self._feeding = False
                    return
            if messages is END:
                self.call.close()
            else:
                with self._order:
                    self._put_layer(messages)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def ended(self) -> bool:
        """Closed, or its call over: it takes no more layers."""
        return self._closed or self.call.done()

    def close(self) -> None:
        """No more layers in this pass: end the request stream (the answers still come)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._feeding:
                self._backlog.put(END)  # after the layers still being read
                return
        with self._order:  # after a layer still going on from its sender's thread
            self.call.close()

    def cancel(self) -> None:
        self.call.cancel()
        self.close()

    def _answered(self, message) -> None:
        try:
            answers = unfolded(message, "answer")  # (MemoryX answers layers sent at once so)
        except WireError as exc:
            self._fail(exc)
            self.call.cancel()
            return
        for answer in answers:
            key = (answer.layer, answer.step)
            self._answer(
                key, answer, f"a gradient pass stream answered layer {key[0]} step {key[1]}"
            )


class LayerSlot(Slot):
    """One layer's answer on a ``GradientLink``, as a per-layer call's ``grpc.Future``.

    Cancelling it fails the pass's stream (its later layers cannot complete the pass
    either), unless the layer is answered already: a call context's callbacks also run
    when it ends well.
    """

    def cancel(self) -> bool:
        if self._settled:
            return False
        self._link.cancel()
        return True


__all__ = ["GradientLink", "LayerSlot"]
