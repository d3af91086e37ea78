"""bench_call_setup: passes on a call each and on one open call echo every message, and
its JSON holds the rows."""

from __future__ import annotations

import json

import pytest

from benchmarks import bench_call_setup


def test_both_modes_echo_every_pass_and_the_json_holds_the_rows(tmp_path) -> None:
    out = tmp_path / "setup.json"
    rows = bench_call_setup.main(
        ["--layers", "2", "--passes", "3", "--bytes", "16", "--json", str(out)]
    )
    assert [row["mode"] for row in rows] == list(bench_call_setup.MODES)
    for row in rows:
        assert row["layers_per_pass"] == 2 and row["message_bytes"] == 16
        assert row["wall_us_per_pass"] > 0
        assert row["client_cpu_us_per_pass"] >= 0 and row["server_cpu_us_per_pass"] >= 0
    assert json.loads(out.read_text())["rows"] == rows


def test_a_pass_without_messages_is_refused(capsys) -> None:
    with pytest.raises(SystemExit):
        bench_call_setup.main(["--layers", "0"])
    assert "--layers must be at least 1" in capsys.readouterr().err


def test_the_summary_reads_set_up_in_messages_and_survives_no_cpu_tick() -> None:
    def row(mode: str, wall_us: float, client_us: float, server_us: float) -> dict:
        return {
            "mode": mode,
            "wall_us_per_pass": wall_us,
            "client_cpu_us_per_pass": client_us,
            "server_cpu_us_per_pass": server_us,
        }

    rows = [row("call_per_pass", 300.0, 900.0, 300.0), row("open_call", 200.0, 400.0, 200.0)]
    # 600 us of set-up; a message of the open call costs 600 / 6 = 100 us.
    assert bench_call_setup._summary(rows, 6) == (
        "a call per pass / one open call: wall 1.50, CPU 2.00; set-up per call: 600 us of CPU, "
        "the CPU of 6.00 messages"
    )
    idle = [row("call_per_pass", 10.0, 0.0, 0.0), row("open_call", 10.0, 0.0, 0.0)]
    assert "CPU -;" in bench_call_setup._summary(idle, 6)
