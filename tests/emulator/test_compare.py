"""`wafer compare` over the real cluster and `wafer eval`'s drift evaluation in-process."""

from __future__ import annotations

import json

import pytest

from emulator.cli import main
from emulator.compare import backend_overrides, drift_eval
from emulator.config import load_config
from emulator.prepare import prepare_layers
from emulator.reference import reference_train


@pytest.mark.integration
def test_compare_cs2_pcm_and_photonic_writes_table_json_and_png(ray_session, tmp_path, capsys):
    json_path, png_path = tmp_path / "compare.json", tmp_path / "compare.png"
    # Two steps: every row's step is measured and priced the same at any count.
    argv = ["compare", "--backends", "cs2,pcm,photonic", "--model", "mlp-digits", "--steps", "2"]
    argv += ["--batch-size", "64", "--quiet", "--json", str(json_path), "--plot", str(png_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for heading in ("accuracy", "emulated time", "energy/sample", "TOPS/W", "what produced it"):
        assert heading in out
    assert "emulated clock: CS-2 nodes" in out and "emulated clock: PCM 64 cores" in out
    rows = json.loads(json_path.read_text())["rows"]
    assert [row["backend"] for row in rows] == ["cs2", "pcm", "photonic"]
    for row in rows:
        assert row["num_steps"] == 2 and row["samples_per_step"] == 64
        assert row["step_time_s"] > 0 and row["step_energy_j"] > 0 and row["tops_per_watt"] > 0
        assert row["node_tops_per_watt"] > row["tops_per_watt"]
        assert row["run_energy_j"] == pytest.approx(2 * row["step_energy_j"])
    cs2, pcm, photonic = (row["details"] for row in rows)
    # Every row pays for the streams: MemoryX and SwarmX energy come from the same cluster.
    for details in (cs2, pcm):
        assert details["memoryx_energy_j_per_step"] > 0 and details["swarmx_energy_j_per_step"] > 0
    assert pcm["program_energy_j_per_step"] > 0 and pcm["mvm_energy_j_per_step"] > 0
    assert pcm["digital_energy_j_per_step"] > 0
    assert pcm["endurance_steps"] == pytest.approx(1e8 / 10)
    assert pcm["deployment_energy_j"] > 0 and cs2["deployment_energy_j"] == 0
    # Same model, same operations counted: only the energy differs.
    assert rows[0]["flops_per_step"] == pytest.approx(rows[1]["flops_per_step"])
    assert rows[2]["flops_per_step"] == pytest.approx(rows[0]["flops_per_step"])
    # backprop trains on the twin (a computer); the chip pays only to receive the result.
    assert photonic["digital_energy_j_per_step"] > 0 and "program_energy_j_per_step" not in photonic
    assert photonic["deployment_time_s"] > 0
    assert png_path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_backend_specs_name_a_training_method(capsys):
    assert backend_overrides("photonic:ffm") == {
        "backend.kind": "photonic",
        "backend.training": "ffm",
    }
    assert backend_overrides("pcm") == {"backend.kind": "pcm"}
    # A bad method fails before any run starts, naming the field.
    argv = ["compare", "--backends", "cs2,photonic:sgd", "--steps", "1", "--quiet"]
    assert main(argv) == 2
    assert "backend.training" in capsys.readouterr().err


def test_eval_rejects_a_digital_backend(capsys):
    assert main(["eval", "--backend", "cs2", "--steps", "1"]) == 2
    assert "wafer eval needs --backend pcm" in capsys.readouterr().err


def test_eval_rejects_a_bad_drift_time_list(capsys):
    assert main(["eval", "--drift-times", "1,soon"]) == 2
    assert "--drift-times = '1,soon' is not a comma-separated list" in capsys.readouterr().err


def test_drift_eval_compensation_keeps_accuracy_after_a_year():
    config = load_config(overrides={"backend.kind": "pcm", "model.name": "mlp-digits"})
    layers, dataset = prepare_layers(config)
    trained = reference_train(
        layers,
        dataset,
        optimizer_config=config.optimizer,
        batch_size=128,
        num_steps=150,
        seed=0,
    )
    result = drift_eval(config, [1.0, 31536000.0], trained.block_weights)
    assert result.digital_accuracy > 0.9
    assert result.arrays_used == 3
    assert result.accuracy_compensated[0] > result.digital_accuracy - 0.05
    assert result.accuracy_compensated[1] > result.digital_accuracy - 0.1
    table = result.table()
    assert "global drift comp." in table and "no compensation" in table
    with pytest.raises(ValueError, match=r"drift_times = \[-1\.0\] must all be >= 0 s"):
        drift_eval(config, [-1.0], trained.block_weights)
