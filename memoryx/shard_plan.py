"""Which MemoryX server holds what: contiguous layers, and pieces of a layer too large to
leave whole.

The model's parameters, in layer order and flattened, are cut into ``num_servers``
contiguous ranges. When whole layers already give every server its share within
``BALANCE_TOLERANCE``, the cuts fall between layers; otherwise they fall at the exact
element that balances the bytes, inside a layer if need be. A server then holds that
layer's tensors, or flat element ranges of them, as *pieces* named
``NAME[START:STOP]of12x34`` (the full shape in the name, so that a checkpoint of
pieces can be put back together). The optimizers are elementwise, so a piece updates
bitwise as the whole tensor would.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

#: Whole layers are kept whole while every server holds this close to its share.
BALANCE_TOLERANCE = 0.1

_PIECE_KEY = re.compile(r"(?P<name>.+)\[(?P<start>\d+):(?P<stop>\d+)\]of(?P<shape>[0-9x]*)")


@dataclass(frozen=True)
class Piece:
    """Elements ``start..stop`` of the flattened tensor ``name`` of full ``shape``."""

    name: str
    shape: tuple[int, ...]
    start: int
    stop: int

    @property
    def numel(self) -> int:
        return self.stop - self.start

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.stop == int(torch.Size(self.shape).numel())

    @property
    def key(self) -> str:
        """The name the server holds it under: the tensor's own name when whole."""
        if self.whole:
            return self.name
        return f"{self.name}[{self.start}:{self.stop}]of{'x'.join(map(str, self.shape))}"

    @property
    def stored_shape(self) -> tuple[int, ...]:
        return self.shape if self.whole else (self.numel,)

    def take(self, tensor: Tensor) -> Tensor:
        """This piece of the full ``tensor`` (a flat copy unless whole)."""
        if self.whole:
            return tensor
        return tensor.reshape(-1)[self.start : self.stop].clone()


def parse_piece_key(key: str) -> Piece | None:
    """The piece a stored name stands for; None for a whole tensor's own name."""
    match = _PIECE_KEY.fullmatch(key)
    if match is None:
        return None
    text = match["shape"]
    shape = tuple(int(n) for n in text.split("x")) if text else ()
    return Piece(match["name"], shape, int(match["start"]), int(match["stop"]))


def join_pieces(pieces: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Whole tensors from ``pieces`` (stored name -> tensor), in order of first appearance.

    ValueError unless the pieces of each tensor cover it exactly once.
    """
    parts: dict[str, list[tuple[Piece, Tensor]]] = {}
    for key, tensor in pieces.items():
        piece = parse_piece_key(key)
        if piece is None:
            piece = Piece(key, tuple(tensor.shape), 0, tensor.numel())
        parts.setdefault(piece.name, []).append((piece, tensor))
    whole = {}
    for name, found in parts.items():
        found.sort(key=lambda item: item[0].start)
        shape = found[0][0].shape
        numel = int(torch.Size(shape).numel())
        bounds = [(p.start, p.stop) for p, _ in found]
        expected = [0] + [stop for _, stop in bounds[:-1]]
        if [a for a, _ in bounds] != expected or bounds[-1][1] != numel:
            raise ValueError(
                f"the pieces of tensor {name!r} cover elements {bounds}, not 0..{numel} once."
            )
        flat = [t.reshape(-1) for _, t in found]
        whole[name] = flat[0].reshape(shape) if len(flat) == 1 else torch.cat(flat).reshape(shape)
    return whole


@dataclass(frozen=True)
class Shard:
    """What one server holds: ``layers``, each whole unless ``pieces`` lists its pieces."""

    layers: range
    pieces: Mapping[int, tuple[Piece, ...]] = field(default_factory=dict)

    def take(self, layer: int, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """This server's part of model layer ``layer`` (all of it unless split)."""
        if layer not in self.pieces:
            return dict(tensors)
        return {p.key: p.take(tensors[p.name]) for p in self.pieces[layer]}

    def keys(self, layer: int) -> list[str] | None:
        """The stored names of a split layer's pieces here; None for a whole layer."""
        if layer not in self.pieces:
            return None
        return [p.key for p in self.pieces[layer]]


def whole_layer_ranges(layer_sizes: Sequence[int], num_servers: int) -> list[range]:
    """Contiguous layer ranges, one per server, each about 1/num_servers of the sizes.

    Every server gets at least one layer (at most as many servers as layers).
    """
    num_layers = len(layer_sizes)
    if not 1 <= num_servers <= num_layers:
        raise ValueError(
            f"memoryx.num_servers = {num_servers} must be between 1 and the model's "
            f"{num_layers} streamed layers: each server holds at least one layer."
        )
    total = sum(layer_sizes)
    bounds = [0]
    running = 0
    for index, size in enumerate(layer_sizes):
        running += size
        remaining_servers = num_servers - len(bounds)
        remaining_layers = num_layers - index - 1
        if remaining_servers == 0:
            break
        # Cut after this layer once this server has its share, or when the rest must go one each.
        if running >= total * len(bounds) / num_servers or remaining_layers == remaining_servers:
            bounds.append(index + 1)
    bounds.append(num_layers)
    return [range(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]


def plan_shards(
    layers: Sequence[Mapping[str, tuple[int, ...]]],
    num_servers: int,
    *,
    split: bool = True,
) -> list[Shard]:
    """One ``Shard`` per server for a model of ``layers`` (param name -> shape, in order).

    Without ``split`` (or when whole layers are balanced enough) every layer is whole,
    and there are at most as many servers as layers; with it, a server may hold a
    piece of one layer only.
    """
    sizes = [sum(int(torch.Size(s).numel()) for s in layer.values()) for layer in layers]
    total = sum(sizes)
    share = total / num_servers
    if not split or num_servers <= len(layers):
        try:
            whole = whole_layer_ranges(sizes, num_servers)
        except ValueError as exc:
            raise ValueError(f"{exc} Layers are not split over servers with sparsity.") from None
        held = [sum(sizes[i] for i in r) for r in whole]
        if not split or all(abs(h - share) <= BALANCE_TOLERANCE * share for h in held):
            return [Shard(r) for r in whole]
    if not 1 <= num_servers <= total:
        raise ValueError(
            f"memoryx.num_servers = {num_servers} must be between 1 and the model's "
            f"{total} parameters: each server holds at least one."
        )
    cuts = [total * k // num_servers for k in range(num_servers + 1)]
    shards = []
    for server in range(num_servers):
        lo, hi = cuts[server], cuts[server + 1]
        pieces: dict[int, list[Piece]] = {}
        touched: list[int] = []
        offset = 0
        for index, layer in enumerate(layers):
            for name, shape in layer.items():
                numel = int(torch.Size(shape).numel())
                start, stop = max(lo, offset), min(hi, offset + numel)
                if numel == 0:  # goes with the element that follows it (or the last server)
                    start = stop = offset
                    inside = lo <= offset < hi or offset == hi == total
                else:
                    inside = start < stop
                if inside:
                    pieces.setdefault(index, []).append(
                        Piece(name, tuple(shape), start - offset, stop - offset)
                    )
                    if not touched or touched[-1] != index:
                        touched.append(index)
                offset += numel
        split_here = {
            index: tuple(found)
            for index, found in pieces.items()
            if [p.name for p in found] != list(layers[index]) or not all(p.whole for p in found)
        }
        shards.append(Shard(range(touched[0], touched[-1] + 1), split_here))
    return shards


__all__ = [
    "BALANCE_TOLERANCE",
    "Piece",
    "Shard",
    "join_pieces",
    "parse_piece_key",
    "plan_shards",
    "whole_layer_ranges",
]
