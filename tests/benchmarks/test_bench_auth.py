"""bench_auth: each mode's cluster is what it says (plain answers a call without the token,
the others refuse it), every mode trains, and the plain mode's swaps are undone."""

from __future__ import annotations

import json

import grpc

import proto.rpc
from benchmarks import bench_auth


def test_every_mode_trains_and_the_json_holds_the_ratios(tmp_path) -> None:
    servers = (grpc.server, grpc.aio.server, proto.rpc._WithToken._metadata)
    out = tmp_path / "auth.json"
    # Each mode's cluster is checked first: a call without the token must be answered
    # (plain), refused as UNAUTHENTICATED (token) or fail its handshake (TLS).
    assert (
        bench_auth.main(["--hidden", "16", "--rounds", "1", "--steps", "1", "--json", str(out)])
        == 0
    )
    result = json.loads(out.read_text())
    assert set(result["median_step_s"]) == {"plain", "token", "token+tls"}
    assert result["ratio"]["plain"] == 1.0
    assert all(len(times) == 1 for times in result["step_s"].values())
    assert (grpc.server, grpc.aio.server, proto.rpc._WithToken._metadata) == servers


def test_a_guarded_cluster_built_after_a_plain_one_refuses_calls_without_the_token() -> None:
    with bench_auth._plain():
        pass
    security = proto.rpc.Security.generate()
    cluster = bench_auth.fz.build_services(security, hidden=8)
    try:
        bench_auth._check_mode(cluster, plain=False)
    finally:
        cluster.stop()
