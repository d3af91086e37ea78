"""A SwarmX node's ``LayerSink.DeliverPass``: a pass from its parent on one stream.

A parent sends every layer of a pipelined pass to each child on one ``DeliverPass``
stream (``swarmx.pass_link.PassLink``), a SwarmX child as a compute node: a call's
set-up costs several times a small layer's messages. Here a thread reads the stream;
each layer is broadcast as ``Deliver`` broadcasts one (``SwarmXServicer._broadcast``,
on this node's own pass streams to its children), on a thread of its own, so that the
next layer streams on while the children still answer this one; its chunks go on as
they come (cut-through). One answer per layer, as each completes.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Iterator
from typing import Any

import grpc

from proto import threads
from proto.domain import Header, LayerAck, StreamItem
from proto.frames import from_wire_stream, next_layer
from proto.pass_stream import ReadDone, next_pass_header, pass_answers
from proto.rpc import CANCEL_CHECK_S, StepConflict
from swarmx.pass_link import POLL_S, QUEUE_DEPTH
from swarmx.pieces import END

#: Layers of a pass read and not yet answered (a parent keeps two in flight; this bounds
#: the threads a caller can make this node start).
LAYERS_AHEAD = 4


def _layer_stream(items: queue.Queue) -> Iterator[StreamItem]:
    """One layer's items as the reader hands them over; an error ends it as a failure."""
    while (item := items.get()) is not END:
        if isinstance(item, BaseException):
            raise item
        yield item


def _hand_over(items: queue.Queue, item: object, worker: threads.Task) -> bool:
    """Queue ``item`` for a layer's thread; False if that thread ended (it failed)."""
    while True:
        try:
            items.put(item, timeout=POLL_S)
            return True
        except queue.Full:
            if not worker.is_alive():
                return False


def relay_pass(
    servicer: Any, request_iterator, context: grpc.ServicerContext
) -> Iterator[LayerAck]:
    """The answers to one ``DeliverPass`` stream at SwarmX node ``servicer``, as each
    layer completes; the first failure (a bad stream, a child's error) ends the stream."""
    answers: queue.Queue = queue.Queue()
    room = threading.Semaphore(LAYERS_AHEAD)
    workers: list[threads.Task] = []
    context.add_callback(lambda: answers.put(StepConflict("the pass stream ended")))
    context.add_callback(room.release)  # wakes a reader waiting for room

    def broadcast(layer: queue.Queue, header: Header) -> None:
        try:
            passing = servicer.passing_of(header)
            answers.put(servicer.broadcast(_layer_stream(layer), context, passing))
        except BaseException as exc:  # answered as the pass's error
            answers.put(exc)
        finally:
            room.release()

    def read() -> None:
        num_read, pass_id = 0, None
        layer: queue.Queue | None = None
        worker: threads.Task | None = None
        try:
            items = from_wire_stream(request_iterator)
            while True:
                first = next_pass_header(
                    items,
                    room,
                    context.is_active,
                    pass_id,
                    check_s=CANCEL_CHECK_S,
                    with_place=True,
                )
                if first is None:
                    return
                pass_id = first.pass_id
                layer = queue.Queue(maxsize=QUEUE_DEPTH)
                worker = threads.start(broadcast, layer, first, name="swarmx-pass-layer")
                workers.append(worker)
                num_read += 1
                for item in next_layer(itertools.chain((first,), items)):
                    if not _hand_over(layer, item, worker):
                        return  # the layer failed; its thread answered why
                _hand_over(layer, END, worker)
                layer = None
        except BaseException as exc:
            if layer is not None and worker is not None:
                _hand_over(layer, exc, worker)  # the layer in progress fails with it
            answers.put(exc)
        finally:
            answers.put(ReadDone(num_read))

    threads.start(read, name="swarmx-pass-read")
    # A failure ends the call with it; that cancels the layers still running (their
    # broadcasts watch the call), and the pass's streams to the children.
    yield from pass_answers(answers)
    for worker in list(workers):  # each answered: they are ending
        worker.join(timeout=CANCEL_CHECK_S)


__all__ = ["LAYERS_AHEAD", "relay_pass"]
