"""Initial weights on the wire: consecutive layer streams whose layouts the receiver learns
from the chunks (MemoryX ``LoadWeights``). Split from ``proto.serde`` (25 KB rule)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from proto import tensor_pb2 as pb
from proto.domain import Header, StreamItem
from proto.serde import WIRE_DTYPES, Expected, WireError, decode_layer, from_wire_stream


def decode_layers(
    messages: Iterable[StreamItem | pb.LayerMessage],
) -> list[tuple[Header, dict[str, torch.Tensor]]]:
    """Decode consecutive layer streams whose layout the receiver does not know yet.

    Used only to load a model's initial weights: shapes and dtypes are taken
    from the chunks themselves, and offsets and sizes are still checked.
    """
    return list(iter_decode_layers(messages))


def iter_decode_layers(
    messages: Iterable[StreamItem | pb.LayerMessage],
) -> Iterator[tuple[Header, dict[str, torch.Tensor]]]:
    """``decode_layers`` one layer at a time: only one layer's messages are held at once."""

    def groups() -> Iterator[list[StreamItem]]:
        group: list[StreamItem] = []
        for item in from_wire_stream(messages):
            if isinstance(item, Header):
                if group:
                    yield group
                group = [item]
            elif not group:
                raise WireError("a chunk arrived before any header")
            else:
                group.append(item)
        if group:
            yield group

    for group in groups():
        header = group[0]
        layout: list[tuple[str, tuple[int, ...]]] = []
        dtypes = set()
        for chunk in group[1:]:
            dtypes.add(chunk.dtype)
            if not layout or layout[-1][0] != chunk.name:
                if any(name == chunk.name for name, _ in layout):
                    raise WireError(f"layer {header.layer} sends tensor {chunk.name!r} twice")
                layout.append((chunk.name, tuple(chunk.shape)))
        if len(dtypes) > 1 or (dtypes and next(iter(dtypes)) not in WIRE_DTYPES):
            raise WireError(f"layer {header.layer} mixes or uses unknown dtypes {sorted(dtypes)}")
        dtype = next(iter(dtypes), "float32")
        expected = Expected(header.layer, header.step, header.phase, layout, dtype)
        yield header, decode_layer(group, expected)
