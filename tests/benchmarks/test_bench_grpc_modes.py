"""bench_grpc_modes: every pairing of sync and aio gRPC echoes, on loopback, and its JSON."""

from __future__ import annotations

import json

from benchmarks import bench_grpc_modes


def test_every_pairing_round_trips_and_the_json_holds_the_rows(tmp_path) -> None:
    out = tmp_path / "modes.json"
    rows = bench_grpc_modes.main(["--sizes", "64", "--messages", "20", "--json", str(out)])
    pairs = {(row["server"], row["client"]) for row in rows}
    assert pairs == {(s, c) for s in bench_grpc_modes.MODES for c in bench_grpc_modes.MODES}
    for row in rows:
        assert row["message_bytes"] == 64
        assert row["round_trip_us"] > 0 and row["client_cpu_us"] >= 0
    assert json.loads(out.read_text())["rows"] == rows
