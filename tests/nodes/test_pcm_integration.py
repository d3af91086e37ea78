"""`wafer train --backend pcm` trains over the real cluster (Ray actors, gRPC on loopback)."""

from __future__ import annotations

import json

import pytest

from emulator.cli import main

pytestmark = pytest.mark.integration

NUM_STEPS = 60


def test_pcm_nodes_train_mlp_digits_well_above_chance(ray_session, tmp_path, capsys):
    path = tmp_path / "pcm.json"
    argv = ["train", "--backend", "pcm", "--model", "mlp-digits", "--nodes", "2"]
    argv += ["--steps", str(NUM_STEPS), "--quiet", "--json", str(path)]
    assert main(argv) == 0
    assert "2 x pcm nodes" in capsys.readouterr().out
    result = json.loads(path.read_text())
    assert result["config"]["backend"]["kind"] == "pcm"
    assert len(result["steps"]) == NUM_STEPS
    # Ten classes: chance is 10%. Hardware-aware training on noisy arrays still learns.
    assert result["eval"]["accuracy"] > 0.8
    assert result["steps"][-1]["loss"] < 0.5 * result["steps"][0]["loss"]
    # The emulated clock is the PCM node's: programming, reads and the digital backward.
    emulated = result["emulated"]
    assert emulated["node"].startswith("PCM 64 cores")
    parts = emulated["node_time_by_part_s"]
    assert {"program", "calibration", "mvm", "digital"} == set(parts)
    assert emulated["step_time_s"] >= sum(parts.values())
    # One node's programming per step is what its counters saw per training step (the node
    # also programmed for the final evaluation: one forward pass, the same programming).
    counters = result["traffic"]["totals"]["nodes"][0]["backend"]
    assert parts["program"] == pytest.approx(
        counters["pcm.program_time_s"] / (NUM_STEPS + 1), rel=1e-9
    )
