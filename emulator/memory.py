"""Resident memory of the driver and the cluster's actor processes, sampled over a run,
and the run's JSON ``runtime`` block (``RuntimeWatch``).

Read from ``/proc`` (Linux), so only processes on the driver's machine are seen;
a process that cannot be read (another host, already gone) counts as 0.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import ray

if TYPE_CHECKING:
    from emulator.launch import Cluster

_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

#: PSS is read again when the summed RSS has grown by more than this fraction since the
#: last PSS reading. A run's RSS creeps up by a few pages at a time for long after its
#: first steps; rereading PSS on each such page (every 2 s) cost a 1-node gpt-10m run about
#: 40 ms of CPU a second, on the cores its steps run on. The PSS peak may so read low by
#: up to this fraction, between two readings; the last reading (the run's end) is exact.
PSS_REREAD_GROWTH = 0.01


def rss_bytes(pid: int) -> int:
    """Resident set size of process ``pid``, bytes (0 if it cannot be read)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * _PAGE_BYTES
    except (OSError, ValueError, IndexError):
        return 0


def pss_bytes(pid: int) -> int:
    """Proportional set size of process ``pid``, bytes: its private pages plus its share of
    each page it shares (libraries' code, a shared-memory ring mapped by several processes)
    with the processes that map it. Summed over processes, PSS is the memory they hold
    together, where a sum of RSS counts every shared page once per process.

    Read from ``/proc/<pid>/smaps_rollup`` (Linux 4.14+); RSS where that cannot be read,
    0 where neither can. The kernel walks the process's pages for it: about 20 ms per GB,
    so it is sampled less often than RSS.
    """
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return rss_bytes(pid)


def available_memory_bytes() -> int | None:
    """The machine's MemAvailable, bytes; None where /proc/meminfo does not exist."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def stat_fields(pid: int | str) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name, the state first (field 3
    of the line); None if it cannot be read. The name, in parentheses, may hold spaces and
    parentheses itself: the fields start after its last closing one."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    end = text.rfind(")")
    return None if end < 0 else text[end + 2 :].split()


def process_age_s() -> float | None:
    """Seconds since this process started (the command, for a CLI run); None off Linux."""
    fields = stat_fields("self")
    if fields is None:
        return None
    try:
        # Field 22 of the line: start time in clock ticks.
        start_ticks = int(fields[19])
        with open("/proc/uptime") as f:
            uptime_s = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return uptime_s - start_ticks / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process ``pid`` so far, s (0 if it cannot be read)."""
    fields = stat_fields(pid)
    if fields is None:
        return 0.0
    try:
        # Fields 14 and 15 of the line: utime, stime in ticks.
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (ValueError, IndexError):
        return 0.0


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children, theirs, ...) on this machine."""
    children: dict[int, list[int]] = {}
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return []
    for entry in entries:
        fields = stat_fields(entry)
        if fields is None or len(fields) < 2 or not fields[1].isdigit():
            continue
        parent = int(fields[1])
        children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def cpu_split() -> dict[str, float]:
    """CPU seconds so far of this process (the driver: its imports included) and of the
    processes below it (a local Ray: its own services and the actor processes)."""
    times = os.times()
    return {
        "driver_s": times.user + times.system,
        "ray_and_actors_s": sum(cpu_seconds(p) for p in descendants(os.getpid())),
    }


def _keep_peaks(
    peaks: dict[str, int], groups: dict[str, list[int]], measure: Callable[[int], int]
) -> int:
    """Raise each group's peak in ``peaks`` to its sum of ``measure`` now; the total now."""
    by_group = {name: sum(measure(p) for p in pids) for name, pids in groups.items()}
    for name, value in by_group.items():
        peaks[name] = max(peaks.get(name, 0), value)
    return sum(by_group.values())


class MemorySampler:
    """Samples the summed memory of groups of pids in a thread; keeps the peaks.

    ``groups`` names subsets of the pids (e.g. ``{"driver": [..], "actors": [..]}``), or is
    a function that returns them, asked at every sample: a process that replaced a lost one
    is then sampled from its start (the lost one reads 0 once gone). Each group's peak of
    its own sum is kept too.

    Two measures: RSS every ``interval_s`` (cheap: ``peak_rss_bytes``, ``peak_rss_by_group``)
    and PSS (``peak_bytes``, ``peak_by_group``) at the start and the end, and whenever the
    summed RSS has grown past its level at the last PSS reading by more than
    ``PSS_REREAD_GROWTH``, at most every
    ``pss_interval_s``: a sum of RSS counts each shared page once per process that maps
    it, so it overstates what processes that share libraries and shared-memory rings use,
    but reading PSS makes the kernel walk every page (about 20 ms per GB), so a run whose
    memory has stopped growing stops paying for it.
    """

    def __init__(
        self,
        groups: dict[str, list[int]] | Callable[[], dict[str, list[int]]],
        *,
        interval_s: float = 0.25,
        pss_interval_s: float = 2.0,
    ):
        self.groups = groups if callable(groups) else (lambda: groups)
        self.interval_s = interval_s
        self.pss_interval_s = pss_interval_s
        self.peak_bytes = 0
        self.peak_rss_bytes = 0
        names = list(self.groups())
        self.peak_by_group = dict.fromkeys(names, 0)
        self.peak_rss_by_group = dict.fromkeys(names, 0)
        self._last_pss_s = -float("inf")
        self._rss_at_last_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)

    def sample(self, *, always_pss: bool = True) -> None:
        """Read RSS, and PSS too: always, or (``always_pss=False``) when it is due."""
        groups = self.groups()
        rss = _keep_peaks(self.peak_rss_by_group, groups, rss_bytes)
        self.peak_rss_bytes = max(self.peak_rss_bytes, rss)
        now = time.monotonic()
        grown = rss > self._rss_at_last_pss * (1 + PSS_REREAD_GROWTH)
        due = grown and now - self._last_pss_s >= self.pss_interval_s
        if always_pss or due:
            self._last_pss_s, self._rss_at_last_pss = now, rss
            total = _keep_peaks(self.peak_by_group, groups, pss_bytes)
            self.peak_bytes = max(self.peak_bytes, total)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample(always_pss=False)

    def __enter__(self) -> MemorySampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


class RuntimeWatch:
    """The JSON ``runtime`` block of a run: launch cost, processes, placement and the
    emulator's peak memory, sampled from launch to the end of the steps.

    Memory is proportional (PSS) bytes read on the driver's machine, summed over the
    driver, MemoryX and the host processes (a process on another machine counts 0), with
    the sum of resident (RSS) bytes beside it; per emulated node is the hosts' peak over
    the compute and SwarmX nodes they run. A process that replaced a lost one is sampled
    from then on (``Cluster.pids`` follows replacements).
    """

    def __init__(self, cluster: Cluster, started_s: float):
        self.cluster = cluster
        self.started_s = started_s
        driver = [os.getpid()]
        self.sampler = MemorySampler(lambda: {"driver": driver, **cluster.pids()})
        self.sampler.__enter__()
        self.placement = cluster.placement()
        self._steps_started_s: float | None = None
        self._steps_started_age_s: float | None = None
        self._first_step_cpu_s: dict[str, float] | None = None
        self._step_cpu_s: dict[str, float] | None = None
        self._last_step_cpu_s: dict[str, float] = {}
        self._num_later_steps = 0
        # CPU s of each step after the first (driver, MemoryX and hosts): what a benchmark
        # judges once the run is warm (its first steps grow thread pools and connections).
        self._later_step_cpu_s: list[float] = []
        self.shared_memory: dict | None = None  # read at stop, while the processes live

    def steps_started(self) -> None:
        self._steps_started_s, self._steps_started_age_s = time.perf_counter(), process_age_s()

    def step_done(self) -> None:
        """Note the CPU time spent so far, after each training step: to the first step, and
        per step after it. CPU seconds are what a busy machine inflates least."""
        if self._first_step_cpu_s is None:
            self._first_step_cpu_s = cpu_split()
        # Per step: the driver, MemoryX and the hosts (not Ray's services or the spare).
        pids = self.cluster.pids()
        by_kind = self._pids_by_kind()
        cpu = {pid: cpu_seconds(pid) for pid in pids["memoryx"] + pids["hosts"]}
        now = {
            "driver_s": cpu_seconds(os.getpid()),
            "actors_s": sum(cpu.values()),
            # Split by what the processes host: which kind's CPU grows with the cluster.
            **{f"{kind}_s": sum(cpu.get(p, 0.0) for p in found) for kind, found in by_kind.items()},
        }
        if self._step_cpu_s is None:
            self._step_cpu_s = now
        else:
            before = self._last_step_cpu_s or self._step_cpu_s
            # /proc counts CPU in clock ticks (10 ms): a short step may show none, and the float
            # sums may differ by a few ulp; rounded to the microsecond, none shows as -1e-15.
            self._later_step_cpu_s.append(
                round(
                    now["driver_s"] + now["actors_s"] - before["driver_s"] - before["actors_s"], 6
                )
            )
            self._num_later_steps += 1
            self._last_step_cpu_s = now

    def _pids_by_kind(self) -> dict[str, set[int]]:
        """Process ids of the MemoryX servers, the SwarmX hosts and the compute-node hosts."""
        process_ids = self.cluster.process_ids.copy()  # atomic, as in Cluster.pids
        swarmx = {t.name for t in self.cluster.tree}
        kinds: dict[str, set[int]] = {"memoryx": set(), "swarmx": set(), "nodes": set()}
        for name, pid in process_ids.items():
            kind = (
                "memoryx"
                if self.cluster.is_memoryx(name)
                else ("swarmx" if name in swarmx else "nodes")
            )
            kinds[kind].add(pid)
        return kinds

    def _per_later_step(self, keys: tuple[str, ...]) -> dict[str, float] | None:
        if not self._num_later_steps:
            return None
        first, last = self._step_cpu_s, self._last_step_cpu_s
        return {k: (last[k] - first[k]) / self._num_later_steps for k in keys}

    def _cpu_per_later_step(self) -> dict[str, float] | None:
        return self._per_later_step(("driver_s", "actors_s"))

    def stop(self) -> None:
        if self.sampler._thread.is_alive():
            self.sampler.__exit__(None, None, None)
        self.shared_memory = self._shared_memory()

    def _shared_memory(self) -> dict:
        """Chunks moved through shared memory by the live processes (``proto.shm``), in all
        and by kind of process: by reference ``written`` and ``read`` (verified), and
        ``inline`` (too large for a slot)."""
        cluster = self.cluster
        plan = cluster.security.shared_memory
        out: dict = {"enabled": plan is not None}
        if plan is None:
            return out
        swarmx = {t.name for t in cluster.tree}
        kinds: dict = {}
        for name, handle in cluster.host_of.items():
            kind = (
                "memoryx" if cluster.is_memoryx(name) else "swarmx" if name in swarmx else "nodes"
            )
            # A process of SwarmX and compute nodes counts with the compute nodes.
            if kinds.get(id(handle), (None, ""))[1] != "nodes":
                kinds[id(handle)] = (handle, kind)
        handles = list(kinds.values())
        refs = [h.shared_memory_counters.remote() for h, _ in handles]
        ray.wait(refs, num_returns=len(refs), timeout=10)
        zero = {"written": 0, "read": 0, "inline": 0}
        out.update(zero)
        out["by_kind"] = {k: dict(zero) for k in ("memoryx", "swarmx", "nodes")}
        for (_, kind), ref in zip(handles, refs, strict=True):
            try:
                counts = ray.get(ref, timeout=0)
            except (ray.exceptions.RayError, TimeoutError):  # a process lost to a fault
                continue
            for key, value in counts.items():
                out[key] += value
                out["by_kind"][kind][key] += value
        return out

    def report(self, first_step_wall_s: float | None) -> dict:
        """The block, given the first step's own wall time (None: no step ran)."""
        cluster = self.cluster
        num_emulated = len(cluster.node_names) + len(cluster.tree)
        peak = self.sampler.peak_by_group
        first_s = first_age_s = None
        if first_step_wall_s is not None and self._steps_started_s is not None:
            first_s = self._steps_started_s - self.started_s + first_step_wall_s
            if self._steps_started_age_s is not None:
                first_age_s = self._steps_started_age_s + first_step_wall_s
        return {
            "launch_time_s": cluster.launch_time_s,
            "launch_phases": cluster.launch_phases,
            # From train's call (first) and from the start of the command's process (second,
            # Ray start and imports included) to the end of the first step.
            "time_to_first_step_s": first_s,
            "first_step_since_process_start_s": first_age_s,
            # CPU seconds to the end of the first step: the driver's (from its start) and
            # those of the processes it started (a local Ray's services and the actors).
            "first_step_cpu_s": self._first_step_cpu_s,
            # ... and per training step after the first, of the driver and of MemoryX and the
            # hosts (a process replaced meanwhile takes its CPU time with it: then this is off).
            "cpu_per_step_s": self._cpu_per_later_step(),
            # ... the actors' share split by kind of process (they sum to actors_s).
            "cpu_per_step_by_kind_s": self._per_later_step(("memoryx_s", "swarmx_s", "nodes_s")),
            # ... and of each step after the first, in order (driver, MemoryX and hosts).
            "cpu_s_by_later_step": list(self._later_step_cpu_s),
            "nodes_per_process": cluster.nodes_per_process,
            "swarmx_nodes_per_process": cluster.swarmx_nodes_per_process,
            "num_processes": len(cluster.processes),
            "num_emulated_nodes": num_emulated,
            # PSS (shared pages divided among the processes sharing them), read while the
            # memory grows; the sum of RSS, sampled every 0.25 s, counts them per process.
            "memory": {
                "measure": "pss",
                "peak_bytes": self.sampler.peak_bytes,
                "peak_driver_bytes": peak["driver"],
                "peak_memoryx_bytes": peak["memoryx"],
                "peak_hosts_bytes": peak["hosts"],
                "per_emulated_node_bytes": peak["hosts"] / num_emulated,
                "peak_rss_bytes": self.sampler.peak_rss_bytes,
                "peak_hosts_rss_bytes": self.sampler.peak_rss_by_group["hosts"],
            },
            "placement_strategy": cluster.placement_strategy,
            "placement": self.placement,
            # runtime.shared_memory: whether chunk payloads went through shared memory, and
            # how many (the traffic figures count them as fabric bytes all the same).
            "shared_memory": self.shared_memory,
        }
