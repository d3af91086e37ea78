"""bench_swarmx: every transfer delivers the layer's bytes over both transports, and the
targets and JSON say what was measured."""

from __future__ import annotations

import json

import pytest

from benchmarks import bench_swarmx
from proto import shm


def test_both_transports_deliver_every_byte_and_report_the_targets(tmp_path) -> None:
    out = tmp_path / "swarmx.json"
    # Each transfer raises if a sink or client got other than the bytes it should have.
    result = bench_swarmx.main(
        ["--layer-mb", "1", "--repeats", "1", "--nodes", "2", "--json", str(out)]
    )
    assert list(result["transports"]) == ["shared-memory", "grpc"]
    layer_bytes = 1 << 20
    for transport, run in result["transports"].items():
        assert run["transport"] == transport
        rows = run["rows"]
        assert set(rows) == {"p2p-memoryx", "p2p-raw", "swarmx-1", "swarmx-2"}
        assert rows["swarmx-2"]["delivered_bytes"] == 2 * layer_bytes
        assert rows["p2p-raw"]["delivered_bytes"] == layer_bytes
        assert run["headline"]["memoryx_vs_raw"] == pytest.approx(
            rows["p2p-memoryx"]["delivered_MBps"] / rows["p2p-raw"]["delivered_MBps"]
        )
    targets = result["targets"]
    assert [(t["transport"], t["what"].split()[0]) for t in targets] == [
        ("shared-memory", "MemoryX"),
        ("shared-memory", "SwarmX"),
        ("grpc", "MemoryX"),
        ("grpc", "SwarmX"),
    ]
    for target in targets:
        assert target["met"] == (target["ratio"] >= bench_swarmx.TARGET_VS_RAW)
    assert json.loads(out.read_text()) == result
    # The shared-memory run leaves this process reading nothing through shared memory.
    assert not shm.active()


def test_one_transport_alone_and_bad_sizes(capsys) -> None:
    result = bench_swarmx.main(
        ["--layer-mb", "1", "--repeats", "1", "--nodes", "1", "--transport", "grpc"]
    )
    assert list(result["transports"]) == ["grpc"]
    assert "gRPC bytes (between hosts)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench_swarmx.main(["--layer-mb", "0"])
    assert "--layer-mb, --repeats and --nodes must each be at least 1" in capsys.readouterr().err
