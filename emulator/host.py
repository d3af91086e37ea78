"""Host processes: one Ray actor that runs one or several emulated components by name.

Every hosted component is the object a process of its own would hold (``MemoryXActor``,
``SwarmXActor``, ``NodeActor``): its own gRPC server on its own port, rank, data shard,
backend instance and counters. Only the process is shared, so the wire traffic the
emulator exercises is unchanged while the fixed cost of a process (torch, Ray, gRPC:
a few hundred MB and seconds of imports) is paid once per host, not once per node.

The process is the fault unit: SIGKILL or SIGSTOP takes every member with it, so the
cluster (``emulator.launch.Cluster.restart``) re-creates a lost host with the same
members from their constructor arguments and rewires each of them and their neighbours.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from typing import TYPE_CHECKING, Literal

import ray

from emulator.memory import available_memory_bytes, rss_bytes
from proto import shm
from proto.rpc import ray_node_ip

if TYPE_CHECKING:  # a host process needs none of the config system
    from emulator.config import RuntimeConfig

#: Resident memory of one idle actor process (torch, Ray, gRPC) when the driver's own
#: cannot be read; the planner prefers the driver's RSS, which imports the same.
DEFAULT_PROCESS_BYTES = 300 * 1024**2
#: Share of the machine's available memory that ``nodes_per_process: auto`` lets the
#: emulator's processes take (the rest: the nodes' own data and the driver).
AUTO_MEMORY_FRACTION = 0.5
#: ``auto`` also keeps the process count near the cores: a process costs seconds of one
#: core to start (Ray, torch, gRPC), while a node in a shared
#: process costs milliseconds; past a couple of processes per core they only contend.
AUTO_PROCESSES_PER_CORE = 2


#: ``sys.setswitchinterval`` of a host of many nodes, s (Python's default: 0.005). A host of many
#: nodes runs hundreds of gRPC threads; every one waiting for the GIL wakes each interval to
#: ask its holder to drop it, so with the default a process of 21 SwarmX nodes spent a third
#: more CPU per step (64-node mlp-digits, benchmarks/bench_scale.py), and 192 nodes in hosts
#: of 96 took 6.4 and 7.3 s per step against 5.8 and 5.2 s with this (2026-12-02). Threads
#: still hand the GIL over at once whenever they block on I/O or run a torch or numpy kernel.
HOST_SWITCH_INTERVAL_S = 0.05
#: Components a host holds before it takes ``HOST_SWITCH_INTERVAL_S``. A host of a few keeps
#: Python's default: there a layer's compute, back from a torch kernel that released the GIL,
#: would wait out the longer interval behind the thread that took it meanwhile (mlp-digits
#: at 4 nodes, 2 per host, alternating runs: 79, 87 and 89 ms per step with the default
#: against 90, 99 and 95 ms; 32 nodes, 16 per host: 645 and 552 against 665 and 747 ms).
HOST_SWITCH_MIN_COMPONENTS = 8
#: Seconds a component, or a wait for any one more of many, may take to start, s.
START_TIMEOUT_S = 120.0


class ComponentHost:
    """A process holding emulated components by name (a warm spare holds none yet)."""

    def __init__(self) -> None:
        self.components: dict[str, object] = {}
        #: When this process could first run Python of the emulator (Ray and this module
        #: imported), wall-clock s; and each component's constructor time, s.
        self.up_at_s = time.time()
        self.start_s: dict[str, float] = {}

    def start(self, component: str, component_class: type, **kwargs) -> str:
        """Run ``component_class(**kwargs)`` as ``component``; its gRPC address.

        Keyword arguments, so that Ray resolves object references among them (the
        nodes' layer skeleton, a user's data) as it does for an actor's constructor.
        """
        if component in self.components:
            raise ValueError(f"{component} already runs in this host")
        started = time.perf_counter()
        self.components[component] = component_class(**kwargs)
        self.start_s[component] = time.perf_counter() - started
        if len(self.components) == HOST_SWITCH_MIN_COMPONENTS:
            # Fewer forced GIL hand-offs among the many gRPC threads of a process that hosts
            # many nodes (HOST_SWITCH_INTERVAL_S); a process of a few keeps Python's default.
            sys.setswitchinterval(HOST_SWITCH_INTERVAL_S)
        return self.components[component].get_address()

    def timings(self) -> dict:
        """``up_at_s`` and the constructors' seconds (``start_s``): where launch time goes."""
        return {"up_at_s": self.up_at_s, "start_s": dict(self.start_s)}

    def call(self, component: str, method: str, *args, **kwargs):
        """``method(*args, **kwargs)`` of ``component``."""
        return getattr(self.components[component], method)(*args, **kwargs)

    def addresses(self) -> dict[str, str]:
        return {name: c.get_address() for name, c in self.components.items()}

    def pid(self) -> int:
        """This process's id (fault-injection tests signal it)."""
        return os.getpid()

    def where(self) -> dict[str, str]:
        """The Ray node and host address of this process (its placement)."""
        return {"ray_node_id": ray.get_runtime_context().get_node_id(), "host": ray_node_ip()}

    def remove(self, name: str) -> None:
        """Stop component ``name`` and forget it (the cluster shrank); the others keep running."""
        component = self.components.pop(name, None)
        if component is not None:
            component.stop()

    def shared_memory_counters(self) -> dict[str, int]:
        """Chunks this process moved through shared memory (``proto.shm``), by kind."""
        return dataclasses.asdict(shm.counters())

    def stop(self) -> None:
        for component in self.components.values():
            component.stop()
        shm.close()  # unlink this process's ring


def nodes_per_process(
    setting: int | Literal["auto"],
    num_components: int,
    *,
    available_bytes: int | None,
    process_bytes: int | None,
    num_cores: int | None,
) -> int:
    """How many emulated compute or SwarmX nodes share one process.

    ``auto``: one each while that many processes fit both in ``AUTO_MEMORY_FRACTION`` of
    the available memory (at ``process_bytes`` each, measured) and in
    ``AUTO_PROCESSES_PER_CORE`` per core; otherwise as few per process as fit.
    """
    if setting != "auto":
        return setting
    limits = []
    if available_bytes is not None:
        per_process = process_bytes or DEFAULT_PROCESS_BYTES
        limits.append(int(AUTO_MEMORY_FRACTION * available_bytes // per_process))
    if num_cores is not None:
        limits.append(AUTO_PROCESSES_PER_CORE * num_cores)
    if not limits:
        return 1
    max_processes = max(1, min(limits))
    return max(1, math.ceil(num_components / max_processes))


def plan_hosts(
    node_names: list[str],
    swarmx_names: list[str],
    per_process: int,
    swarmx_per_process: int | None = None,
) -> list[tuple[str, ...]]:
    """Members of each host: SwarmX nodes in tree order, ``swarmx_per_process`` each (None:
    ``per_process``), then compute nodes by consecutive rank, ``per_process`` each. A host
    runs one kind, so a lost host of compute nodes can be dropped whole when the cluster
    shrinks instead of being replaced."""
    swarmx_per = swarmx_per_process or per_process
    return [
        tuple(names[i : i + per])
        for names, per in ((swarmx_names, swarmx_per), (node_names, per_process))
        for i in range(0, len(names), per)
    ]


def swarmx_share(per_process: int, fanout: int) -> int:
    """SwarmX nodes per process when compute nodes share processes ``per_process`` each.

    A SwarmX node relays every layer to ``fanout`` children and sums their gradients: about
    the stream work of ``fanout`` compute nodes (measured: 0.23 s against 0.05 s of CPU per
    step, 64-node mlp-digits). Packed as many per process as compute nodes, the SwarmX tree's
    one process was the cluster's bottleneck, so it gets ``1 / fanout`` as many.
    """
    return max(1, per_process // fanout)


def resolve_nodes_per_process(
    runtime: RuntimeConfig, num_nodes: int, num_swarmx: int, fanout: int
) -> tuple[int, int]:
    """``runtime.nodes_per_process`` resolved, for compute nodes and for SwarmX nodes:
    ``auto`` from this machine's memory and cores (locally) or the Ray cluster's resources
    (``runtime.address``). When ``auto`` makes nodes share processes, a SwarmX node counts
    as ``fanout`` compute nodes (``swarmx_share``); a count is taken for both kinds."""
    if runtime.address is None:
        available, cores = available_memory_bytes(), os.cpu_count()
    else:
        resources = ray.available_resources()
        available, cores = resources.get("memory"), int(resources.get("CPU", 0)) or None

    def per(num_components: int) -> int:
        return nodes_per_process(
            runtime.nodes_per_process,
            num_components,
            available_bytes=available,
            # The driver imports what a host process does (torch, Ray, gRPC): its RSS is the
            # measured cost of one more process.
            process_bytes=rss_bytes(os.getpid()) or None,
            num_cores=cores,
        )

    shared = per(num_nodes + num_swarmx)
    if runtime.nodes_per_process != "auto" or shared == 1:
        return shared, shared
    weighted = per(num_nodes + fanout * num_swarmx)
    return _even(num_nodes, weighted), _even(num_swarmx, swarmx_share(weighted, fanout))


def _even(count: int, per_process: int) -> int:
    """Per process, for as many processes as ``per_process`` needs, filled evenly."""
    return math.ceil(count / math.ceil(count / per_process)) if count else per_process


def launch_phases(
    timings: list[dict], *, started_at_s: float, ray_s: float, components_s: float, launch_s: float
) -> dict[str, float]:
    """Where launch time went, s: Ray's start, the host processes' start (to the last one
    that could run the emulator's code), every component serving (the processes' start
    included), the constructors (median, slowest), and the wiring."""
    constructors = sorted(t for host in timings for t in host["start_s"].values())
    return {
        "ray_s": ray_s,
        "processes_up_s": max(h["up_at_s"] for h in timings) - started_at_s - ray_s,
        "components_s": components_s,
        "constructor_median_s": constructors[len(constructors) // 2],
        "constructor_max_s": constructors[-1],
        "wiring_s": launch_s - ray_s - components_s,
    }


def start_members(
    handle: ray.actor.ActorHandle, starts: list[tuple[str, type, dict]]
) -> dict[str, str]:
    """Start each ``(name, cls, kwargs)`` in host ``handle``; their addresses by name."""
    refs = [handle.start.remote(name, cls, **kwargs) for name, cls, kwargs in starts]
    found = ray.get(refs, timeout=START_TIMEOUT_S)
    return {name: address for (name, _, _), address in zip(starts, found, strict=True)}


def wait_started(refs: dict[str, ray.ObjectRef]) -> dict[str, str]:
    """Each component's address once it serves. However long a large cluster takes, a wait
    in which none more starts for START_TIMEOUT_S (a process stopped or hung) ends it:
    TimeoutError naming the components still starting."""
    pending = dict(refs)
    while pending:
        ready, _ = ray.wait(
            list(pending.values()), num_returns=len(pending), timeout=START_TIMEOUT_S
        )
        if not ready:
            raise TimeoutError(
                f"{', '.join(pending)} did not start within {START_TIMEOUT_S:.0f} s "
                "(its process is stopped, hung or starved)"
            )
        pending = {name: ref for name, ref in pending.items() if ref not in set(ready)}
    return dict(zip(refs, ray.get(list(refs.values())), strict=True))
