"""Bad input to ``wafer train`` (issue 11, part 7): one paragraph naming the field, exit 2,
no traceback, and no actor started. ``main()`` runs in-process with launching made to fail."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from emulator import cli


@pytest.fixture
def no_cluster(monkeypatch):
    """Any attempt to start Ray or the actors fails the test: these errors come first."""
    import ray

    import emulator.train

    def refuse(*args, **kwargs):
        raise AssertionError("a cluster was started for bad input")

    monkeypatch.setattr(emulator.train, "launch", refuse)
    monkeypatch.setattr(ray, "init", refuse)


def _bad_input(capsys, *args: str) -> str:
    status = cli.main(["train", "--steps", "2", *args])
    out, err = capsys.readouterr()
    assert status == 2, out + err
    assert "Traceback" not in out + err
    message = err.strip()
    assert message.startswith("wafer train: error: ") and "\n" not in message, message
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
def test_bad_flag_is_one_paragraph_naming_the_field(capsys, no_cluster, args, needles):
    message = _bad_input(capsys, *args)
    for needle in needles:
        assert needle in message, message


def test_batch_larger_than_the_training_set(capsys, no_cluster):
    message = _bad_input(capsys, "--batch-size", "2048", "--nodes", "2")
    assert "batch_size = 2048 is larger than the training set" in message
    assert "1438 training samples" in message and "e.g. 1438" in message


def test_resume_of_a_missing_file(capsys, no_cluster, tmp_path):
    path = tmp_path / "absent.ckpt"
    message = _bad_input(capsys, "--resume", str(path))
    assert f"resume = {str(path)!r}" in message and "does not exist" in message


def test_resume_of_a_file_that_is_not_a_checkpoint(capsys, no_cluster, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("these are not weights\n")
    message = _bad_input(capsys, "--resume", str(path))
    assert f"resume = {str(path)!r}" in message and "not a MemoryX checkpoint" in message


def test_save_checkpoint_into_a_missing_directory(capsys, no_cluster, tmp_path):
    path = tmp_path / "missing" / "run.ckpt"
    message = _bad_input(capsys, "--save-checkpoint", str(path))
    assert f"save_checkpoint = {str(path)!r}" in message and "does not exist" in message


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_save_checkpoint_into_an_unwritable_directory(capsys, no_cluster):
    # /proc takes no new files, not even from root (chmod would not stop root).
    message = _bad_input(capsys, "--save-checkpoint", "/proc/wafer-run.ckpt")
    assert "save_checkpoint = '/proc/wafer-run.ckpt': cannot write in directory '/proc'" in message


def test_save_checkpoint_naming_a_directory(capsys, no_cluster, tmp_path):
    message = _bad_input(capsys, "--save-checkpoint", str(tmp_path))
    assert "save_checkpoint" in message and "is a directory" in message


def test_bind_host_that_is_not_this_machines(capsys, no_cluster, tmp_path):
    config = tmp_path / "cluster.yaml"
    config.write_text("runtime:\n  bind_host: 203.0.113.7\n")  # TEST-NET-3: never assigned
    message = _bad_input(capsys, "--config", str(config))
    assert "runtime.bind_host = '203.0.113.7' is not an address of this machine" in message


@pytest.mark.parametrize("lr", ["inf", "nan", "-inf"])
def test_learning_rate_that_can_only_give_nan(capsys, no_cluster, lr):
    message = _bad_input(capsys, f"--lr={lr}")
    assert f"optimizer.lr = {float(lr)}" in message


@pytest.mark.parametrize(
    ("yaml_text", "needle"),
    [
        ("optimizer:\n  momentum: 1.0\n  name: sgd\n", "optimizer.momentum must be in [0, 1)"),
        ("optimizer:\n  beta2: 1.5\n", "optimizer.beta2 must be in [0, 1)"),
        ("optimizer:\n  eps: 0\n", "optimizer.eps must be > 0"),
        ("optimizer:\n  weight_decay: .inf\n", "optimizer.weight_decay = inf is not valid"),
        ("optimizer:\n  nonfinite: ignore\n", "optimizer.nonfinite = 'ignore' is not valid"),
    ],
)
def test_optimizer_settings_refused_up_front(capsys, no_cluster, tmp_path, yaml_text, needle):
    config = tmp_path / "cluster.yaml"
    config.write_text(yaml_text)
    assert needle in _bad_input(capsys, "--config", str(config))


def test_duplicate_keys_in_a_yaml_mapping(capsys, no_cluster, tmp_path):
    config = tmp_path / "cluster.yaml"
    config.write_text("optimizer:\n  name: sgd\n  lr: 0.1\nnum_nodes: 2\noptimizer:\n  lr: 9\n")
    message = _bad_input(capsys, "--config", str(config))
    assert "sets optimizer twice (lines 1 and 5)" in message


def test_config_naming_a_directory(capsys, no_cluster, tmp_path):
    message = _bad_input(capsys, "--config", str(tmp_path))
    assert f"config file {str(tmp_path)!r} is a directory" in message


def test_config_that_is_not_utf8(capsys, no_cluster, tmp_path):
    config = tmp_path / "latin1.yaml"
    config.write_bytes("# réseau\nnum_nodes: 2\n".encode("latin-1"))
    message = _bad_input(capsys, "--config", str(config))
    assert f"config file {str(config)!r} is not UTF-8 text" in message


def test_malformed_yaml_gives_line_and_column(capsys, no_cluster, tmp_path):
    config = tmp_path / "cluster.yaml"
    config.write_text("num_nodes: 2\nbatch_size: [64\nseed: 1\n")
    message = _bad_input(capsys, "--config", str(config))
    assert f"config file {str(config)!r} is not valid YAML at line 3, column 5" in message


@pytest.mark.parametrize(
    ("model", "needle"),
    [
        ("no_such_package.models:factory", "cannot import module 'no_such_package.models'"),
        ("tests.emulator.user_models:missing", "has no callable 'missing'"),
    ],
)
def test_factory_errors_name_model_name(capsys, no_cluster, model, needle):
    message = _bad_input(capsys, "--model", model)
    assert f"model.name = {model!r}" in message and needle in message


def test_more_nodes_than_samples_in_the_batch(capsys, no_cluster):
    message = _bad_input(capsys, "--nodes", "100000")
    assert "batch_size = 128 is smaller than num_nodes = 100000" in message
    assert "100000 or 100000" not in message


def test_unreachable_address_fails_without_contacting_ray(capsys, no_cluster):
    # A loopback port that nothing listens on: bound, then closed.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    message = _bad_input(capsys, "--address", f"127.0.0.1:{port}")
    assert f"runtime.address = '127.0.0.1:{port}': nothing answers at 127.0.0.1:{port}" in message
    assert "ray start --head" in message


def test_console_script_refuses_an_unreachable_address_before_loading_torch(tmp_path):
    # A torch that cannot be imported: the answer must come before anything loads it.
    poisoned = tmp_path / "poisoned"
    (poisoned / "torch").mkdir(parents=True)
    (poisoned / "torch" / "__init__.py").write_text("raise ImportError('torch was imported')\n")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(poisoned), str(repo)])}
    wafer = Path(sys.executable).parent / "wafer"  # the installed console script
    done = subprocess.run(
        [sys.executable, str(wafer), "train", "--steps", "2", "--address", f"127.0.0.1:{port}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    message = done.stderr.strip()
    assert "Traceback" not in message and "\n" not in message, message
    assert message.startswith(f"wafer train: error: runtime.address = '127.0.0.1:{port}'")
    assert "ray start --head" in message
