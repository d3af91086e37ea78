"""Watching the host while a benchmark runs: memory, disk and every process's peak RSS.

Other jobs share the machine, so a benchmark that could run it out of memory or
disk stops itself first (``Watchdog``).
"""

from __future__ import annotations

import _thread
import contextlib
import ctypes
import os
import shutil
import signal
import sys
import threading


def _meminfo_bytes(field: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _peak_rss_bytes(pid: int) -> int | None:
    """A process's peak RSS so far (VmHWM), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _tree_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


class Watchdog:
    """Samples memory, disk and every process's peak RSS; stops the run before it harms the host.

    Below ``min_available_bytes`` of MemAvailable (or ``min_free_disk_bytes`` free on the
    spill disk) it interrupts the driver (``train`` stops the cluster on KeyboardInterrupt)
    and, if memory is still short 5 s later, kills the component processes itself.
    """

    def __init__(self, spill: str, min_available_bytes: float, min_free_disk_bytes: float):
        self.spill = spill
        self.min_available_bytes = min_available_bytes
        self.min_free_disk_bytes = min_free_disk_bytes
        self.pids: dict[str, list[int]] = {"driver": [os.getpid()]}
        self.peaks: dict[int, int] = {}
        self.least_available_bytes = _meminfo_bytes("MemAvailable")
        self.least_free_disk_bytes = shutil.disk_usage(spill).free
        self.peak_disk_bytes = 0
        self.tripped: str | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def on_launch(self, cluster) -> None:
        self.pids.update(cluster.pids())

    def __enter__(self) -> Watchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()

    def _watch(self) -> None:
        tick = 0
        while not self._done.wait(0.5):
            available = _meminfo_bytes("MemAvailable")
            free_disk = shutil.disk_usage(self.spill).free
            self.least_available_bytes = min(self.least_available_bytes, available)
            self.least_free_disk_bytes = min(self.least_free_disk_bytes, free_disk)
            for pid in (p for pids in self.pids.values() for p in pids):
                peak = _peak_rss_bytes(pid)
                if peak is not None:
                    self.peaks[pid] = max(self.peaks.get(pid, 0), peak)
            tick += 1
            if tick % 10 == 0:  # a walk of the spill tree every 5 s
                self.peak_disk_bytes = max(self.peak_disk_bytes, _tree_bytes(self.spill))
            if self.tripped is None and available < self.min_available_bytes:
                self.tripped = (
                    f"MemAvailable fell to {available / 1e9:.2f} GB (< "
                    f"{self.min_available_bytes / 1e9:.1f} GB)"
                )
            elif self.tripped is None and free_disk < self.min_free_disk_bytes:
                self.tripped = (
                    f"free disk under {self.spill} fell to {free_disk / 1e9:.2f} GB (< "
                    f"{self.min_free_disk_bytes / 1e9:.1f} GB)"
                )
            else:
                continue
            print(f"\nwatchdog: {self.tripped}; stopping the run", file=sys.stderr, flush=True)
            _thread.interrupt_main()
            if self._done.wait(5.0):
                return
            if _meminfo_bytes("MemAvailable") < self.min_available_bytes:
                for pid in (p for role, ps in self.pids.items() if role != "driver" for p in ps):
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)

    def peak_rss(self) -> dict:
        def of(role: str) -> int:
            return max((self.peaks.get(pid, 0) for pid in self.pids.get(role, [])), default=0)

        return {
            "driver": of("driver"),
            "memoryx": of("memoryx"),
            "hosts_max": of("hosts"),
            "hosts": [self.peaks.get(pid, 0) for pid in self.pids.get("hosts", [])],
        }


#: Allocations from this size up go to their own mmap, returned to the system when freed.
MMAP_THRESHOLD_BYTES = 1 << 20


def fixed_mmap_threshold() -> None:
    """Large tensors freed go back to the system, in this process and the Ray workers.

    glibc raises its mmap threshold (up to 32 MB) each time a large block is freed, so
    later tensors of that size come from the heap, whose freed pieces stay resident: a
    process that makes and drops one layer after another grows to several layers' RSS.
    A fixed threshold (which turns the raising off) keeps RSS at what is in use, as the
    full-size model's tensors (over 32 MB each) are anyway. Ray's workers inherit it
    from the environment; this process gets it from ``mallopt``.
    """
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD_BYTES)
    with contextlib.suppress(OSError, AttributeError):
        m_mmap_threshold = -3  # glibc's malloc.h
        ctypes.CDLL("libc.so.6").mallopt(m_mmap_threshold, MMAP_THRESHOLD_BYTES)
