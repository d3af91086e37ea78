"""proto.pass_stream: the receiving side of a pass stream, without gRPC."""

from __future__ import annotations

import queue
import threading

import pytest

from proto.domain import Header
from proto.frames import WireError
from proto.pass_stream import ReadDone, next_pass_header, pass_answers


def _header(pass_id: int = 7, position: int = 0) -> Header:
    return Header(layer=0, step=0, phase=1, pass_id=pass_id, pass_position=position)


def _read(items, pass_id=None, *, active=True, room=1, with_place=False):
    return next_pass_header(
        iter(items),
        threading.Semaphore(room),
        lambda: active,
        pass_id,
        check_s=0.01,
        with_place=with_place,
    )


def test_the_next_header_of_the_pass_or_none_at_the_end():
    assert _read([_header()]) == _header()
    assert _read([]) is None
    assert _read([_header()], active=False) is None  # the call ended


def test_a_reader_without_room_waits_until_the_call_ends():
    active = {"now": True}
    threading.Timer(0.05, lambda: active.update(now=False)).start()
    got = next_pass_header(
        iter([_header()]), threading.Semaphore(0), lambda: active["now"], None, check_s=0.01
    )
    assert got is None


@pytest.mark.parametrize(
    "item, pass_id, with_place, error",
    [
        (_header(pass_id=0), None, False, "header of its pass"),
        ("not a header", None, False, "header of its pass"),
        (_header(pass_id=8), 7, False, "carries pass 7, not 8"),
        (_header(position=0), None, True, "place in the pass"),
    ],
)
def test_what_is_not_a_header_of_the_pass_is_refused(item, pass_id, with_place, error):
    with pytest.raises(WireError, match=error):
        _read([item], pass_id, with_place=with_place)


def test_answers_come_as_they_complete_until_the_reader_s_count():
    answers: queue.Queue = queue.Queue()
    for item in ("b", ReadDone(3), "a", "c", "never read"):
        answers.put(item)
    assert list(pass_answers(answers)) == ["b", "a", "c"]


def test_the_first_error_ends_the_answers():
    answers: queue.Queue = queue.Queue()
    for item in ("a", WireError("layer 1 failed"), "b", ReadDone(2)):
        answers.put(item)
    got = pass_answers(answers)
    assert next(got) == "a"
    with pytest.raises(WireError, match="layer 1 failed"):
        next(got)
