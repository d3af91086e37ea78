"""A user's own data with a user's own model: through the CLI, the Python API, and its errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from torch import nn

from emulator.config import load_config
from emulator.prepare import prepare_layers
from emulator.zoo import ModelConfig, model_positions

REPO = Path(__file__).resolve().parents[2]
TINY_NET = "tests.emulator.user_models:tiny_net"  # 64 inputs, 10 outputs


def _env(**extra: str) -> dict:
    # The user's default: no GRPC_VERBOSITY, Ray's own settings untouched.
    env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
    return {**env, "PYTHONPATH": str(REPO), **extra}


# The console script, as a user runs it (it does not put the working directory on sys.path
# by itself, unlike `python -m`).
WAFER = Path(sys.executable).with_name("wafer")
USER_MODULE = """
import torch
from torch import nn


class Block(nn.Module):  # a class of the user's own, which the nodes must unpickle
    def __init__(self, n_in, n_out):
        super().__init__()
        self.linear = nn.Linear(n_in, n_out)

    def forward(self, x):
        return torch.tanh(self.linear(x))


def factory():
    return nn.Sequential(Block(64, 32), nn.Linear(32, 10))
"""


def wafer(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``wafer`` with stdout and stderr piped, as in CI or ``| tee``."""
    command = [str(WAFER)] if WAFER.exists() else [sys.executable, "-m", "emulator.cli"]
    return subprocess.run(
        [*command, *args],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _blob_npz(path: Path, *, num_train: int, num_test: int, num_classes: int = 10) -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(num_classes, 64))

    def draw(n):
        y = np.arange(n) % num_classes
        return (centres[y] + 0.3 * rng.normal(size=(n, 64))).astype(np.float32), y

    (x, y), (x_test, y_test) = draw(num_train), draw(num_test)
    np.savez(path, x=x, y=y, x_test=x_test, y_test=y_test)


@pytest.mark.integration
def test_wafer_train_on_a_users_npz_with_a_users_model_piped(tmp_path):
    """The issue's command; the nodes train on the file, and a piped log stays quiet."""
    _blob_npz(tmp_path / "my.npz", num_train=120, num_test=30)
    (tmp_path / "my_mod.py").write_text(USER_MODULE)  # in the working directory
    result = wafer(
        "train",
        "--model",
        "my_mod:factory",
        "--data",
        "my.npz",  # relative to the working directory, read by the driver only
        "--nodes",
        "2",
        "--steps",
        "30",
        "--batch-size",
        "32",
        "--json",
        "report.json",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["config"]["data"]["path"] == "my.npz"
    # The nodes evaluated the file's 30 test samples (the digits' test set has 360).
    assert report["eval"]["num_samples"] == 30
    assert report["final_loss"] < 0.5 * report["steps"][0]["loss"]
    assert report["eval"]["accuracy"] > 0.8
    # Off a terminal: no carriage-return redraws, no gRPC or Ray chatter; stderr holds
    # only the plain progress lines, one per tenth of the run (plus a heartbeat if slow).
    assert "\r" not in result.stderr
    assert "GOAWAY" not in result.stderr and "WARNING" not in result.stderr
    lines = result.stderr.splitlines()
    assert lines and all(re.match(r"train: step \d+/30 \(\d+%\)", line) for line in lines), lines
    assert 10 <= len(lines) <= 20
    assert lines[-1].startswith("train: step 30/30 (100%)")


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        # A head with fewer outputs than the data has classes (once "Target 8 is out of bounds"
        # inside a node).
        (
            ["--model", "tests.emulator.user_models:narrow_head", "--data", "my.npz"],
            [
                "data file 'my.npz'",
                "labels up to 9 (10 classes)",
                "8 outputs",
                "nn.Linear(..., 10)",
            ],
        ),
        (["--model", "tests.emulator.user_models:narrow_head"], ["data set 'digits'", "8 outputs"]),
        (["--model", TINY_NET, "--data", "missing.npz"], ["data.path = 'missing.npz'", "no such"]),
        (["--model", TINY_NET, "--data", "short.npz"], ["'short.npz'", "120 samples", "119"]),
        (
            ["--model", "gpt-tiny", "--data", "t.bin", "--seq-len", "128"],
            ["'t.bin'", "64 positions"],
        ),
        (["--seq-len", "16"], ["--seq-len 16", "--data"]),
    ],
)
def test_bad_data_is_one_paragraph_before_any_actor_starts(
    tmp_path, monkeypatch, capsys, args, needles
):
    from emulator import cli, train

    _blob_npz(tmp_path / "my.npz", num_train=120, num_test=30)
    arrays = dict(np.load(tmp_path / "my.npz"))
    np.savez(tmp_path / "short.npz", x=arrays["x"], y=arrays["y"][:-1])
    (np.arange(1000) % 64).astype(np.uint16).tofile(tmp_path / "t.bin")
    monkeypatch.chdir(tmp_path)

    def no_cluster(*args, **kwargs):
        raise AssertionError("the cluster started although the data is bad")

    monkeypatch.setattr(train, "launch", no_cluster)
    assert cli.main(["train", *args, "--nodes", "2", "--steps", "2"]) == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("wafer train: error: ") and "\n" not in message, message
    for needle in needles:
        assert needle in message, message


def test_narrow_head_on_digits_fails_in_the_driver():
    config = load_config(overrides={"model.name": "tests.emulator.user_models:narrow_head"})
    with pytest.raises(ValueError, match=r"labels up to 9 \(10 classes\).*8 outputs"):
        prepare_layers(config)


def test_model_positions_finds_the_position_table():
    gpt = ModelConfig(name="gpt-tiny", seq_len=48).build(seed=0)
    assert model_positions(gpt) == 48

    class NanoGPTStyle(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wte, self.wpe = nn.Embedding(50, 8), nn.Embedding(24, 8)

    class Declares(nn.Module):
        block_size = 256

    assert model_positions(NanoGPTStyle()) == 24
    assert model_positions(Declares()) == 256
    assert model_positions(nn.Linear(3, 4)) is None


@pytest.mark.integration
def test_python_api_factory_data_and_token_file(ray_session, tmp_path):
    """``module:factory`` data and a .bin token file, from Python, on 2 nodes."""
    from emulator.train import train

    factory = load_config(
        overrides={
            "model.name": TINY_NET,
            "data.path": "tests.emulator.user_models:blob_data",
            "num_nodes": 2,
            "num_steps": 20,
            "batch_size": 32,
        }
    )
    report = train(factory, progress=False)
    assert report.evals[-1].num_samples == 20  # blob_data's test set
    assert report.final_loss < 0.5 * report.steps[0].loss

    tokens = np.tile(np.arange(32, dtype=np.uint16), 40)  # a cycle a model learns fast
    tokens.tofile(tmp_path / "train.bin")
    lm = load_config(
        overrides={
            "model.name": "gpt-tiny",
            "data.path": str(tmp_path / "train.bin"),
            "data.seq_len": 16,
            "num_nodes": 2,
            "num_steps": 4,
            "batch_size": 8,
        }
    )
    report = train(lm, progress=False)
    # The last fifth of the 1280 tokens, in whole windows of 16 (and one target beyond).
    assert report.evals[-1].num_samples == (256 - 1) // 16
    assert report.final_loss < report.steps[0].loss
