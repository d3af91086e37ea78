"""CPU seconds of this process and every process below it, by process, read when asked.

On a shared machine wall times swing with other people's jobs, CPU seconds do not:
``CpuMarks`` reads ``/proc/<pid>/stat`` (user + system time) of this process and all its
descendants (the private Ray instance a benchmark starts: raylet, GCS, the actors) at the
boundaries of what a benchmark times, so that it can say how many CPU seconds a window of
time (one training step) cost, and which processes spent them (grouped by the name Ray
gives a worker process, e.g. ``ray::ComputeNodeActor``). Linux only; an empty reading
elsewhere.
"""

from __future__ import annotations

import bisect
import os
import time
from pathlib import Path

from emulator.memory import stat_fields

_TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _read_stat(pid: str) -> tuple[int, float] | None:
    """(parent pid, user + system CPU seconds) of ``pid``, None if it is gone."""
    fields = stat_fields(pid)
    if fields is None:
        return None
    # Fields after the name: state ppid ... utime(14th of the line) stime(15th).
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICKS_PER_S


def _name(pid: str) -> str:
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    first = args[0].decode(errors="replace").strip() if args else "?"
    if first.startswith("ray::"):
        # Ray names a worker by its actor class and current method: keep the class.
        return first.split()[0].split(".")[0]
    return Path(first).name or "?"


def descendants_cpu(root: int, names: dict[int, str] | None = None) -> dict[int, tuple[str, float]]:
    """pid -> (name, CPU seconds) of ``root`` and every process below it, now.

    One read of each process's ``stat`` (its parent and its CPU), then the tree below
    ``root``: about 70 reads on this machine, where reading each thread's ``children``
    file cost 600 and 8% of a core at 10 samples a second, on the cores the measured
    emulator runs on. ``names``: a cache of names by pid, filled as processes appear.
    """
    names = {} if names is None else names
    stats: dict[int, tuple[int, float]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return {}  # no /proc (not Linux): an empty reading
    for entry in entries:
        if entry.isdigit() and (stat := _read_stat(entry)) is not None:
            stats[int(entry)] = stat
    below: dict[int, list[int]] = {}
    for pid, (parent, _) in stats.items():
        below.setdefault(parent, []).append(pid)
    found, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            if pid not in names:
                names[pid] = _name(str(pid))
            found[pid] = (names[pid], stats[pid][1])
            todo += below.get(pid, [])
    return found


class CpuMarks:
    """Readings of ``descendants_cpu`` of this process, each taken when ``mark`` is called.

    A benchmark marks the boundaries of what it times (a training step), between the
    steps, when the emulator is idle: a reading costs about 1.75 ms of CPU on this
    machine, and a sampling thread (10 readings a second) spent that on the same cores as
    the steps it measured, 7% of a core in a 1-node gpt-10m step, which slowed the step.
    """

    def __init__(self):
        self.times: list[float] = []  # time.perf_counter() at each reading
        self.samples: list[dict[int, tuple[str, float]]] = []
        self._names: dict[int, str] = {}
        self.own_cpu_s = 0.0  # CPU of this process spent on the readings, s

    def mark(self) -> float:
        """Read every process's CPU now; the ``time.perf_counter()`` of the reading."""
        before_s = time.thread_time()
        root = os.getpid()
        sample = descendants_cpu(root, self._names)
        self.own_cpu_s += time.thread_time() - before_s
        if root in sample:  # this process, less what its readings cost
            sample[root] = ("driver", sample[root][1] - self.own_cpu_s)
        now = time.perf_counter()
        self.samples.append(sample)
        self.times.append(now)
        return now

    def window(self, start: float, end: float) -> dict[int, tuple[str, float]]:
        """pid -> (name, CPU seconds spent between two ``time.perf_counter()`` times), for
        the processes alive at the window's end: from the last reading at or before
        ``start`` to the first at or after ``end`` (the nearest ones if there is none)."""
        if not self.samples:
            return {}
        first = max(bisect.bisect_right(self.times, start) - 1, 0)
        last = min(bisect.bisect_left(self.times, end), len(self.times) - 1)
        before, after = self.samples[first], self.samples[last]
        return {
            pid: (name, cpu_s - before.get(pid, (name, 0.0))[1])
            for pid, (name, cpu_s) in after.items()
        }
