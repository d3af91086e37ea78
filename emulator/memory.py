"""Resident memory of the driver and the cluster's actor processes, sampled over a run.

Read from ``/proc`` (Linux), so only processes on the driver's machine are seen;
a process that cannot be read (another host, already gone) counts as 0.
"""

from __future__ import annotations

import os
import threading

_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes(pid: int) -> int:
    """Resident set size of process ``pid``, bytes (0 if it cannot be read)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * _PAGE_BYTES
    except (OSError, ValueError, IndexError):
        return 0


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


def process_age_s() -> float | None:
    """Seconds since this process started (the command, for a CLI run); None off Linux."""
    try:
        with open("/proc/self/stat") as f:
            # Field 22 (after the parenthesised command name): start time in clock ticks.
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime_s = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return uptime_s - start_ticks / os.sysconf("SC_CLK_TCK")


class MemorySampler:
    """Samples the summed RSS of ``pids`` every ``interval_s`` in a thread; keeps the peak.

    ``groups`` names subsets of the pids (e.g. ``{"driver": [..], "actors": [..]}``);
    each group's peak of its own sum is kept too.
    """

    def __init__(self, groups: dict[str, list[int]], *, interval_s: float = 0.25):
        self.groups = groups
        self.interval_s = interval_s
        self.peak_bytes = 0
        self.peak_by_group = dict.fromkeys(groups, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)

    def sample(self) -> None:
        by_group = {name: sum(rss_bytes(p) for p in pids) for name, pids in self.groups.items()}
        self.peak_bytes = max(self.peak_bytes, sum(by_group.values()))
        for name, value in by_group.items():
            self.peak_by_group[name] = max(self.peak_by_group[name], value)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> MemorySampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
