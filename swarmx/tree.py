"""Shape of the SwarmX broadcast/reduce tree.

Compute nodes are the leaves. Each SwarmX node feeds at most ``fanout``
children (the real SwarmX does one 1:4 or two 1:2 operations per node), so
there are about N / (fanout - 1) SwarmX nodes and log_fanout(N) levels. The
root talks to MemoryX. A single compute node still hangs off one SwarmX node,
so traffic at MemoryX is the same for every N.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from core.config import doc
from proto.frames import DEFAULT_CHUNK_BYTES


class SwarmXTree:
    @dataclass(kw_only=True)
    class Config:
        fanout: int = doc("children per SwarmX node (the real SwarmX does 1:4)", default=4)
        chunk_bytes: int = doc(
            "payload bytes per streamed chunk, bytes", default=DEFAULT_CHUNK_BYTES
        )

        def __post_init__(self) -> None:
            if self.fanout < 2:
                raise ValueError(
                    f"fanout = {self.fanout} is not valid; a SwarmX node feeds 2 or more children (the real one 4)."
                )
            if not 1024 <= self.chunk_bytes <= 8 * 1024 * 1024:
                raise ValueError(
                    f"chunk_bytes = {self.chunk_bytes} is not valid; use 1 KiB to 8 MiB (default 1 MiB)."
                )

        def build(self, num_nodes: int) -> list[TreeNode]:
            return build_tree(num_nodes, self.fanout)


@dataclass(frozen=True)
class TreeNode:
    name: str  # "swarmx-<level>-<index>"; level 0 is just above the compute nodes
    level: int
    children: tuple[str, ...]  # names of SwarmX children or "node-<rank>" leaves
    parent: str | None  # None for the root (its parent is MemoryX)


def node_name(rank: int) -> str:
    return f"node-{rank}"


def build_tree(num_nodes: int, fanout: int) -> list[TreeNode]:
    """SwarmX nodes from the leaves' level up to the root (last in the list)."""
    assert num_nodes >= 1 and fanout >= 2
    below = [node_name(r) for r in range(num_nodes)]
    levels: list[list[tuple[str, tuple[str, ...]]]] = []
    level = 0
    while True:
        groups = [tuple(below[i : i + fanout]) for i in range(0, len(below), fanout)]
        names = [f"swarmx-{level}-{i}" for i in range(len(groups))]
        levels.append(list(zip(names, groups, strict=True)))
        if len(names) == 1:
            break
        below = names
        level += 1
    parent_of: dict[str, str | None] = {}
    for entries in levels:
        for name, children in entries:
            parent_of.setdefault(name, None)
            for child in children:
                parent_of[child] = name
    return [
        TreeNode(name=name, level=lvl, children=children, parent=parent_of[name])
        for lvl, entries in enumerate(levels)
        for name, children in entries
    ]


def tree_depth(num_nodes: int, fanout: int) -> int:
    """Number of SwarmX levels between MemoryX and the compute nodes."""
    return max(1, math.ceil(math.log(num_nodes, fanout) - 1e-12)) if num_nodes > 1 else 1
