"""Copies of a layer stream with one message edited, for tests of what a service refuses."""

from __future__ import annotations

from proto import tensor_pb2 as pb


def edited(messages: list[pb.LayerMessage], index: int, **changes) -> list[pb.LayerMessage]:
    """``messages`` copied, with header (index 0) or chunk ``index`` changed by ``changes``."""
    out = []
    for message in messages:
        copy = pb.LayerMessage()
        copy.CopyFrom(message)
        out.append(copy)
    target = out[index].header if index == 0 else out[index].chunk
    for key, value in changes.items():
        if key == "shape":
            del target.shape[:]
            target.shape.extend(value)
        else:
            setattr(target, key, value)
    return out
