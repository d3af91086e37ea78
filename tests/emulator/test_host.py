"""Host processes: how many emulated nodes share one, and a host's members (no Ray)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from emulator import host, memory
from emulator.config import load_config
from emulator.host import (
    HOST_SWITCH_INTERVAL_S,
    HOST_SWITCH_MIN_COMPONENTS,
    ComponentHost,
    nodes_per_process,
    plan_hosts,
)
from emulator.memory import (
    MemorySampler,
    available_memory_bytes,
    process_age_s,
    pss_bytes,
    rss_bytes,
)

GB = 1024**3
MB = 1024**2


@pytest.fixture(autouse=True)
def _switch_interval_restored():
    """A ComponentHost sets its process's GIL switch interval; this process keeps its own."""
    before = sys.getswitchinterval()
    yield
    sys.setswitchinterval(before)


def test_auto_gives_each_node_a_process_while_memory_and_cores_have_room():
    assert (
        nodes_per_process("auto", 6, available_bytes=16 * GB, process_bytes=GB // 4, num_cores=4)
        == 1
    )
    # 2 compute nodes and their SwarmX node on 2 cores: a process each (the chaos tests').
    assert (
        nodes_per_process("auto", 3, available_bytes=16 * GB, process_bytes=GB // 4, num_cores=2)
        == 1
    )


def test_auto_shares_processes_when_memory_is_short():
    # 192 nodes + 85 SwarmX nodes; half of 16 GB holds 27 processes of 300 MB.
    per = nodes_per_process(
        "auto", 277, available_bytes=16 * GB, process_bytes=300 * MB, num_cores=64
    )
    assert per == 11
    names = [f"node-{r}" for r in range(192)]
    assert len(plan_hosts(names, [f"s{i}" for i in range(85)], per)) <= 27


def test_auto_keeps_the_process_count_near_the_cores():
    # Plenty of memory, 2 cores: at most 4 processes, so 277 components share them.
    per = nodes_per_process(
        "auto", 277, available_bytes=1000 * GB, process_bytes=300 * MB, num_cores=2
    )
    assert per == 70


def test_a_count_is_taken_as_given():
    assert nodes_per_process(3, 100, available_bytes=None, process_bytes=None, num_cores=1) == 3
    assert (
        nodes_per_process("auto", 100, available_bytes=None, process_bytes=None, num_cores=None)
        == 1
    )


def test_plan_keeps_every_component_once_and_one_kind_per_host():
    nodes = [f"node-{r}" for r in range(5)]
    assert plan_hosts(nodes, ["a", "b", "c"], 2) == [
        ("a", "b"),
        ("c",),
        ("node-0", "node-1"),
        ("node-2", "node-3"),
        ("node-4",),
    ]


class _Component:
    def __init__(self, *, name: str, log: list):
        self.name, self.log = name, log

    def get_address(self) -> str:
        return f"127.0.0.1:{len(self.name)}"

    def connect(self, parent: str) -> None:
        self.log.append((self.name, "connect", parent))

    def stop(self) -> None:
        self.log.append((self.name, "stop"))


def test_a_host_runs_components_by_name_and_stops_each():
    log: list = []
    host = ComponentHost()
    # A component's own ``name`` argument does not collide with the host's.
    assert host.start("swarmx-0-0", _Component, name="swarmx-0-0", log=log) == "127.0.0.1:10"
    host.start("node-1", _Component, name="node-1", log=log)
    with pytest.raises(ValueError, match="node-1 already runs"):
        host.start("node-1", _Component, name="node-1", log=log)
    host.call("node-1", "connect", "127.0.0.1:7")
    assert host.addresses() == {"swarmx-0-0": "127.0.0.1:10", "node-1": "127.0.0.1:6"}
    host.remove("swarmx-0-0")
    host.stop()
    assert log == [
        ("node-1", "connect", "127.0.0.1:7"),
        ("swarmx-0-0", "stop"),
        ("node-1", "stop"),
    ]
    assert host.pid() == os.getpid()


@pytest.mark.parametrize("value", [0, -1, "many", True])
def test_nodes_per_process_must_be_auto_or_positive(value):
    with pytest.raises(ValueError, match="nodes_per_process"):
        load_config(overrides={"runtime.nodes_per_process": value})


def test_placement_names_its_choices():
    with pytest.raises(ValueError, match="'pack', 'spread'"):
        load_config(overrides={"runtime.placement": "scatter"})


def test_memory_of_this_process_is_read_and_its_peak_kept():
    assert rss_bytes(os.getpid()) > 0
    assert rss_bytes(-1) == 0
    assert available_memory_bytes() > 0
    assert process_age_s() > 0
    with MemorySampler({"me": [os.getpid()]}, interval_s=0.01) as sampler:
        ballast = bytearray(64 * MB)
        ballast[::4096] = b"x" * len(ballast[::4096])
    assert sampler.peak_by_group["me"] >= 64 * MB
    assert sampler.peak_bytes == sampler.peak_by_group["me"]


def test_sampler_follows_a_process_that_replaced_a_lost_one():
    # The cluster's pid list changes when a lost process is replaced (Cluster.pids); the
    # sampler asks for it at every sample, so the replacement's memory is counted.
    code = (
        "import sys, time; ballast = bytearray(int(sys.argv[1])); "
        "ballast[::4096] = b'x' * len(ballast[::4096]); print(flush=True); time.sleep(60)"
    )
    small = subprocess.Popen([sys.executable, "-c", code, "0"], stdout=subprocess.PIPE)
    large = subprocess.Popen([sys.executable, "-c", code, str(96 * MB)], stdout=subprocess.PIPE)
    try:
        for process in (small, large):
            process.stdout.readline()  # its ballast is resident
        current = {"hosts": [small.pid]}
        sampler = MemorySampler(lambda: dict(current), interval_s=60)
        sampler.sample()
        assert 0 < sampler.peak_by_group["hosts"] < 96 * MB
        small.kill()
        small.wait()
        current["hosts"] = [large.pid]  # the replacement
        sampler.sample()
        assert sampler.peak_by_group["hosts"] >= 96 * MB
    finally:
        for process in (small, large):
            process.kill()
            process.wait()


def test_a_launch_in_which_no_component_starts_any_more_ends_naming_those_left(monkeypatch):
    # node-1's process was stopped while the cluster started: memoryx and node-0 come up,
    # then nothing more within the timeout; the launch must not wait forever.
    waits = iter([["memoryx-ref"], ["node-0-ref"], []])
    monkeypatch.setattr(host.ray, "wait", lambda refs, num_returns, timeout: (next(waits), []))
    refs = {"memoryx": "memoryx-ref", "node-0": "node-0-ref", "node-1": "node-1-ref"}
    with pytest.raises(TimeoutError, match=r"^node-1 did not start within 120 s"):
        host.wait_started(refs)


def _resolve(monkeypatch, setting, num_nodes, num_swarmx, *, cores):
    from types import SimpleNamespace

    monkeypatch.setattr(host, "available_memory_bytes", lambda: 1000 * GB)
    monkeypatch.setattr(host, "rss_bytes", lambda pid: 300 * MB)
    monkeypatch.setattr(host.os, "cpu_count", lambda: cores)
    runtime = SimpleNamespace(address=None, nodes_per_process=setting)
    return host.resolve_nodes_per_process(runtime, num_nodes, num_swarmx, 4)


def test_auto_gives_swarmx_nodes_a_share_by_their_fanout_when_nodes_share(monkeypatch):
    # 64 nodes + 21 SwarmX nodes on 2 cores: a SwarmX node relays to 4 children, so it
    # weighs 4 compute nodes: 2 hosts of 32 compute nodes, 3 of 7 SwarmX nodes.
    assert _resolve(monkeypatch, "auto", 64, 21, cores=2) == (32, 7)
    names = [f"node-{r}" for r in range(64)]
    sizes = [len(h) for h in plan_hosts(names, [f"s{i}" for i in range(21)], 32, 7)]
    assert sizes == [7, 7, 7, 32, 32]
    # 4 nodes + 1 SwarmX node: the SwarmX node alone, 2 compute nodes per process.
    assert _resolve(monkeypatch, "auto", 4, 1, cores=2) == (2, 1)


def test_auto_keeps_a_process_each_while_there_is_room_and_a_count_is_for_both(monkeypatch):
    assert _resolve(monkeypatch, "auto", 2, 1, cores=2) == (1, 1)
    assert _resolve(monkeypatch, 5, 64, 21, cores=2) == (5, 5)


def test_a_host_of_many_nodes_hands_the_gil_over_less_often():
    log: list = []
    default = sys.getswitchinterval()
    host = ComponentHost()
    for index in range(HOST_SWITCH_MIN_COMPONENTS - 1):
        host.start(f"node-{index}", _Component, name=f"node-{index}", log=log)
        assert sys.getswitchinterval() == default  # a few nodes: Python's default
    last = HOST_SWITCH_MIN_COMPONENTS - 1
    host.start(f"node-{last}", _Component, name=f"node-{last}", log=log)
    assert sys.getswitchinterval() == pytest.approx(HOST_SWITCH_INTERVAL_S)


def test_pss_counts_a_shared_page_once_where_summed_rss_counts_it_per_process():
    # Two processes map the same 64 MB of shared memory and touch all of it: their RSS
    # each hold all 64 MB, their PSS half each, so the sum of PSS counts it once.
    from multiprocessing.shared_memory import SharedMemory

    ring = SharedMemory(create=True, size=64 * MB)
    code = (
        "import sys, time; from multiprocessing import resource_tracker; "
        "from multiprocessing.shared_memory import SharedMemory; "
        "m = SharedMemory(name=sys.argv[1]); "
        "resource_tracker.unregister(m._name, 'shared_memory'); "  # the test's to unlink
        "m.buf[::4096] = b'x' * len(m.buf[::4096]); print(flush=True); time.sleep(60)"
    )
    readers = [
        subprocess.Popen([sys.executable, "-c", code, ring.name], stdout=subprocess.PIPE)
        for _ in range(2)
    ]
    try:
        for reader in readers:
            reader.stdout.readline()  # the segment is resident in it
        pids = [r.pid for r in readers]
        with MemorySampler({"readers": pids}, interval_s=60) as sampler:
            pass
        # RSS counts the segment twice (and the interpreter's shared pages), PSS once.
        assert sampler.peak_rss_bytes >= 128 * MB
        assert sampler.peak_rss_bytes - sampler.peak_bytes >= 60 * MB
        assert sampler.peak_bytes >= 64 * MB
        assert sampler.peak_rss_by_group["readers"] == sampler.peak_rss_bytes
        assert sampler.peak_by_group["readers"] == sampler.peak_bytes
        assert all(0 < pss_bytes(p) < rss_bytes(p) for p in pids)
        assert pss_bytes(-1) == 0
    finally:
        for reader in readers:
            reader.kill()
            reader.wait()
        ring.close()
        ring.unlink()


def test_pss_is_read_again_only_when_memory_grew(monkeypatch):
    rss = {"now": 100 * MB}
    reads = []
    monkeypatch.setattr(memory, "rss_bytes", lambda pid: rss["now"])
    monkeypatch.setattr(memory, "pss_bytes", lambda pid: reads.append(pid) or rss["now"] // 2)
    sampler = MemorySampler({"me": [1]}, interval_s=60, pss_interval_s=0)
    sampler.sample()  # the first reading: always
    sampler.sample(always_pss=False)  # no growth: RSS only
    assert len(reads) == 1
    rss["now"] = creep = int(100 * MB * (1 + memory.PSS_REREAD_GROWTH / 2))
    sampler.sample(always_pss=False)  # grew by less than PSS_REREAD_GROWTH: RSS only
    assert len(reads) == 1 and sampler.peak_rss_bytes == creep
    rss["now"] = 300 * MB
    sampler.sample(always_pss=False)  # grew past the last reading: PSS again
    assert len(reads) == 2 and sampler.peak_bytes == 150 * MB
    rss["now"] = 200 * MB
    sampler.sample(always_pss=False)  # shrank: nothing new to find
    assert len(reads) == 2 and sampler.peak_rss_bytes == 300 * MB
    slow = MemorySampler({"me": [1]}, interval_s=60, pss_interval_s=3600)
    slow.sample()
    rss["now"] = 400 * MB
    slow.sample(always_pss=False)  # grew, but read too recently
    assert len(reads) == 3 and slow.peak_bytes == 100 * MB
