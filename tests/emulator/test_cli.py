"""The ``wafer`` CLI as a user runs it: real processes, real exit codes."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# WAFER_EARLY_RAY=0: most of these commands are refused, and would start Ray only to exit.
ENV = {**os.environ, "GRPC_VERBOSITY": "ERROR", "PYTHONPATH": str(REPO), "WAFER_EARLY_RAY": "0"}


def wafer(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "emulator.cli", *args],
        cwd=REPO,
        env=env or ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_unreachable_ray_address_is_a_clear_error(monkeypatch):
    import ray

    from emulator import runtime

    def refuse(**kwargs):
        raise ConnectionError(f"Failed to connect to Ray cluster at {kwargs['address']}")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)
    with pytest.raises(ValueError, match=r"runtime.address = '10.0.0.9:6379'.*ray start --head"):
        runtime.ensure_ray("10.0.0.9:6379")


def _one_paragraph_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    message = result.stderr.strip()
    assert "\n\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


def test_bad_input_is_one_paragraph_naming_the_field():
    # A real process and its exit code; the other cases run in-process
    # (test_cli_bad_input.py::test_bad_flag_is_one_paragraph_naming_the_field).
    _one_paragraph_error(wafer("train", "--nodes", "0"), "num_nodes = 0")


def test_unknown_config_key_in_yaml(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text("num_nodes: 2\noptimizer:\n  name: adamw\n  learning_rate: 0.1\n")
    _one_paragraph_error(wafer("train", "--config", str(path)), "optimizer.learning_rate", "lr")


def test_sparsity_filter_matching_nothing_is_an_error(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text("sparsity:\n  sparsity: 0.9\n  param_filter: ['*.conv*']\n")
    _one_paragraph_error(wafer("train", "--config", str(path)), "conv", "0.0.weight")


@pytest.mark.parametrize(
    ("memoryx", "needles"),
    [
        (
            "{ram_budget_bytes: 1000, spill_dir: SPILL}",
            ["memoryx.ram_budget_bytes = 1000", "updating layer 1", "1052672 bytes in all"],
        ),
        (
            "{ram_budget_bytes: 100000000, spill_dir: A_FILE/spill}",
            ["memoryx.spill_dir", "is not a writable directory"],
        ),
        # More servers than layers needs split layers, which sparsity rules out.
        (
            "{num_servers: 4}\nsparsity: {sparsity: 0.5}",
            ["memoryx.num_servers = 4", "3 streamed layers", "not split", "sparsity"],
        ),
    ],
)
def test_memoryx_that_cannot_hold_the_model_is_refused_before_training(tmp_path, memoryx, needles):
    (tmp_path / "a-file").write_text("")
    memoryx = memoryx.replace("SPILL", str(tmp_path / "spill"))
    memoryx = memoryx.replace("A_FILE", str(tmp_path / "a-file"))
    path = tmp_path / "cluster.yaml"
    path.write_text(f"memoryx: {memoryx}\n")
    _one_paragraph_error(wafer("train", "--config", str(path)), *needles)


def test_simulate_prints_the_sparsity_speedup_curve():
    result = wafer("simulate", "--model", "gpt3-1.3b", "--sparsity", "0,0.5,0.75,0.9")
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines() if line[:1].isdigit()]
    assert [row[0] for row in rows] == ["0", "0.5", "0.75", "0.9"]
    speedups = [float(row[4].rstrip("x")) for row in rows]  # step time is "3.3 s"
    assert speedups[0] == 1.0 and speedups == sorted(speedups) and speedups[-1] > 2
    assert "speedup vs dense" in result.stdout and "bytes/step" in result.stdout


def test_example_config_is_valid():
    from emulator.config import load_config

    config = load_config(REPO / "examples" / "cluster.yaml")
    assert config.num_nodes == 4 and config.model.name == "mlp-digits"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def ray_head(env: dict):
    """A throwaway single-node Ray cluster on loopback, stopped without touching other Ray instances."""
    port = _free_port()
    temp_dir = tempfile.mkdtemp(
        prefix="ray", dir="/tmp"
    )  # short: Ray's socket paths are length-limited
    ray_bin = Path(sys.executable).with_name("ray")
    head = subprocess.Popen(
        [
            str(ray_bin),
            "start",
            "--head",
            "--block",
            f"--port={port}",
            f"--temp-dir={temp_dir}",
            "--node-ip-address=127.0.0.1",
            "--num-cpus=2",
            "--include-dashboard=false",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert head.poll() is None, "ray start --head exited early"
            assert time.monotonic() < deadline, "Ray head did not come up in 120 s"
            time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.integration
def test_user_model_on_an_existing_ray_cluster(tmp_path):
    """--address joins a running Ray cluster; a user's module:factory model trains unchanged."""
    # Keep Ray on loopback (it would otherwise resolve 127.0.0.1 to the host's IP) and
    # let the test's own throwaway cluster skip token authentication.
    env = {**ENV, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
    out = tmp_path / "report.json"
    with ray_head(env) as address:
        result = wafer(
            "train",
            "--address",
            address,
            "--model",
            "tests.emulator.user_models:tiny_net",
            "--nodes",
            "2",
            "--steps",
            "30",
            "--batch-size",
            "64",
            "--json",
            str(out),
            "--quiet",
            env=env,
        )
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["model"]["num_params"] == 64 * 32 + 32 + 32 * 10 + 10
    assert report["final_loss"] < report["steps"][0]["loss"]
    assert report["traffic"]["memoryx_egress_bytes"] == 2 * 4 * report["model"]["num_params"]
    assert "wafer train: summary" in result.stdout
    # The README's copy of this summary leaves out what this machine measured, so that it
    # reproduces: the same run with other launch and memory figures renders the same.
    from benchmarks.figures_registry import Output, render_train_summary

    rendered = render_train_summary([Output(result.stdout, report)])
    runtime = report["runtime"]
    other = dict(
        runtime,
        launch_time_s=runtime["launch_time_s"] + 1.25,
        num_processes=runtime["num_processes"] + 1,
        memory=dict(runtime["memory"], peak_bytes=3 * runtime["memory"]["peak_bytes"]),
    )
    assert rendered == render_train_summary([Output(result.stdout, dict(report, runtime=other))])
    for label in ("wall time", "launch / first step", "emulator processes", "emulator peak memory"):
        assert any(
            line.startswith(label) and line.endswith(" ...") for line in rendered.split("\n")
        )
