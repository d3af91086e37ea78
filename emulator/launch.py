"""Launch a cluster's components in Ray actor processes and wire them together.

Every component serves gRPC on its host's address from a ``ComponentHost`` process
(emulator.host), alone or with others (``runtime.nodes_per_process``); after launch
the driver talks to the components only over gRPC. Ray, the run's credentials and its
directory come from emulator.runtime.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray
from ray.util.placement_group import PlacementGroup, remove_placement_group
from torch import nn

from core.data import DataConfig, Dataset
from emulator.component_specs import MEMORYX, component_specs, memoryx_name
from emulator.config import ClusterConfig
from emulator.groups import subtree_dtypes
from emulator.host import (
    START_TIMEOUT_S,
    ComponentHost,
    launch_phases,
    plan_hosts,
    resolve_nodes_per_process,
    start_members,
    wait_started,
)
from emulator.runtime import (
    CHECKPOINT_DIR,
    TOKEN_FILE,
    _make_run_dir,
    _stage_resume,
    ensure_ray,
    export_checkpoint,
    placement_options,
    run_security,
    shared_memory_plan,
    write_client_files,
)
from memoryx.shard_plan import Shard
from nodes.worker import strip_parameters
from proto import shm
from proto.rpc import Security
from swarmx.tree import TreeNode, node_name

# Actors mostly wait on the network; the cores are shared as the real
# processes would share a host. num_cpus=0 lets a 2-core machine hold a cluster.
_ACTOR_OPTIONS = {"num_cpus": 0, "max_concurrency": 4}


#: How long a (re)started actor may take to come up and answer, s.


@dataclass
class Cluster:
    """Host processes and gRPC addresses of a launched cluster's components, and the run's
    credentials.

    Components are named ``memoryx`` (MemoryX server 0; server k >= 1 is ``memoryx-<k>``),
    ``swarmx-<level>-<i>`` and ``node-<rank>``. Each runs in a ``ComponentHost`` process,
    alone or with others (``runtime.nodes_per_process``); the process is the fault unit.
    ``specs`` keeps each one's class and constructor arguments, so that ``restart``
    starts a replacement exactly as the original was started.
    """

    tree: list[TreeNode]
    security: Security = field(repr=False)
    run_dir: Path
    #: Every component's gRPC address by name: MemoryX servers, SwarmX nodes (tree
    #: order), compute nodes (rank order).
    component_addresses: dict[str, str]
    #: The process each component runs in (components of one process share the handle).
    host_of: dict[str, ray.actor.ActorHandle] = field(repr=False)
    #: The layers each MemoryX server holds (one server: all).
    memoryx_layers: list[range] = field(default_factory=list)
    #: What each server holds: its layers, and pieces of those split over servers.
    memoryx_shards: list[Shard] = field(default_factory=list)
    specs: dict[str, tuple[type, dict]] = field(default_factory=dict, repr=False)
    #: Names of the compute nodes, in rank order (a cluster that shrank has gaps).
    node_names: list[str] = field(default_factory=list)
    #: Weights' dtype into each SwarmX and compute node of a mixed-precision tree ({}: one).
    wire_dtypes: dict[str, str] = field(default_factory=dict)
    #: A warm ``ComponentHost`` that the next replacement starts in (None: none kept, or
    #: not started yet: ``start_spare``).
    spare: ray.actor.ActorHandle | None = None
    #: ``runtime.spare_actor``: keep a spare once ``start_spare`` is called.
    spare_wanted: bool = False
    #: Ray options of each component's process (its placement-group bundle), by name.
    host_options: dict[str, dict] = field(default_factory=dict, repr=False)
    #: The process id (on its own machine) of each component's process, by name.
    process_ids: dict[str, int] = field(default_factory=dict)
    #: Emulated compute nodes per process (``runtime.nodes_per_process``), and SwarmX nodes.
    nodes_per_process: int = 1
    swarmx_nodes_per_process: int = 1
    #: Seconds from the call of ``launch`` until every component served and was wired.
    launch_time_s: float = 0.0
    #: Where launch time went: Ray's start, processes up, components serving, wiring, s.
    launch_phases: dict[str, float] = field(default_factory=dict)
    #: ``runtime.placement``: 'pack', 'spread' or None (Ray's own scheduling).
    placement_strategy: str | None = None
    placement_group: PlacementGroup | None = field(default=None, repr=False)
    _temporary_run_dir: bool = field(default=False)
    _stopped: bool = field(default=False)

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / CHECKPOINT_DIR

    def export_checkpoint(self, name: str, destination: str | Path) -> None:
        """Copy checkpoint ``name`` that MemoryX wrote in the run directory to ``destination``."""
        export_checkpoint(self.checkpoint_dir, name, destination)

    @property
    def memoryx_names(self) -> list[str]:
        return [n for n in self.component_addresses if self.is_memoryx(n)]

    @property
    def memoryx_servers(self) -> list[ray.actor.ActorHandle]:
        return [self.host_of[n] for n in self.memoryx_names]

    @property
    def memoryx_addresses(self) -> list[str]:
        return [self.component_addresses[n] for n in self.memoryx_names]

    @property
    def memoryx(self) -> ray.actor.ActorHandle:  # the first MemoryX server
        return self.host_of[MEMORYX]

    @property
    def memoryx_address(self) -> str:
        return self.component_addresses[MEMORYX]

    @property
    def swarmx(self) -> dict[str, ray.actor.ActorHandle]:
        return {t.name: self.host_of[t.name] for t in self.tree}

    @property
    def swarmx_addresses(self) -> dict[str, str]:
        return {t.name: self.component_addresses[t.name] for t in self.tree}

    @property
    def nodes(self) -> list[ray.actor.ActorHandle]:
        return [self.host_of[n] for n in self.node_names]

    @property
    def node_addresses(self) -> list[str]:
        return [self.component_addresses[n] for n in self.node_names]

    @property
    def root_address(self) -> str:
        return self.component_addresses[self.tree[-1].name]

    @property
    def addresses(self) -> dict[str, str]:
        """Every component's gRPC address, by name."""
        return dict(self.component_addresses)

    @property
    def processes(self) -> list[ray.actor.ActorHandle]:
        """Every host process once (MemoryX's first), without the spare."""
        unique = {id(h): h for h in self.host_of.values()}
        return list(unique.values())

    def members(self, name: str) -> list[str]:
        """The components that share ``name``'s process (``name`` included)."""
        host = self.handle(name)
        return [n for n, h in self.host_of.items() if h is host]

    def is_memoryx(self, name: str) -> bool:
        """True if ``name`` is one of the MemoryX servers."""
        return name == MEMORYX or (
            name.startswith(f"{MEMORYX}-") and name.removeprefix(f"{MEMORYX}-").isdigit()
        )

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

    def start_spare(self) -> None:
        """Start the warm spare, if the run keeps one and it is not up yet. Called after the
        first step: a process's start costs seconds of CPU, which the launch and the first
        step would otherwise share with it."""
        if self.spare_wanted and self.spare is None and not self._stopped:
            self.spare = _remote(ComponentHost).remote()

    def handle(self, name: str) -> ray.actor.ActorHandle:
        """The process (a ``ComponentHost`` actor) that runs component ``name``."""
        if name not in self.host_of:
            raise KeyError(f"no component named {name!r}")
        return self.host_of[name]

    def call(self, name: str, method: str, *args, **kwargs) -> ray.ObjectRef:
        """``method(*args, **kwargs)`` of component ``name``, in its process."""
        return self.handle(name).call.remote(name, method, *args, **kwargs)

    def restart(self, name: str, member_changes: dict[str, dict] | None = None, **changes) -> str:
        """Replace ``name``'s process: a new one runs every component the old one ran,
        started with its original arguments (``changes`` overrides some of ``name``'s,
        e.g. MemoryX's ``checkpoint``; ``member_changes`` those of any member, e.g. a
        node's ``pass_state``), and each of them and their neighbours is rewired.
        The old process is killed first (it may be hung, not dead). Returns ``name``'s new
        address.
        """
        members = self.members(name)
        ray.kill(self.handle(name), no_restart=True)
        by_member = {
            **(member_changes or {}),
            name: {**(member_changes or {}).get(name, {}), **changes},
        }
        starts = [
            (m, self.specs[m][0], {**self.specs[m][1], **by_member.get(m, {})}) for m in members
        ]
        options = self.host_options.get(name, {})
        handle, addresses = None, None
        # The spare sits where Ray put it: a placed process is replaced in its own bundle.
        if self.spare is not None and not options:
            handle, self.spare = self.spare, _remote(ComponentHost).remote()
            try:
                addresses = start_members(handle, starts)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                ray.kill(handle, no_restart=True)
                handle = None  # the spare itself was lost: start the process afresh
        if handle is None:
            handle = _remote(ComponentHost).options(**options).remote()
            try:
                addresses = start_members(handle, starts)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
                ray.kill(handle, no_restart=True)
                raise RuntimeError(f"the replacement of {name} failed to start: {exc}") from exc
        pid = ray.get(handle.pid.remote(), timeout=START_TIMEOUT_S)
        rewire: dict[str, None] = {}  # ordered, once each
        for m in members:
            self.host_of[m], self.component_addresses[m] = handle, addresses[m]
            self.process_ids[m] = pid
            if self.is_memoryx(m):
                rewire[self.tree[-1].name] = None
            elif m in self.node_names:
                rewire.update(dict.fromkeys([m, self._parent_of(m)]))
            else:
                entry = self._entry(m)
                rewire.update(
                    dict.fromkeys([m, *([entry.parent] if entry.parent else []), *entry.children])
                )
        ray.get([self._connect(n) for n in rewire], timeout=START_TIMEOUT_S)
        return addresses[name]

    def _entry(self, name: str) -> TreeNode:
        return next(t for t in self.tree if t.name == name)

    def _parent_of(self, child: str) -> str:
        return next(t.name for t in self.tree if child in t.children)

    def _connect(self, name: str) -> ray.ObjectRef:
        """(Re)wire component ``name`` to its current neighbours' addresses."""
        if name in self.node_names:
            return self.call(name, "connect", self.component_addresses[self._parent_of(name)])
        entry = self._entry(name)
        by_name = self.component_addresses
        dtypes = self.wire_dtypes
        return self.call(
            name,
            "connect",
            children={c: by_name[c] for c in entry.children},
            parent=by_name[entry.parent] if entry.parent else None,
            memoryx=None if entry.parent else self.memoryx_by_layer,
            **({"memoryx_split": self.memoryx_split} if self.memoryx_split else {}),
            **(
                {"child_dtypes": {c: dtypes[c] for c in entry.children}, "dtype": dtypes[name]}
                if dtypes
                else {}
            ),
        )

    def drop_node(self, name: str) -> None:
        """Shrink the cluster: drop compute node ``name`` with every compute node of its
        process (the fault unit), prune them (and SwarmX nodes left without children)
        from the tree, and give the survivors the shards of a cluster of their size, in
        rank order. The global batch is unchanged.
        """
        dropped = [m for m in self.members(name) if m in self.node_names]
        if len(self.node_names) <= len(dropped):
            raise RuntimeError(f"cannot drop {name}: no compute node would be left")
        self._forget(dropped)
        for node in dropped:
            self.node_names.remove(node)
        gone = set(dropped)
        while gone:
            self.tree = [
                dataclasses.replace(t, children=tuple(c for c in t.children if c not in gone))
                for t in self.tree
                if t.name not in gone
            ]
            gone = {t.name for t in self.tree if t.parent is not None and not t.children}
            self._forget(sorted(gone))
        refs = [self._connect(t.name) for t in self.tree]
        refs += [
            self.call(node, "reshard", rank, len(self.node_names))
            for rank, node in enumerate(self.node_names)
        ]
        ray.get(refs, timeout=START_TIMEOUT_S)

    def _forget(self, names: list[str]) -> None:
        """Take components ``names`` out of the cluster; a process goes with its last member
        (killed: it may be dead or hung), one that keeps members stops just these."""
        by_process: dict[int, tuple[ray.actor.ActorHandle, list[str]]] = {}
        for name in names:
            handle = self.host_of.pop(name)
            del self.component_addresses[name]
            self.process_ids.pop(name, None)
            by_process.setdefault(id(handle), (handle, []))[1].append(name)
        for handle, gone in by_process.values():
            if any(h is handle for h in self.host_of.values()):
                ray.get([handle.remove.remote(n) for n in gone], timeout=START_TIMEOUT_S)
            else:
                ray.kill(handle, no_restart=True)

    def pids(self) -> dict[str, list[int]]:
        """Process ids (on their own machines) of the MemoryX servers and the other hosts,
        each once; replacements included (no RPC: ``process_ids`` is kept up to date)."""
        process_ids = self.process_ids.copy()  # atomic: restart may update it meanwhile
        memoryx = {pid for name, pid in process_ids.items() if self.is_memoryx(name)}
        return {
            "memoryx": sorted(memoryx),
            "hosts": sorted(set(process_ids.values()) - memoryx),
        }

    def placement(self) -> dict:
        """Per component (MemoryX servers, SwarmX nodes, compute nodes): its Ray node and host."""
        processes = self.processes
        places = ray.get([h.where.remote() for h in processes], timeout=START_TIMEOUT_S)
        of = {id(h): place for h, place in zip(processes, places, strict=True)}
        return {
            "memoryx": of[id(self.memoryx)],
            "memoryx_servers": [of[id(h)] for h in self.memoryx_servers],
            "swarmx": {name: of[id(h)] for name, h in self.swarmx.items()},
            "nodes": [
                {"rank": rank, **of[id(self.host_of[n])]} for rank, n in enumerate(self.node_names)
            ],
        }

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        handles = self.processes
        if self.spare is not None:
            handles.append(self.spare)
        # A dead or hung process must not keep the others running: each gets its own
        # bounded stop, and every actor is killed whatever the stops did.
        refs = [h.stop.remote() for h in handles]
        ray.wait(refs, num_returns=len(refs), timeout=10)
        for handle in handles:
            ray.kill(handle)
        if self.placement_group is not None:
            remove_placement_group(self.placement_group)
        if self.security.shared_memory is not None:
            shm.reset()  # the driver's views of the rings
            # Rings of processes a fault killed (the others unlinked theirs when stopped).
            shm.remove_run_segments(self.security.shared_memory)
        # The token is worthless now; a temporary run directory goes with it.
        (self.run_dir / TOKEN_FILE).unlink(missing_ok=True)
        if self._temporary_run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)


#: The name of MemoryX server 0; server k >= 1 is ``memoryx-<k>`` (``memoryx_name``).
def _remote(cls: type):
    return ray.remote(**_ACTOR_OPTIONS)(cls)


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
    launch_started, launch_started_at_s = time.perf_counter(), time.time()
    ensure_ray(config.runtime.address, verbose=config.runtime.verbose)
    ray_started = time.perf_counter()
    security = run_security(
        config.runtime,
        shared_memory=shared_memory_plan(
            config.runtime,
            slot_bytes=config.swarmx.chunk_bytes,
            layer_bytes=[sum(p.numel() for p in layer.parameters()) * 4 for layer in layers],
            # At most: the MemoryX servers, the compute nodes and as many SwarmX nodes.
            num_servers=config.memoryx.num_servers + config.num_nodes * 2,
        ),
    )
    # The driver reads chunks too (final weights, checkpoints); it writes them as bytes.
    shm.activate(security.shared_memory, writes=False)
    run_dir, temporary = _make_run_dir(config.runtime)
    checkpoint_dir = run_dir / CHECKPOINT_DIR
    try:
        checkpoint_dir.mkdir(mode=0o700, exist_ok=True)
        resume = None if config.resume is None else _stage_resume(config.resume, checkpoint_dir)
    except BaseException:
        if temporary:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
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
    specs = component_specs(
        config,
        shards=shards,
        tree=tree,
        backends=backends,
        security=security,
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        skeleton=skeleton_ref,
        data=data,
        spans=spans,
    )
    # Every compute and SwarmX node in a host process, ``per_process`` each; MemoryX alone.
    per_process, swarmx_per_process = resolve_nodes_per_process(
        config.runtime, config.num_nodes, len(tree), config.swarmx.fanout
    )
    node_names = [node_name(rank) for rank in range(config.num_nodes)]
    groups = [(memoryx_name(k),) for k in range(len(ranges))]
    groups += plan_hosts(node_names, [t.name for t in tree], per_process, swarmx_per_process)
    try:
        options, group = placement_options(config.runtime.placement, len(groups))
    except BaseException:
        if temporary:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    # SPREAD: on a cluster of several hosts the MemoryX servers go to different ones
    # (unless runtime.placement places every process).
    options[: len(ranges)] = [
        o or {"scheduling_strategy": "SPREAD"} for o in options[: len(ranges)]
    ]
    host_options = {name: o for members, o in zip(groups, options, strict=True) for name in members}
    # Every process is created before any is waited on: Ray starts them concurrently.
    hosts = [_remote(ComponentHost).options(**o).remote() for o in options]
    host_of = {name: h for members, h in zip(groups, hosts, strict=True) for name in members}
    refs = {
        name: host_of[name].start.remote(name, cls, **kwargs)
        for name, (cls, kwargs) in specs.items()
    }
    try:
        addresses = wait_started(refs)
    except (ray.exceptions.RayActorError, TimeoutError) as exc:
        for handle in hosts:
            ray.kill(handle)
        if group is not None:
            remove_placement_group(group)
        if temporary:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise RuntimeError(f"a cluster component failed to start: {exc}") from exc
    components_started = time.perf_counter()
    cluster = Cluster(
        tree=tree,
        security=security,
        run_dir=run_dir,
        component_addresses=addresses,
        host_of=host_of,
        memoryx_layers=ranges,
        memoryx_shards=shards,
        specs=specs,
        node_names=node_names,
        wire_dtypes=subtree_dtypes(tree, [b.wire_dtype for b in backends]),
        # The spare starts after the first step (train), warm by the time a component is lost.
        spare_wanted=config.runtime.spare_actor,
        # A replacement goes to its process's bundle (no placement: wherever Ray puts it).
        host_options=host_options if group is not None else {},
        nodes_per_process=per_process,
        swarmx_nodes_per_process=swarmx_per_process,
        placement_strategy=config.runtime.placement,
        placement_group=group,
        _temporary_run_dir=temporary,
    )
    try:
        pids = ray.get([h.pid.remote() for h in hosts], timeout=START_TIMEOUT_S)
        pid_of = {id(h): pid for h, pid in zip(hosts, pids, strict=True)}
        cluster.process_ids = {name: pid_of[id(h)] for name, h in host_of.items()}
        ray.get(
            [cluster._connect(n) for n in specs if not cluster.is_memoryx(n)],
            timeout=START_TIMEOUT_S,
        )
    except (ray.exceptions.RayActorError, TimeoutError) as exc:
        cluster.stop()
        raise RuntimeError(f"the cluster could not be wired: {exc}") from exc
    cluster.launch_time_s = time.perf_counter() - launch_started
    cluster.launch_phases = launch_phases(
        ray.get([h.timings.remote() for h in hosts], timeout=START_TIMEOUT_S),
        started_at_s=launch_started_at_s,
        ray_s=ray_started - launch_started,
        components_s=components_started - ray_started,
        launch_s=cluster.launch_time_s,
    )
    write_client_files(
        run_dir,
        security,
        cluster.memoryx_address,
        cluster.swarmx_addresses,
        cluster.node_addresses,
    )
    return cluster
