"""bench_servers_per_process: every mode echoes every message over the endpoints it names,
its JSON holds the rows, and the summary reads the medians."""

from __future__ import annotations

import json

import pytest

from benchmarks import bench_servers_per_process as bench


def test_every_mode_echoes_over_its_endpoints_and_the_json_holds_the_rows(tmp_path) -> None:
    out = tmp_path / "servers.json"
    rows = bench.main(
        [
            "--components",
            "3",
            "--messages",
            "6",
            "--bytes",
            "16",
            "--repeats",
            "1",
            "--json",
            str(out),
        ]
    )
    assert [row["mode"] for row in rows] == list(bench.MODES)
    endpoints = {row["mode"]: row["endpoints"] for row in rows}
    assert endpoints == {
        "one_endpoint": 1,
        "server_each": 3,
        "shared_server": 3,
        "aio_server": 3,
        "aio_both": 3,
        "aio_via_thread": 3,
        "loop_client": 3,
    }
    for row in rows:
        # Rounds of one message per endpoint: 6 messages over 1 endpoint or over 3.
        assert row["messages"] == 6 and row["message_bytes"] == 16
        assert row["wall_us_per_message"] > 0
        assert row["server_cpu_us_per_message"] >= 0 <= row["client_cpu_us_per_message"]
    assert json.loads(out.read_text())["rows"] == rows


@pytest.mark.parametrize("mode", ["shared_server", "aio_server", "aio_both", "aio_via_thread"])
def test_a_shared_server_listens_on_every_endpoint_port(mode: str) -> None:
    row = bench.measure(mode, components=4, messages=4)
    # Four streams, one per port, each echoed once: the one server serves all four ports.
    assert row["endpoints"] == 4 and row["messages"] == 4


def test_nothing_to_serve_is_refused(capsys) -> None:
    with pytest.raises(SystemExit):
        bench.main(["--components", "0"])
    assert "--components must be at least 1" in capsys.readouterr().err


def test_the_summary_gives_the_medians_and_each_shared_servers_ratio() -> None:
    def rows_of(server_us: tuple, client_us: tuple) -> list[dict]:
        return [
            {"mode": mode, "server_cpu_us_per_message": server, "client_cpu_us_per_message": client}
            for mode, server, client in zip(bench.MODES, server_us, client_us, strict=True)
        ]

    clients = (100.0, 160.0, 150.0, 150.0, 70.0, 80.0, 75.0)
    rows = rows_of((80.0, 180.0, 105.0, 50.0, 40.0, 85.0, 150.0), clients)
    rows += rows_of((90.0, 160.0, 95.0, 60.0, 50.0, 90.0, 140.0), clients)
    rows += rows_of(
        (85.0, 170.0, 136.0, 85.0, 34.0, 70.0, 160.0), (0.0, 150.0, 0.0, 0.0, 90.0, 0.0, 10.0)
    )
    # Medians 85, 170, 105, 60, 40, 85, 150 (not the means): over 170, 0.62, 0.35, 0.24 and
    # 0.50; the clients' medians 160, 70 and 75.
    assert bench.summary(rows) == (
        "server CPU per message (median): one_endpoint 85 us, server_each 170 us, "
        "shared_server 105 us, aio_server 60 us, aio_both 40 us, aio_via_thread 85 us, "
        "loop_client 150 us; "
        "over server_each: shared_server 0.62, aio_server 0.35, aio_both 0.24, "
        "aio_via_thread 0.50; client CPU per message: sync 160 us, aio 70 us, "
        "threads on the loop 75 us"
    )
    idle = rows_of((0.0,) * 7, (0.0,) * 7)
    assert (
        "over server_each: shared_server -, aio_server -, aio_both -, aio_via_thread -;"
        in bench.summary(idle)
    )
