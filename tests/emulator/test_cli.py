"""The ``wafer`` CLI as a user runs it: real processes, real exit codes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
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


class WaferRuns:
    """``wafer`` commands run side by side, each once, and their results kept.

    Each command is a Python process that spends seconds of CPU importing torch before it
    refuses its input or prints its table, and starts no Ray; the commands are independent,
    so they run as many at a time as there are cores instead of one after another. Every
    test still runs its own command and asserts on its own result.
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2))
        self._runs: dict[tuple[str, ...], Future] = {}

    def start(self, argv: tuple[str, ...]) -> None:
        if argv not in self._runs:
            self._runs[argv] = self._pool.submit(wafer, *argv)

    def result(self, *argv: str) -> subprocess.CompletedProcess:
        self.start(argv)
        return self._runs[argv].result()

    def close(self) -> None:
        self._pool.shutdown(cancel_futures=True)


def wafer_command(command: Callable[..., tuple[str, ...]]):
    """Marks a test whose ``wafer`` command (``command(directory, **its parameters)``) the
    module's ``wafer_runs`` starts ahead, beside the other selected tests' commands."""

    def mark(test):
        test.wafer_command = command
        return test

    return mark


@pytest.fixture(scope="module")
def wafer_runs(request, tmp_path_factory):
    """This module's selected tests' ``wafer`` commands, started together on first use;
    ``wafer_runs.directory`` holds the files they read."""
    runs = WaferRuns()
    runs.directory = tmp_path_factory.mktemp("wafer-runs")
    for item in request.session.items:
        command = getattr(getattr(item, "function", None), "wafer_command", None)
        if command is not None and item.module is request.module:
            params = item.callspec.params if hasattr(item, "callspec") else {}
            runs.start(command(runs.directory, **params))
    yield runs
    runs.close()


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


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--nodes", "0"], ["num_nodes = 0"]),
        (
            ["--nodes", "8", "--batch-size", "100"],
            ["batch_size = 100", "num_nodes = 8", "96", "104"],
        ),
        (["--model", "resnet-9000"], ["resnet-9000", "mlp-digits"]),
        (["--optimizer", "rmsprop"], ["optimizer.name", "'adamw'"]),
        (["--precision", "fp8"], ["backend.precision", "'bf16'"]),
        (["--model", "tests.emulator.user_models:broken_chain"], ["block", "chain"]),
        (["--sparsity", "1.0"], ["sparsity = 1.0", "[0, 1)"]),
        (["--sparsity", "-0.1"], ["sparsity = -0.1", "[0, 1)"]),
        (["--sparsity", "0.9", "--sparsity-algorithm", "prune"], ["algorithm", "'rigl'"]),
        (["--sparsity", "0.9", "--sparsity-algorithm", "set"], ["update", "freq"]),
    ],
)
@wafer_command(lambda directory, args, needles: ("train", *args))
def test_bad_input_is_one_paragraph_naming_the_field(wafer_runs, args, needles):
    _one_paragraph_error(wafer_runs.result("train", *args), *needles)


def _unknown_key(directory: Path, **params) -> tuple[str, ...]:
    path = directory / "unknown-key.yaml"
    path.write_text("num_nodes: 2\noptimizer:\n  name: adamw\n  learning_rate: 0.1\n")
    return ("train", "--config", str(path))


@wafer_command(_unknown_key)
def test_unknown_config_key_in_yaml(wafer_runs):
    result = wafer_runs.result(*_unknown_key(wafer_runs.directory))
    _one_paragraph_error(result, "optimizer.learning_rate", "lr")


def _filter_matching_nothing(directory: Path, **params) -> tuple[str, ...]:
    path = directory / "filter-matching-nothing.yaml"
    path.write_text("sparsity:\n  sparsity: 0.9\n  param_filter: ['*.conv*']\n")
    return ("train", "--config", str(path))


@wafer_command(_filter_matching_nothing)
def test_sparsity_filter_matching_nothing_is_an_error(wafer_runs):
    result = wafer_runs.result(*_filter_matching_nothing(wafer_runs.directory))
    _one_paragraph_error(result, "conv", "0.0.weight")


def _memoryx_config(directory: Path, memoryx: str, **params) -> tuple[str, ...]:
    # A directory of its own per case: the cases run side by side.
    directory = directory / f"memoryx-{hashlib.sha256(memoryx.encode()).hexdigest()[:12]}"
    directory.mkdir(exist_ok=True)
    (directory / "a-file").write_text("")
    memoryx = memoryx.replace("SPILL", str(directory / "spill"))
    memoryx = memoryx.replace("A_FILE", str(directory / "a-file"))
    path = directory / "cluster.yaml"
    path.write_text(f"memoryx: {memoryx}\n")
    return ("train", "--config", str(path))


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
@wafer_command(_memoryx_config)
def test_memoryx_that_cannot_hold_the_model_is_refused_before_training(
    wafer_runs, memoryx, needles
):
    result = wafer_runs.result(*_memoryx_config(wafer_runs.directory, memoryx))
    _one_paragraph_error(result, *needles)


SIMULATE_SPARSITY = ("simulate", "--model", "gpt3-1.3b", "--sparsity", "0,0.5,0.75,0.9")


@wafer_command(lambda directory: SIMULATE_SPARSITY)
def test_simulate_prints_the_sparsity_speedup_curve(wafer_runs):
    result = wafer_runs.result(*SIMULATE_SPARSITY)
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
