"""proto.pass_stream: the checks of a pass stream's headers, without gRPC."""

from __future__ import annotations

import pytest

from proto.domain import Header
from proto.frames import WireError
from proto.pass_stream import checked_pass_header


def _header(pass_id: int = 7, position: int = 0) -> Header:
    return Header(layer=0, step=0, phase=1, pass_id=pass_id, pass_position=position)


def test_a_header_of_the_pass_is_taken():
    assert checked_pass_header(_header(), None) == _header()
    assert checked_pass_header(_header(), 7) == _header()
    assert checked_pass_header(_header(position=2), 7, with_place=True) == _header(position=2)


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
        checked_pass_header(item, pass_id, with_place=with_place)
