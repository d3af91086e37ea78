"""Shape of the SwarmX broadcast/reduce tree."""

from __future__ import annotations

import pytest

from proto.serde import DEFAULT_CHUNK_BYTES
from swarmx.tree import SwarmXTree, TreeNode, build_tree, node_name, tree_depth


def _ceil_log(n: int, base: int) -> int:
    """Smallest d >= 1 with base**d >= n, in exact integer arithmetic."""
    depth = 1
    while base**depth < n:
        depth += 1
    return depth


def _check_tree(tree: list[TreeNode], num_nodes: int, fanout: int) -> None:
    by_name = {t.name: t for t in tree}
    assert len(by_name) == len(tree), "SwarmX names are unique"
    leaves = [node_name(r) for r in range(num_nodes)]

    # Every compute node is a leaf exactly once; nothing else is a leaf.
    child_lists = [c for t in tree for c in t.children]
    assert len(child_lists) == len(set(child_lists)), "no node has two parents"
    leaf_children = [c for c in child_lists if c.startswith("node-")]
    assert sorted(leaf_children) == sorted(leaves)
    for t in tree:
        assert 1 <= len(t.children) <= fanout, t
        kinds = {c.startswith("node-") for c in t.children}
        assert kinds == {t.level == 0}, f"{t.name}: level-0 nodes feed compute nodes only"

    # A single root, last in the list, at the top level.
    roots = [t for t in tree if t.parent is None]
    assert len(roots) == 1
    assert tree[-1] is roots[0]
    assert roots[0].level == max(t.level for t in tree)

    # Parent and children agree both ways; levels step by one; list is bottom-up.
    for t in tree:
        for child in t.children:
            if child in by_name:
                assert by_name[child].parent == t.name
                assert by_name[child].level == t.level - 1
        if t.parent is not None:
            assert t.name in by_name[t.parent].children
    assert [t.level for t in tree] == sorted(t.level for t in tree)
    for t in tree:
        assert t.name.startswith(f"swarmx-{t.level}-")

    # Every leaf reaches the root through exactly `depth` SwarmX nodes.
    depth = _ceil_log(num_nodes, fanout)
    parent_of = {c: t.name for t in tree for c in t.children}
    for leaf in leaves:
        hops, at = 0, leaf
        while at in parent_of:
            at, hops = parent_of[at], hops + 1
        assert at == roots[0].name and hops == depth
    assert roots[0].level + 1 == depth


@pytest.mark.parametrize("fanout", range(2, 9))
def test_build_tree_shape(fanout):
    for num_nodes in range(1, 201):
        tree = build_tree(num_nodes, fanout)
        _check_tree(tree, num_nodes, fanout)
        assert tree_depth(num_nodes, fanout) == _ceil_log(num_nodes, fanout)
        # At most about N / (fanout - 1) SwarmX nodes (plus one per level for rounding).
        assert len(tree) <= num_nodes / (fanout - 1) + _ceil_log(num_nodes, fanout)


def test_single_node_still_has_a_swarmx_parent():
    tree = build_tree(1, 4)
    assert tree == [TreeNode(name="swarmx-0-0", level=0, children=("node-0",), parent=None)]


def test_small_tree_exact():
    tree = build_tree(5, 2)
    assert [(t.name, t.children, t.parent) for t in tree] == [
        ("swarmx-0-0", ("node-0", "node-1"), "swarmx-1-0"),
        ("swarmx-0-1", ("node-2", "node-3"), "swarmx-1-0"),
        ("swarmx-0-2", ("node-4",), "swarmx-1-1"),
        ("swarmx-1-0", ("swarmx-0-0", "swarmx-0-1"), "swarmx-2-0"),
        ("swarmx-1-1", ("swarmx-0-2",), "swarmx-2-0"),
        ("swarmx-2-0", ("swarmx-1-0", "swarmx-1-1"), None),
    ]


def test_power_of_fanout_depths():
    for fanout in range(2, 9):
        for depth in range(1, 4):
            assert tree_depth(fanout**depth, fanout) == depth
            assert tree_depth(fanout**depth + 1, fanout) == depth + 1
            assert build_tree(fanout**depth, fanout)[-1].level == depth - 1


def test_config_builds_tree():
    config = SwarmXTree.Config(fanout=3)
    assert config.chunk_bytes == DEFAULT_CHUNK_BYTES
    assert config.build(10) == build_tree(10, 3)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"fanout": 1}, "fanout"),
        ({"fanout": 0}, "fanout"),
        ({"fanout": -4}, "fanout"),
        ({"chunk_bytes": 1023}, "chunk_bytes"),
        ({"chunk_bytes": 0}, "chunk_bytes"),
        ({"chunk_bytes": 8 * 1024 * 1024 + 1}, "chunk_bytes"),
    ],
)
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field} = {list(kwargs.values())[0]} "):
        SwarmXTree.Config(**kwargs)


@pytest.mark.parametrize("chunk_bytes", [1024, 4096, 8 * 1024 * 1024])
def test_config_accepts_chunk_bytes_in_range(chunk_bytes):
    assert SwarmXTree.Config(chunk_bytes=chunk_bytes).chunk_bytes == chunk_bytes
