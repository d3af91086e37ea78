"""benchmarks/cpu_time.py: the CPU of a process tree, read from /proc."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from benchmarks.cpu_time import CpuMarks, descendants_cpu

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
    marks = CpuMarks()
    child = subprocess.Popen([sys.executable, "-c", burn])
    try:
        started = marks.mark()
        time.sleep(0.2)
        idle_end = marks.mark()
        time.sleep(1.5)
        ended = marks.mark()
    finally:
        child.kill()
        child.wait()
    assert marks.window(started, idle_end).get(child.pid, ("", 0.0))[1] <= 0.15  # start-up
    name, cpu_s = marks.window(started, ended)[child.pid]
    assert name == os.path.basename(sys.executable)
    assert 0.25 <= cpu_s <= 0.45
    assert marks.window(started, ended)[os.getpid()][0] == "driver"
    # A window between readings runs from the last one before it to the first one after.
    inside = marks.window(started + 0.01, idle_end + 0.01)[child.pid][1]
    assert inside == marks.window(started, ended)[child.pid][1]


def test_the_readings_own_cpu_is_not_the_drivers():
    """200 readings cost this process CPU; the driver's figure leaves it out."""
    marks = CpuMarks()
    first = marks.mark()
    for _ in range(200):
        marks.mark()
    last = marks.mark()
    process_cpu_s = sum(os.times()[:2])
    driver_s = marks.window(first, last)[os.getpid()][1]
    assert marks.own_cpu_s > 0.05  # the readings did cost something (about 1-2 ms each)
    assert driver_s < 0.5 * marks.own_cpu_s
    assert process_cpu_s > marks.own_cpu_s


def test_no_readings_give_an_empty_window():
    assert CpuMarks().window(0.0, 1.0) == {}


def test_without_proc_the_reading_is_empty(monkeypatch):
    def no_proc(path):
        raise FileNotFoundError(path)

    monkeypatch.setattr(os, "listdir", no_proc)
    assert descendants_cpu(os.getpid()) == {}
