from __future__ import annotations

import json
from pathlib import Path

import pytest

from emulator.cli import main
from emulator.cli_cost import parse_node_counts, parse_overrides
from emulator.cost.validate import load_references, run_checks


def test_node_count_syntax():
    assert parse_node_counts("1,2,4") == [1, 2, 4]
    assert parse_node_counts("8-64:8") == [8, 16, 24, 32, 40, 48, 56, 64]
    assert parse_node_counts("1-16") == [1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16]
    assert parse_node_counts("1-192")[-3:] == [128, 160, 192]
    with pytest.raises(ValueError, match=r"--nodes '4-2' is not valid"):
        parse_node_counts("4-2")
    with pytest.raises(ValueError, match=r"--nodes 'many' is not valid"):
        parse_node_counts("many")


def test_simulate_prints_the_table_and_writes_json_plot_and_trace(tmp_path: Path, capsys):
    paths = {name: tmp_path / name for name in ("out.json", "scaling.png", "trace.json")}
    argv = ["simulate", "--model", "gpt3-1.3b", "--nodes", "1,16,192"]
    argv += ["--json", str(paths["out.json"]), "--plot", str(paths["scaling.png"])]
    argv += ["--trace", str(paths["trace.json"]), "--trace-nodes", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "tokens/s" in out and "efficiency" in out and "energy/step" in out
    assert "Scaling efficiency drops below 90% at N=192" in out
    result = json.loads(paths["out.json"].read_text())
    assert [r["num_nodes"] for r in result["results"]] == [1, 16, 192]
    assert result["nonlinear_from_nodes"] == 192
    assert result["results"][0]["speedup"] == 1.0
    assert result["hardware"]["swarmx"]["max_systems"] == 192
    assert paths["scaling.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    names = {
        e["args"]["name"]
        for e in json.loads(paths["trace.json"].read_text())["traceEvents"]
        if e["name"] == "process_name"
    }
    assert names == {"MemoryX", "SwarmX L1.0", "node 0", "node 1"}


def test_simulate_profiles_a_zoo_model(capsys):
    assert main(["simulate", "--model", "mlp-digits", "--nodes", "1,2"]) == 0
    assert "mlp-digits (85k parameters)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "gpt9"], "Unknown model 'gpt9'; choose a GPT size"),
        (["--hardware", "cs9"], "Unknown hardware preset 'cs9'"),
        (["--nodes", "1-193"], "num_nodes = 193 is not valid for the cs2 preset"),
        (["--model", "gpt-120t", "--hardware", "cs3"], "5.94 PB of MemoryX state"),
    ],
)
def test_simulate_bad_input_is_one_paragraph_and_exit_2(argv, message, capsys):
    assert (
        main(["simulate", "--nodes", "1", *argv] if "--nodes" not in argv else ["simulate", *argv])
        == 2
    )
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert err.startswith("wafer simulate: error: ") and err.count("\n") == 1


def test_negative_bandwidth_in_a_copied_preset_exits_2(tmp_path: Path, capsys):
    text = Path("core/presets/cs2.yaml").read_text()
    path = tmp_path / "bad.yaml"
    path.write_text(
        text.replace("io_bandwidth_bytes_per_s: 150.0e+9", "io_bandwidth_bytes_per_s: -1.0")
    )
    assert main(["simulate", "--hardware", str(path), "--nodes", "1"]) == 2
    assert "wafer.io_bandwidth_bytes_per_s = -1.0 is not valid" in capsys.readouterr().err


def test_validation_figures_pass_and_calibration_is_separate():
    checks = run_checks()
    validation = [c for c in checks if c.reference.role == "validation"]
    assert len(validation) >= 5
    assert all(c.passed for c in validation), [(c.reference.id, c.error) for c in validation]
    assert all(c.reference.source for c in checks)
    assert {c.reference.id for c in checks if c.reference.role == "calibration"} >= {
        "andromeda-peak",
        "memoryx-120t",
        "largest-cs2-cluster",
    }


def test_validate_command_passes(capsys):
    assert main(["validate"]) == 0
    out = capsys.readouterr().out
    assert "mean error" in out and "max error" in out and "all within tolerance" in out
    assert out.index("Calibration figures") > out.index("max error")


def test_validate_exits_nonzero_when_a_figure_is_out_of_tolerance(tmp_path: Path, capsys):
    path = tmp_path / "refs.yaml"
    path.write_text(
        """
references:
  - id: impossible
    role: validation
    claim: "GPT-3 XL scales 20x on 16 systems"
    source: "made up for this test"
    quantity: speedup
    model: gpt3-1.3b
    hardware: cs2
    nodes: 16
    value: 20.0
    tolerance: 0.05
"""
    )
    assert len(load_references(path)) == 1
    assert main(["validate", "--references", str(path)]) == 1
    assert "outside tolerance: impossible" in capsys.readouterr().out


def test_bad_reference_entry_names_the_field(tmp_path: Path):
    path = tmp_path / "refs.yaml"
    path.write_text(
        "references:\n  - {id: x, role: validation, claim: c, source: s, quantity: speedup,"
        " value: 1.0, tolerance: 0.1}\n"
    )
    with pytest.raises(ValueError, match=r"needs model, hardware, nodes"):
        load_references(path)


def test_set_overrides_a_preset_field(tmp_path: Path):
    assert parse_overrides(["wafer.compute_efficiency=0.25", "swarmx.hop_latency_s=1e-5"]) == {
        "wafer.compute_efficiency": 0.25,
        "swarmx.hop_latency_s": 1e-5,
    }
    base, slow = tmp_path / "base.json", tmp_path / "slow.json"
    argv = ["simulate", "--model", "gpt3-1.3b", "--nodes", "1"]
    assert main([*argv, "--json", str(base)]) == 0
    assert main([*argv, "--json", str(slow), "--set", "wafer.compute_efficiency=0.25"]) == 0
    base_step = json.loads(base.read_text())["results"][0]["step_time_s"]
    slow_step = json.loads(slow.read_text())["results"][0]["step_time_s"]
    # Compute-bound at one system: half the efficiency, nearly twice the time.
    assert 1.9 < slow_step / base_step <= 2.0
    emulated = json.loads(base.read_text())["results"][0]
    assert emulated["energy_by_component_j"].keys() == {"wafer", "memoryx", "swarmx"}


@pytest.mark.parametrize(
    ("backend", "parts"),
    [("pcm", ("program", "mvm", "digital")), ("photonic", ("program", "mvm", "ffm_error"))],
)
def test_simulate_on_analog_and_photonic_nodes(backend, parts, tmp_path: Path, capsys):
    json_path = tmp_path / "out.json"
    argv = ["simulate", "--model", "gpt3-125m", "--nodes", "1,4", "--backend", backend]
    argv += ["--json", str(json_path)]
    if backend == "photonic":
        argv += ["--training", "ffm"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "one node's busy time per step" in out
    result = json.loads(json_path.read_text())
    assert result["backend"]["kind"] == backend
    first = result["results"][0]
    assert set(parts) <= set(first["node_time_by_part_s"])
    assert first["energy_by_component_j"][backend] > 0
    assert result["deployment"]["energy_j"] > 0
    # Same MemoryX and SwarmX as the digital run: only the nodes differ.
    assert (
        main(["simulate", "--model", "gpt3-125m", "--nodes", "1,4", "--json", str(json_path)]) == 0
    )
    wafer = json.loads(json_path.read_text())["results"][0]
    assert wafer["memoryx_capacity_bytes"] == first["memoryx_capacity_bytes"]
    assert wafer["step_time_s"] != first["step_time_s"]


def test_simulate_sparsity_writes_json_and_plot(tmp_path: Path, capsys):
    json_path, png_path = tmp_path / "sparsity.json", tmp_path / "sparsity.png"
    argv = ["simulate", "--model", "gpt3-125m", "--sparsity", "0,0.5,0.9", "--nodes", "1,4"]
    argv += ["--json", str(json_path), "--plot", str(png_path)]
    assert main(argv) == 0
    points = json.loads(json_path.read_text())["points"]
    assert [(p["sparsity"], p["num_nodes"]) for p in points] == [
        (s, n) for n in (1, 4) for s in (0.0, 0.5, 0.9)
    ]
    assert points[0]["speedup"] == 1.0 and points[2]["speedup"] > points[1]["speedup"] > 1.0
    assert points[2]["bytes_per_step"] < points[0]["bytes_per_step"]
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_simulate_node_groups_shows_each_group_and_the_slowest_sets_the_step(
    tmp_path: Path, capsys
):
    out_json = tmp_path / "groups.json"
    argv = ["simulate", "--model", "gpt3-1.3b", "--node-groups", "cs2:2,cs2@cs3:2"]
    assert main([*argv, "--json", str(out_json)]) == 0
    assert "2 x cs2" in capsys.readouterr().out
    equal = json.loads(out_json.read_text())
    assert [g["hardware"] for g in equal["groups"]] == ["cs2", "cs3"]
    assert [g["batch_share"] for g in equal["groups"]] == [256, 256]
    assert equal["step_time_s"] == max(g["node_time_s"] for g in equal["groups"])
    assert main([*argv, "--balance", "throughput", "--json", str(out_json)]) == 0
    weighed = json.loads(out_json.read_text())
    shares = [g["batch_share"] for g in weighed["groups"]]
    # The CS-3 group is faster, so it takes more of the batch and the step gets shorter.
    assert sum(shares) == 512 and shares[1] > shares[0]
    assert weighed["step_time_s"] < equal["step_time_s"]
    assert max(g["idle_s"] for g in weighed["groups"]) < max(g["idle_s"] for g in equal["groups"])


def test_simulate_refuses_a_bad_group_with_the_field(capsys):
    assert main(["simulate", "--model", "mlp-digits", "--node-groups", "cs2:2,pcm:0"]) == 2
    assert "node_groups[1].num_nodes" in capsys.readouterr().err
