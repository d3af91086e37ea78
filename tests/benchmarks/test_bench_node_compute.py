"""bench_node_compute: one node's compute and plain torch's, round by round, in its JSON."""

from __future__ import annotations

import json

import pytest

from benchmarks import bench_node_compute


def test_rounds_time_both_sides_and_the_json_holds_them(tmp_path, capsys) -> None:
    out = tmp_path / "compute.json"
    rows = bench_node_compute.main(
        ["--model", "mlp-digits", "--batch-size", "16", "--steps", "2", "--rounds", "2"]
        + ["--json", str(out)]
    )
    assert [row["round"] for row in rows] == [0, 1]
    assert all(row["node_s"] > 0 and row["torch_s"] > 0 for row in rows)
    saved = json.loads(out.read_text())
    assert saved["rows"] == rows and saved["args"]["model"] == "mlp-digits"
    assert "median of 2 rounds" in capsys.readouterr().out


def test_zero_rounds_is_refused_naming_the_flag(capsys) -> None:
    with pytest.raises(SystemExit):
        bench_node_compute.main(["--rounds", "0"])
    assert "--rounds must be at least 1" in capsys.readouterr().err
