"""runtime.shared_memory: when a run moves chunk payloads through shared memory, and how
much each ring holds (no Ray: the single-host check is replaced)."""

from __future__ import annotations

import pytest

from emulator import runtime
from emulator.config import RuntimeConfig, load_config
from proto.shm import ring_bytes_for


@pytest.fixture
def single_host(monkeypatch):
    monkeypatch.setitem(runtime.SHARED_MEMORY_WHEN, "auto", lambda: True)


def test_auto_on_one_host_plans_rings_for_a_step_and_two_layers(single_host):
    plan = runtime.shared_memory_plan(
        RuntimeConfig(), slot_bytes=1 << 20, layer_bytes=[4 << 20, 8 << 20], num_servers=3
    )
    assert plan is not None and plan.prefix.startswith("wafer-")
    assert plan.ring_bytes == ring_bytes_for([4 << 20, 8 << 20]) + (2 << 20)
    assert ring_bytes_for([4 << 20, 8 << 20]) == (12 << 20) + (16 << 20)


def test_off_and_several_hosts_keep_grpc_bytes(monkeypatch):
    args = {"slot_bytes": 1 << 20, "layer_bytes": [1 << 20], "num_servers": 3}
    assert runtime.shared_memory_plan(RuntimeConfig(shared_memory="off"), **args) is None
    monkeypatch.setitem(runtime.SHARED_MEMORY_WHEN, "auto", lambda: False)
    assert runtime.shared_memory_plan(RuntimeConfig(), **args) is None


def test_auto_keeps_grpc_bytes_when_rings_would_not_fit_in_memory(single_host, monkeypatch):
    monkeypatch.setattr(runtime, "available_memory_bytes", lambda: 100 << 20)
    args = {"slot_bytes": 1 << 20, "num_servers": 4}
    assert runtime.shared_memory_plan(RuntimeConfig(), layer_bytes=[1 << 20], **args)
    assert runtime.shared_memory_plan(RuntimeConfig(), layer_bytes=[64 << 20], **args) is None


def test_auto_keeps_grpc_bytes_when_rings_would_not_fit_in_dev_shm(single_host, monkeypatch):
    # A container's /dev/shm is often 64 MiB however much memory the machine has.
    monkeypatch.setattr(runtime, "available_memory_bytes", lambda: 64 << 30)
    args = {"slot_bytes": 1 << 20, "layer_bytes": [1 << 20], "num_servers": 8}
    monkeypatch.setattr(runtime, "shared_memory_free_bytes", lambda: 64 << 20)
    assert runtime.shared_memory_plan(RuntimeConfig(), **args) is None
    monkeypatch.setattr(runtime, "shared_memory_free_bytes", lambda: 1 << 30)
    assert runtime.shared_memory_plan(RuntimeConfig(), **args) is not None


def test_shared_memory_free_bytes_is_zero_without_dev_shm(monkeypatch, tmp_path):
    monkeypatch.setattr(runtime, "SHM_DIR", tmp_path / "absent")
    assert runtime.shared_memory_free_bytes() == 0
    monkeypatch.setattr(runtime, "SHM_DIR", tmp_path)
    assert runtime.shared_memory_free_bytes() > 0


def test_a_bad_setting_names_the_field():
    with pytest.raises(ValueError, match=r"runtime\.shared_memory = 'on'.*'auto', 'off'"):
        load_config(overrides={"runtime.shared_memory": "on"})
