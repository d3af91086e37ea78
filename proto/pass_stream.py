"""The receiving side of a pass stream (``LayerSink.DeliverPass``), as compute nodes and
SwarmX relays both read one: a reader thread takes each layer's header once there is room
for one more layer in flight (``next_pass_header``), each layer runs on a thread of its
own and puts its answer (or its error) on a queue, and the call answers the layers as
they complete until the reader's count is reached (``pass_answers``).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from proto.domain import Header, StreamItem
from proto.frames import WireError


@dataclass(frozen=True)
class ReadDone:
    """A pass stream's reader is done: it read ``num_layers`` layers."""

    num_layers: int


def next_pass_header(
    items: Iterator[StreamItem],
    room: threading.Semaphore,
    is_active: Callable[[], bool],
    pass_id: int | None,
    *,
    check_s: float,
    with_place: bool = False,
) -> Header | None:
    """The header of the next layer of a pass stream, once there is ``room`` for one more
    layer in flight (taken); None when the stream or its call (``is_active``, checked every
    ``check_s`` while waiting; the call's end should release ``room``) has ended.

    WireError if it is not a header of the stream's pass (``pass_id``, None for the first),
    or, ``with_place``, if it does not give its place in the pass (a SwarmX relay needs it).
    """
    while not room.acquire(timeout=check_s):
        if not is_active():
            return None
    if not is_active():
        return None
    header = next(items, None)
    if header is None:
        return None
    return checked_pass_header(header, pass_id, with_place=with_place)


def checked_pass_header(
    header: StreamItem, pass_id: int | None, *, with_place: bool = False
) -> Header:
    """``header`` if it starts a layer of the pass stream of ``pass_id`` (None: the first
    layer), else the WireError ``next_pass_header`` describes."""
    if (
        not isinstance(header, Header)
        or not header.pass_id
        or (with_place and not header.pass_position)
    ):
        raise WireError(
            "each layer of a pass stream starts with a header of its pass"
            + (
                " that gives its place in the pass (pass_position, pass_length)"
                if with_place
                else ""
            )
        )
    if pass_id is not None and header.pass_id != pass_id:
        raise WireError(f"a pass stream carries pass {pass_id}, not {header.pass_id}")
    return header


def pass_answers(answers: queue.Queue) -> Iterator[Any]:
    """The answers the layers of a pass stream put on ``answers``, as they come, until as
    many as the reader's ``ReadDone`` counts; the first exception put there is raised."""
    num_answered, num_read = 0, None
    while num_read is None or num_answered < num_read:
        answer = answers.get()
        if isinstance(answer, ReadDone):
            num_read = answer.num_layers
        elif isinstance(answer, BaseException):
            raise answer
        else:
            num_answered += 1
            yield answer


__all__ = ["ReadDone", "checked_pass_header", "next_pass_header", "pass_answers"]
