"""benchmarks/cpu_time.py: the CPU of a process tree, read from /proc."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from benchmarks.cpu_time import CpuSampler, descendants_cpu

pytestmark = pytest.mark.skipif(
    not os.path.isdir("/proc/self/task"), reason="reads Linux's /proc (Linux only)"
)

#: A child that starts a grandchild, burns CPU, and waits for its grandchild.
_TREE = """
import subprocess, sys, time
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
print(grandchild.pid, flush=True)
end = time.process_time() + 0.3
while time.process_time() < end:
    pass
time.sleep(30)
"""


def test_finds_children_and_grandchildren_with_their_cpu():
    child = subprocess.Popen([sys.executable, "-c", _TREE], stdout=subprocess.PIPE, text=True)
    try:
        grandchild = int(child.stdout.readline())
        deadline = time.monotonic() + 20
        names: dict[int, str] = {}
        while True:
            found = descendants_cpu(os.getpid(), names)
            if found.get(child.pid, ("", 0.0))[1] >= 0.25 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert {os.getpid(), child.pid, grandchild} <= set(found)
        assert found[child.pid][1] >= 0.25  # the burn, in CPU seconds
        assert found[grandchild][1] < 0.25
        assert names[child.pid] == os.path.basename(sys.executable)
        # Another tree's processes are not counted.
        assert 1 not in found or os.getpid() == 1
    finally:
        child.kill()
        child.wait()
        os.system(f"kill {grandchild} 2>/dev/null")


def test_a_window_counts_only_the_cpu_spent_inside_it():
    """A child burns 0.3 s of CPU after an idle start; a window around the burn holds it,
    a window before it holds none."""
    burn = "import time; time.sleep(0.4); e = time.process_time() + 0.3\nwhile time.process_time() < e: pass\ntime.sleep(30)"
    sampler = CpuSampler(interval_s=0.02).start()
    child = subprocess.Popen([sys.executable, "-c", burn])
    try:
        started = time.perf_counter()
        time.sleep(0.2)
        idle_end = time.perf_counter()
        time.sleep(1.5)
        ended = time.perf_counter()
    finally:
        sampler.stop()
        child.kill()
        child.wait()
    assert (
        sampler.window(started, idle_end).get(child.pid, ("", 0.0))[1] <= 0.15
    )  # its start-up only
    name, cpu_s = sampler.window(started, ended)[child.pid]
    assert name == os.path.basename(sys.executable)
    assert 0.25 <= cpu_s <= 0.45
    assert sampler.window(started, ended)[os.getpid()][0] == "driver"


def test_without_proc_the_reading_is_empty(monkeypatch):
    def no_proc(path):
        raise FileNotFoundError(path)

    monkeypatch.setattr(os, "listdir", no_proc)
    assert descendants_cpu(os.getpid()) == {}
