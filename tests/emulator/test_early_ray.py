"""Which command lines start a local Ray before the driver's imports (emulator.early_ray)."""

from __future__ import annotations

import os

import pytest

from emulator.early_ray import local_run


@pytest.fixture(autouse=True)
def _early_start_allowed(monkeypatch):
    monkeypatch.delenv("WAFER_EARLY_RAY", raising=False)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["train", "--model", "mlp-digits", "--nodes", "4"], (True, False)),
        (["train", "--verbose"], (True, True)),
        (["train", "--address", "127.0.0.1:6379"], (False, False)),
        (["train", "--help"], (False, False)),
        (["scale", "--model", "mlp-digits", "--nodes", "1,2"], (False, False)),
        (["simulate", "--model", "gpt3-1.3b"], (False, False)),
        ([], (False, False)),
    ],
)
def test_only_a_local_train_starts_ray_early(argv, expected):
    assert local_run(argv) == expected


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("num_nodes: 4\n", (True, False)),
        ("runtime: {nodes_per_process: 2, verbose: true}\n", (True, True)),
        ("runtime: {address: auto}\n", (False, False)),  # it joins a cluster
        ("runtime: [1, 2]\n", (False, False)),  # unclear: load_config reports it later
        ("num_nodes: [\n", (False, False)),  # not YAML
    ],
)
def test_a_config_file_that_names_a_cluster_keeps_ray_for_later(tmp_path, yaml_text, expected):
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml_text)
    assert local_run(["train", "--config", str(path)]) == expected
    assert local_run(["train", "--config", str(tmp_path / "missing.yaml")]) == (False, False)


def test_it_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("WAFER_EARLY_RAY", "0")
    assert local_run(["train"]) == (False, False)


def test_a_local_ray_starts_without_the_monitors_a_run_never_uses():
    from ray._private.node import Node
    from ray._private.parameter import RayParams

    from emulator.early_ray import _no_api_server, _without_idle_helpers

    api_server = Node.start_api_server
    with _without_idle_helpers():
        inside = RayParams()
        told = RayParams(no_monitor=False, include_log_monitor=True)
        assert Node.start_api_server is _no_api_server  # nor the dashboard's API server
    assert Node.start_api_server is api_server  # put back
    outside = RayParams()
    assert (inside.no_monitor, inside.include_log_monitor) == (True, False)
    assert (told.no_monitor, told.include_log_monitor) == (False, True)  # a caller's choice
    assert (outside.no_monitor, outside.include_log_monitor) == (False, None)  # put back


def test_ray_processes_inherit_one_malloc_arena_and_the_driver_keeps_its_environment(
    monkeypatch,
):
    from emulator.early_ray import _workers_share_one_heap

    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    with _workers_share_one_heap():
        assert os.environ["MALLOC_ARENA_MAX"] == "1"  # what Ray's processes inherit
    assert "MALLOC_ARENA_MAX" not in os.environ  # put back


def test_a_users_own_malloc_arena_setting_is_kept(monkeypatch):
    from emulator.early_ray import _workers_share_one_heap

    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    with _workers_share_one_heap():
        assert os.environ["MALLOC_ARENA_MAX"] == "4"
    assert os.environ["MALLOC_ARENA_MAX"] == "4"
