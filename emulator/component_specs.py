"""Each component of a run as the class its process starts and that class's arguments.

``launch`` starts the components from these specs and keeps them: a lost component is
restarted from its own spec (emulator.faults), so a replacement is built exactly as the
original was.
"""

from __future__ import annotations

from pathlib import Path

import ray

from core.data import DataConfig
from emulator.config import ClusterConfig
from memoryx.actor import MemoryXActor
from memoryx.shard_plan import Shard
from nodes.actor import NodeActor
from proto.rpc import Security
from swarmx.actor import SwarmXActor
from swarmx.tree import TreeNode, node_name

MEMORYX = "memoryx"


def memoryx_name(server: int) -> str:
    """The component name of MemoryX server ``server``."""
    return MEMORYX if server == 0 else f"{MEMORYX}-{server}"


def component_specs(
    config: ClusterConfig,
    *,
    shards: list[Shard],
    tree: list[TreeNode],
    backends: list,
    security: Security,
    checkpoint_dir: Path,
    resume: object,
    skeleton: ray.ObjectRef,
    data: DataConfig | ray.ObjectRef,
    spans: list[tuple[int, int]] | None,
) -> dict[str, tuple[type, dict]]:
    """Component name -> (actor class, constructor keyword arguments).

    ``shards`` are the MemoryX servers' layers, ``tree`` the SwarmX nodes, ``backends``
    each compute node's backend config in rank order, ``skeleton`` the model's layers
    without weights (in the object store), ``spans`` the nodes' shares of the global batch
    (None: equal shards).
    """
    host = config.runtime.host
    chunk_bytes = config.swarmx.chunk_bytes
    memoryx = {
        memoryx_name(index): (
            MemoryXActor,
            {
                "optimizer": config.optimizer,
                "host": host,
                "chunk_bytes": chunk_bytes,
                "security": security,
                "checkpoint_dir": str(checkpoint_dir.resolve()),
                "resume": resume,
                "sparsity": config.sparsity,
                "memoryx": config.memoryx,
                "server": index,
                "layers": shard.layers,
                **({"pieces": {i: shard.keys(i) for i in shard.pieces}} if shard.pieces else {}),
            },
        )
        for index, shard in enumerate(shards)
    }
    swarmx = {
        t.name: (SwarmXActor, {"name": t.name, "host": host, "security": security}) for t in tree
    }
    nodes = {
        node_name(rank): (
            NodeActor,
            {
                "rank": rank,
                "num_nodes": config.num_nodes,
                "layers": skeleton,
                "data": data,
                "batch_size": config.batch_size,
                "seed": config.seed,
                "backend": backends[rank],
                "share": None if spans is None else spans[rank],
                "max_eval_samples": config.max_eval_samples,
                "chunk_bytes": chunk_bytes,
                "host": host,
                "num_threads": config.runtime.num_threads_per_node,
                "security": security,
            },
        )
        for rank in range(config.num_nodes)
    }
    return {**memoryx, **swarmx, **nodes}
