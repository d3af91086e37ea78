"""Launch a cluster's components as Ray actors and wire them together.

Every component is a Ray actor that serves gRPC on its host's address;
after launch the driver talks to them only over gRPC. A local Ray instance
is started unless ``runtime.address`` names an existing cluster. If Ray is
already initialised in this process (tests, notebooks), it is reused.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field

import ray
from torch import nn

from core.data import DataConfig, Dataset
from emulator.config import ClusterConfig
from memoryx.actor import MemoryXActor
from nodes.actor import NodeActor
from nodes.worker import strip_parameters
from swarmx.actor import SwarmXActor
from swarmx.tree import TreeNode, node_name

# Actors mostly wait on the network; the cores are shared as the real
# processes would share a host. num_cpus=0 lets a 2-core machine hold a cluster.
_ACTOR_OPTIONS = {"num_cpus": 0, "max_concurrency": 4}


def ensure_ray(address: str | None, *, verbose: bool = False) -> None:
    """Start (or join) Ray; its warnings reach the user's output only when ``verbose``."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Ray's start-up warnings (token authentication, /dev/shm size, ...) are about the
    # machine, not the run; the actors' own output goes to Ray's log files.
    level = logging.WARNING if verbose else logging.ERROR
    if address is None:
        ray.init(
            address="local",
            include_dashboard=False,
            log_to_driver=False,
            logging_level=level,
        )
        return
    try:
        ray.init(address=address, log_to_driver=False, logging_level=level)
    except (ConnectionError, ray.exceptions.AuthenticationError) as exc:
        raise ValueError(
            f"runtime.address = {address!r}: could not join a Ray cluster there ({exc}). "
            "Start one with `ray start --head` and pass its address (e.g. 'auto' or 'HOST:6379'), "
            "or leave the address unset to start a local Ray instance."
        ) from None


@dataclass
class Cluster:
    """Handles and gRPC addresses of a launched cluster's actors."""

    memoryx: ray.actor.ActorHandle
    memoryx_address: str
    swarmx: dict[str, ray.actor.ActorHandle]
    swarmx_addresses: dict[str, str]
    tree: list[TreeNode]
    nodes: list[ray.actor.ActorHandle]
    node_addresses: list[str]
    _stopped: bool = field(default=False)

    @property
    def root_address(self) -> str:
        return self.swarmx_addresses[self.tree[-1].name]

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        handles = [self.memoryx, *self.swarmx.values(), *self.nodes]
        try:
            ray.get([h.stop.remote() for h in handles], timeout=30)
        finally:
            for handle in handles:
                ray.kill(handle)


def launch(
    config: ClusterConfig, layers: list[nn.Module], dataset: Dataset | None = None
) -> Cluster:
    """Start MemoryX, the SwarmX tree and the compute nodes for ``config``.

    Nodes build a shipped data set themselves. A user's data (``data.path``)
    is read here, in the driver (``dataset``, if already loaded), and reaches
    the nodes as tensors in the object store, so the file need exist only on
    the driver's host and no path travels to a node.
    """
    ensure_ray(config.runtime.address, verbose=config.runtime.verbose)
    host = config.runtime.host
    chunk_bytes = config.swarmx.chunk_bytes
    remote = {
        cls: ray.remote(**_ACTOR_OPTIONS)(cls) for cls in (MemoryXActor, SwarmXActor, NodeActor)
    }
    skeleton = [strip_parameters(copy.deepcopy(layer)) for layer in layers]
    skeleton_ref = ray.put(skeleton)
    data_config = config.data_config
    data: DataConfig | ray.ObjectRef = data_config
    if data_config.from_user:
        data = ray.put(dataset if dataset is not None else data_config.build(seed=config.seed))

    memoryx = remote[MemoryXActor].remote(
        config.optimizer,
        host=host,
        chunk_bytes=chunk_bytes,
        checkpoint=config.resume,
        sparsity=config.sparsity,
    )
    tree = config.swarmx.build(config.num_nodes)
    swarmx = {t.name: remote[SwarmXActor].remote(t.name, host=host) for t in tree}
    nodes = [
        remote[NodeActor].remote(
            rank=rank,
            num_nodes=config.num_nodes,
            layers=skeleton_ref,
            data=data,
            batch_size=config.batch_size,
            seed=config.seed,
            backend=config.backend,
            max_eval_samples=config.max_eval_samples,
            chunk_bytes=chunk_bytes,
            host=host,
            num_threads=config.runtime.num_threads_per_node,
        )
        for rank in range(config.num_nodes)
    ]
    handles = [memoryx, *swarmx.values(), *nodes]
    try:
        addresses = ray.get([h.get_address.remote() for h in handles])
    except ray.exceptions.RayActorError as exc:
        for handle in handles:
            ray.kill(handle)
        raise RuntimeError(f"a cluster component failed to start: {exc}") from exc
    memoryx_address = addresses[0]
    swarmx_addresses = dict(zip(swarmx, addresses[1 : 1 + len(swarmx)], strict=True))
    node_addresses = addresses[1 + len(swarmx) :]
    by_name = {**swarmx_addresses, **{node_name(r): a for r, a in enumerate(node_addresses)}}
    wiring = [
        swarmx[t.name].connect.remote(
            children={c: by_name[c] for c in t.children},
            parent=swarmx_addresses[t.parent] if t.parent else None,
            memoryx=None if t.parent else memoryx_address,
        )
        for t in tree
    ]
    parent_of = {c: t.name for t in tree for c in t.children}
    wiring += [
        node.connect.remote(swarmx_addresses[parent_of[node_name(rank)]])
        for rank, node in enumerate(nodes)
    ]
    ray.get(wiring)
    return Cluster(
        memoryx=memoryx,
        memoryx_address=memoryx_address,
        swarmx=swarmx,
        swarmx_addresses=swarmx_addresses,
        tree=tree,
        nodes=nodes,
        node_addresses=node_addresses,
    )
