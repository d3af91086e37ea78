"""The receiving side of a pass stream (``LayerSink.DeliverPass``, ``SwarmX.ReducePass``),
as compute nodes and SwarmX nodes read one on their event loop: each layer's header is
checked to be of the stream's pass, and a reader tells the answering side how many layers
it read (``ReadDone``) so that the call ends once each is answered.
"""

from __future__ import annotations

from dataclasses import dataclass

from proto.domain import Header, StreamItem
from proto.frames import WireError


@dataclass(frozen=True)
class ReadDone:
    """A pass stream's reader is done: it read ``num_layers`` layers."""

    num_layers: int


def checked_pass_header(
    header: StreamItem, pass_id: int | None, *, with_place: bool = False
) -> Header:
    """``header`` if it starts a layer of the pass stream of ``pass_id`` (None: the first
    layer); else a WireError: it is not a header of that pass, or, ``with_place``, it does
    not give its place in the pass (a SwarmX relay needs it)."""
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


__all__ = ["ReadDone", "checked_pass_header"]
