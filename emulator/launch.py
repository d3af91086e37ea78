"""Launch a cluster's components as Ray actors and wire them together.

Every component is a Ray actor that serves gRPC on its host's address;
after launch the driver talks to them only over gRPC. A local Ray instance
is started unless ``runtime.address`` names an existing cluster. If Ray is
already initialised in this process (tests, notebooks), it is reused.

Each launch is one run with its own credentials: a random token (and, when
a service binds an address other machines reach, TLS material) handed to the
actors as a constructor argument through Ray, never on a command line or in
a log. The run directory (0700) holds the token file (0600), the CA
certificate, the services' addresses and the checkpoints.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import ray
from torch import nn

from core.atomic import write_bytes_atomic, write_json_atomic
from core.data import DataConfig, Dataset
from emulator.config import ClusterConfig
from emulator.runtime import (
    ADDRESSES_FILE,
    CA_FILE,
    CHECKPOINT_DIR,
    TOKEN_FILE,
    _make_run_dir,
    _stage_resume,
    ensure_ray,
    run_security,
)
from memoryx.actor import MemoryXActor
from memoryx.checkpoint import confined_path, copy_checkpoint_dir
from memoryx.shard_plan import Shard
from nodes.actor import NodeActor
from nodes.worker import strip_parameters
from proto.rpc import TOKEN_METADATA_KEY, Security
from proto.serde import wider_dtype
from swarmx.actor import SwarmXActor
from swarmx.tree import TreeNode, node_name

# Actors mostly wait on the network; the cores are shared as the real
# processes would share a host. num_cpus=0 lets a 2-core machine hold a cluster.
_ACTOR_OPTIONS = {"num_cpus": 0, "max_concurrency": 4}


#: How long a (re)started actor may take to come up and answer, s.
START_TIMEOUT_S = 120.0


class ComponentHost:
    """A warm spare process that becomes a replacement component on demand.

    Starting a Ray actor costs a new process and the import of torch and the
    emulator (seconds on a loaded machine); a spare has paid that already, so a
    replacement only runs the component's constructor. Its methods are those the
    cluster calls on any component.
    """

    def __init__(self) -> None:
        self.component = None

    def start(self, cls: type, **kwargs) -> str:
        """Become ``cls(**kwargs)`` (a MemoryX, SwarmX or node actor); its address.

        Keyword arguments, so that Ray resolves object references among them (the
        nodes' layer skeleton) as it does for an actor's constructor.
        """
        self.component = cls(**kwargs)
        return self.component.get_address()

    def get_address(self) -> str:
        return self.component.get_address()

    def pid(self) -> int:
        return os.getpid()

    def connect(self, *args, **kwargs) -> None:
        self.component.connect(*args, **kwargs)

    def reshard(self, rank: int, num_nodes: int) -> None:
        self.component.reshard(rank, num_nodes)

    def stop(self) -> None:
        if self.component is not None:
            self.component.stop()


@dataclass
class Cluster:
    """Handles and gRPC addresses of a launched cluster's actors, and the run's credentials.

    Components are named ``memoryx`` (MemoryX server 0; server k >= 1 is ``memoryx-<k>``),
    ``swarmx-<level>-<i>`` and ``node-<rank>``.
    ``specs`` keeps each one's actor class and constructor arguments, so that
    ``restart`` starts a replacement exactly as the original was started.
    """

    memoryx: ray.actor.ActorHandle  # the first MemoryX server
    memoryx_address: str
    swarmx: dict[str, ray.actor.ActorHandle]
    swarmx_addresses: dict[str, str]
    tree: list[TreeNode]
    nodes: list[ray.actor.ActorHandle]
    node_addresses: list[str]
    security: Security = field(repr=False)
    run_dir: Path
    _temporary_run_dir: bool = field(default=False)
    #: Every MemoryX server, its gRPC address and the layers it holds (one server: all).
    memoryx_servers: list[ray.actor.ActorHandle] = field(default_factory=list)
    memoryx_addresses: list[str] = field(default_factory=list)
    memoryx_layers: list[range] = field(default_factory=list)
    #: What each server holds: its layers, and pieces of those split over servers.
    memoryx_shards: list[Shard] = field(default_factory=list)
    specs: dict[str, tuple[type, dict]] = field(default_factory=dict, repr=False)
    #: Names of ``nodes``, in rank order (a cluster that shrank has gaps).
    node_names: list[str] = field(default_factory=list)
    #: Weights' dtype into each SwarmX and compute node of a mixed-precision tree ({}: one).
    wire_dtypes: dict[str, str] = field(default_factory=dict)
    #: A warm ``ComponentHost`` that the next replacement starts in (None: none kept).
    spare: ray.actor.ActorHandle | None = None
    _stopped: bool = field(default=False)

    def __post_init__(self) -> None:
        if not self.memoryx_servers:
            self.memoryx_servers = [self.memoryx]
            self.memoryx_addresses = [self.memoryx_address]
        if not self.node_names:
            self.node_names = [node_name(r) for r in range(len(self.nodes))]

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / CHECKPOINT_DIR

    def export_checkpoint(self, name: str, destination: str | Path) -> None:
        """Copy checkpoint ``name`` that MemoryX wrote in the run directory to ``destination``."""
        source = confined_path(self.checkpoint_dir, name)
        destination = Path(destination)
        if source.is_dir():
            copy_checkpoint_dir(source, destination)
            return
        destination.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(
            dir=destination.parent, prefix=f".{destination.name}.", suffix=".tmp"
        )
        try:
            with open(source, "rb") as src, os.fdopen(fd, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
                dst.flush()
                os.fsync(dst.fileno())
            os.replace(temp, destination)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise

    @property
    def root_address(self) -> str:
        return self.swarmx_addresses[self.tree[-1].name]

    @property
    def addresses(self) -> dict[str, str]:
        """Every component's gRPC address, by name."""
        return {
            **{memoryx_name(k): a for k, a in enumerate(self.memoryx_addresses)},
            **self.swarmx_addresses,
            **dict(zip(self.node_names, self.node_addresses, strict=True)),
        }

    def is_memoryx(self, name: str) -> bool:
        """True if ``name`` is one of the MemoryX servers."""
        return name in {memoryx_name(k) for k in range(len(self.memoryx_servers))}

    @property
    def memoryx_by_layer(self) -> dict[int, str]:
        """The root's upstream: each MemoryX server's address by the first whole layer it holds."""
        shards = self.memoryx_shards or [Shard(r) for r in self.memoryx_layers]
        firsts = {}
        for shard, address in zip(shards, self.memoryx_addresses, strict=True):
            whole = [i for i in shard.layers if i not in shard.pieces]
            if whole:
                firsts[whole[0]] = address
        return firsts

    @property
    def memoryx_split(self) -> dict[int, list[tuple[str, list[tuple]]]]:
        """The root's upstream for layers split over servers: owners' addresses and pieces."""
        split: dict[int, list[tuple[str, list[tuple]]]] = {}
        if not self.memoryx_shards:  # whole layers only
            return split
        for shard, address in zip(self.memoryx_shards, self.memoryx_addresses, strict=True):
            for layer, pieces in shard.pieces.items():
                split.setdefault(layer, []).append(
                    (address, [(p.key, p.name, p.shape, p.start, p.stop) for p in pieces])
                )
        return split

    def handle(self, name: str) -> ray.actor.ActorHandle:
        if self.is_memoryx(name):
            return self.memoryx_servers[self._memoryx_index(name)]
        if name in self.swarmx:
            return self.swarmx[name]
        return self.nodes[self._index(name)]

    def _memoryx_index(self, name: str) -> int:
        return 0 if name == MEMORYX else int(name.removeprefix(f"{MEMORYX}-"))

    def _index(self, name: str) -> int:
        if name not in self.node_names:
            raise KeyError(f"no component named {name!r}")
        return self.node_names.index(name)

    def restart(self, name: str, **changes) -> str:
        """Replace component ``name`` by a new actor started with its original arguments
        (``changes`` overrides some, e.g. MemoryX's ``checkpoint``), and rewire the tree
        around it. The old actor is killed first (it may be hung, not dead). Returns the
        new address.
        """
        ray.kill(self.handle(name), no_restart=True)
        cls, kwargs = self.specs[name]
        kwargs = {**kwargs, **changes}
        handle, address = None, None
        if self.spare is not None:
            handle, self.spare = self.spare, _remote(ComponentHost).remote()
            try:
                address = ray.get(handle.start.remote(cls, **kwargs), timeout=START_TIMEOUT_S)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                ray.kill(handle, no_restart=True)
                handle = None  # the spare itself was lost: start the component afresh
        if handle is None:
            handle = _remote(cls).remote(**kwargs)
            try:
                address = ray.get(handle.get_address.remote(), timeout=START_TIMEOUT_S)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
                ray.kill(handle, no_restart=True)
                raise RuntimeError(f"the replacement of {name} failed to start: {exc}") from exc
        if self.is_memoryx(name):
            index = self._memoryx_index(name)
            self.memoryx_servers[index], self.memoryx_addresses[index] = handle, address
            if index == 0:
                self.memoryx, self.memoryx_address = handle, address
            rewire = [self.tree[-1].name]
        elif name in self.swarmx:
            self.swarmx[name], self.swarmx_addresses[name] = handle, address
            entry = self._entry(name)
            rewire = [name, *([entry.parent] if entry.parent else []), *entry.children]
        else:
            index = self._index(name)
            self.nodes[index], self.node_addresses[index] = handle, address
            rewire = [name, self._parent_of(name)]
        ray.get([self._connect(n) for n in rewire], timeout=START_TIMEOUT_S)
        return address

    def _entry(self, name: str) -> TreeNode:
        return next(t for t in self.tree if t.name == name)

    def _parent_of(self, child: str) -> str:
        return next(t.name for t in self.tree if child in t.children)

    def _connect(self, name: str) -> ray.ObjectRef:
        """(Re)wire component ``name`` to its current neighbours' addresses."""
        if name in self.swarmx:
            entry = self._entry(name)
            by_name = self.addresses
            dtypes = self.wire_dtypes
            return self.swarmx[name].connect.remote(
                children={c: by_name[c] for c in entry.children},
                parent=self.swarmx_addresses[entry.parent] if entry.parent else None,
                memoryx=None if entry.parent else self.memoryx_by_layer,
                **({"memoryx_split": self.memoryx_split} if self.memoryx_split else {}),
                **(
                    {"child_dtypes": {c: dtypes[c] for c in entry.children}, "dtype": dtypes[name]}
                    if dtypes
                    else {}
                ),
            )
        return self.nodes[self._index(name)].connect.remote(
            self.swarmx_addresses[self._parent_of(name)]
        )

    def drop_node(self, name: str) -> None:
        """Shrink the cluster: kill compute node ``name``, prune it (and SwarmX nodes left
        without children) from the tree, and give the survivors the shards of a cluster
        of their size, in rank order. The global batch is unchanged.
        """
        if len(self.nodes) < 2:
            raise RuntimeError(f"cannot drop {name}: it is the last compute node")
        index = self._index(name)
        ray.kill(self.nodes[index], no_restart=True)
        del self.nodes[index], self.node_addresses[index], self.node_names[index]
        gone = {name}
        while gone:
            self.tree = [
                dataclasses.replace(t, children=tuple(c for c in t.children if c not in gone))
                for t in self.tree
                if t.name not in gone
            ]
            gone = {t.name for t in self.tree if t.parent is not None and not t.children}
            for empty in gone:
                ray.kill(self.swarmx.pop(empty), no_restart=True)
                del self.swarmx_addresses[empty]
        refs = [self._connect(t.name) for t in self.tree]
        refs += [
            handle.reshard.remote(rank, len(self.nodes)) for rank, handle in enumerate(self.nodes)
        ]
        ray.get(refs, timeout=START_TIMEOUT_S)

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        handles = [*(self.memoryx_servers or [self.memoryx]), *self.swarmx.values(), *self.nodes]
        if self.spare is not None:
            handles.append(self.spare)
        # A dead or hung component must not keep the others running: each gets its own
        # bounded stop, and every actor is killed whatever the stops did.
        refs = [h.stop.remote() for h in handles]
        ray.wait(refs, num_returns=len(refs), timeout=10)
        for handle in handles:
            ray.kill(handle)
        # The token is worthless now; a temporary run directory goes with it.
        (self.run_dir / TOKEN_FILE).unlink(missing_ok=True)
        if self._temporary_run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)


#: The name of MemoryX server 0; server k >= 1 is ``memoryx-<k>`` (``memoryx_name``).
MEMORYX = "memoryx"


def memoryx_name(server: int) -> str:
    """The component name of MemoryX server ``server``."""
    return MEMORYX if server == 0 else f"{MEMORYX}-{server}"


def _remote(cls: type):
    return ray.remote(**_ACTOR_OPTIONS)(cls)


def subtree_dtypes(tree: list[TreeNode], node_dtypes: list[str]) -> dict[str, str]:
    """Weights' dtype into every SwarmX node and compute node, when the nodes differ; else {}.

    A SwarmX node takes the wider dtype of its subtree (fp32 where it mixes) and rounds it
    per child on the way down, so each node gets what MemoryX would have sent it alone.
    """
    if len(set(node_dtypes)) <= 1:
        return {}
    dtypes = {node_name(rank): dtype for rank, dtype in enumerate(node_dtypes)}
    children = {t.name: t.children for t in tree}

    def of(name: str) -> str:
        if name not in dtypes:
            dtypes[name] = wider_dtype([of(c) for c in children[name]])
        return dtypes[name]

    for t in tree:
        of(t.name)
    return dtypes


def launch(
    config: ClusterConfig,
    layers: list[nn.Module],
    dataset: Dataset | None = None,
    *,
    spans: list[tuple[int, int]] | None = None,
) -> Cluster:
    """Start MemoryX, the SwarmX tree and the compute nodes for ``config``.

    Nodes build a shipped data set themselves. A user's data (``data.path``)
    is read here, in the driver (``dataset``, if already loaded), and reaches
    the nodes as tensors in the object store, so the file need exist only on
    the driver's host and no path travels to a node.

    Each node runs its group's backend (``config.groups``, in rank order). ``spans``
    are the nodes' shares of the global batch (start, stop); None: equal shards.
    """
    ensure_ray(config.runtime.address, verbose=config.runtime.verbose)
    host = config.runtime.host
    security = run_security(config.runtime)
    run_dir, temporary = _make_run_dir(config.runtime)
    checkpoint_dir = run_dir / CHECKPOINT_DIR
    try:
        checkpoint_dir.mkdir(mode=0o700, exist_ok=True)
        resume = None if config.resume is None else _stage_resume(config.resume, checkpoint_dir)
    except BaseException:
        if temporary:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    chunk_bytes = config.swarmx.chunk_bytes
    skeleton = [strip_parameters(copy.deepcopy(layer)) for layer in layers]
    skeleton_ref = ray.put(skeleton)
    data_config = config.data_config
    data: DataConfig | ray.ObjectRef = data_config
    if data_config.from_user:
        data = ray.put(dataset if dataset is not None else data_config.build(seed=config.seed))

    # Layers partitioned over the MemoryX servers: contiguous, balanced by parameter bytes,
    # a layer split where whole layers would leave the servers unbalanced.
    shards = config.memoryx.plan(
        [{n: tuple(p.shape) for n, p in layer.named_parameters()} for layer in layers],
        sparse=config.sparsity is not None,
    )
    ranges = [shard.layers for shard in shards]
    tree = config.swarmx.build(config.num_nodes)
    # Each node runs its group's backend; a mixed tree rounds weights per child.
    backends = [group.backend for group in config.groups for _ in range(group.num_nodes)]
    # Each component's class and constructor arguments, kept for restarts.
    specs: dict[str, tuple[type, dict]] = {
        **{
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
                    **(
                        {"pieces": {i: shard.keys(i) for i in shard.pieces}} if shard.pieces else {}
                    ),
                },
            )
            for index, shard in enumerate(shards)
        },
        **{
            t.name: (SwarmXActor, {"name": t.name, "host": host, "security": security})
            for t in tree
        },
        **{
            node_name(rank): (
                NodeActor,
                {
                    "rank": rank,
                    "num_nodes": config.num_nodes,
                    "layers": skeleton_ref,
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
        },
    }
    started = {
        name: (
            # SPREAD: on a cluster of several hosts the MemoryX servers go to different ones.
            _remote(cls).options(scheduling_strategy="SPREAD")
            if cls is MemoryXActor
            else _remote(cls)
        ).remote(**kwargs)
        for name, (cls, kwargs) in specs.items()
    }
    handles = list(started.values())
    try:
        addresses = dict(
            zip(started, ray.get([h.get_address.remote() for h in handles]), strict=True)
        )
    except ray.exceptions.RayActorError as exc:
        for handle in handles:
            ray.kill(handle)
        if temporary:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise RuntimeError(f"a cluster component failed to start: {exc}") from exc
    servers = [started[memoryx_name(k)] for k in range(len(ranges))]
    cluster = Cluster(
        memoryx=servers[0],
        memoryx_address=addresses[MEMORYX],
        memoryx_servers=servers,
        memoryx_addresses=[addresses[memoryx_name(k)] for k in range(len(ranges))],
        memoryx_layers=ranges,
        memoryx_shards=shards,
        swarmx={t.name: started[t.name] for t in tree},
        swarmx_addresses={t.name: addresses[t.name] for t in tree},
        tree=tree,
        nodes=[started[node_name(r)] for r in range(config.num_nodes)],
        node_addresses=[addresses[node_name(r)] for r in range(config.num_nodes)],
        specs=specs,
        wire_dtypes=subtree_dtypes(tree, [b.wire_dtype for b in backends]),
        # Started now, warm by the time a component is lost.
        spare=_remote(ComponentHost).remote() if config.runtime.spare_actor else None,
        security=security,
        run_dir=run_dir,
        _temporary_run_dir=temporary,
    )
    ray.get([cluster._connect(n) for n in specs if not cluster.is_memoryx(n)])
    _write_client_files(
        run_dir,
        security,
        cluster.memoryx_address,
        cluster.swarmx_addresses,
        cluster.node_addresses,
    )
    return cluster


def _write_client_files(
    run_dir: Path,
    security: Security,
    memoryx_address: str,
    swarmx_addresses: dict[str, str],
    node_addresses: list[str],
) -> None:
    """What an outside client of this run needs: the token (0600), the CA and the addresses."""
    # write_bytes_atomic creates through mkstemp, so the token file is 0600 from the start.
    write_bytes_atomic(run_dir / TOKEN_FILE, security.token.encode())
    if security.tls is not None:
        write_bytes_atomic(run_dir / CA_FILE, security.tls.ca_pem)
    write_json_atomic(
        run_dir / ADDRESSES_FILE,
        {
            "memoryx": memoryx_address,
            "swarmx": swarmx_addresses,
            "nodes": node_addresses,
            "tls": security.tls is not None,
            "tls_server_name": security.tls.server_name if security.tls else None,
            "token_metadata_key": TOKEN_METADATA_KEY,
        },
    )
