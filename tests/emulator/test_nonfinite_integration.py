"""A diverging run on real actors: MemoryX never applies NaN/Inf (``optimizer.nonfinite``)."""

from __future__ import annotations

import json

import pytest
import torch

from emulator import cli

pytestmark = pytest.mark.integration

# SGD at this rate overflows mlp-digits' weights within a few steps (NaN/Inf from step 2 on).
DIVERGING = ["--model", "mlp-digits", "--optimizer", "sgd", "--lr", "1e6", "--nodes", "2"]
DIVERGING += ["--batch-size", "16", "--seed", "0", "--quiet"]


def test_error_policy_stops_naming_layer_and_step_and_keeps_the_report(
    ray_session, tmp_path, capsys
):
    report = tmp_path / "report.json"
    status = cli.main(["train", *DIVERGING, "--steps", "8", "--json", str(report)])
    out, err = capsys.readouterr()
    assert status == 1, out + err
    assert "Traceback" not in out + err
    message = next(line for line in err.splitlines() if line.startswith("wafer train: stopped"))
    assert "nonfinite: step " in message and ", layer " in message
    assert "optimizer.nonfinite: skip" in message
    result = json.loads(report.read_text())
    done = result["stopped"]["num_steps_done"]
    assert result["stopped"]["reason"] == "nonfinite" and done == len(result["steps"]) < 8
    assert f"step {done}, layer " in message  # the step that failed is the one after the last done
    assert "wafer train: summary" in out and "STOPPED" in out


def test_skip_policy_counts_skipped_steps_and_keeps_weights_finite(ray_session, tmp_path):
    from emulator.config import load_config
    from emulator.train import train

    config = load_config(
        overrides={
            "optimizer.name": "sgd",
            "optimizer.lr": 1e6,
            "optimizer.nonfinite": "skip",
            "num_nodes": 2,
            "batch_size": 16,
            "num_steps": 8,
            "seed": 0,
        }
    )
    report = train(config, progress=False)
    result = report.to_json()
    skipped = [s["step"] for s in result["steps"] if s["skipped"]]
    assert result["num_skipped_steps"] == len(skipped) > 0
    assert report.traffic["num_updates"] < 8 * report.num_layers  # skipped steps applied nothing
    for layer in report.final_weights:
        assert all(bool(torch.isfinite(t).all()) for t in layer.values())
