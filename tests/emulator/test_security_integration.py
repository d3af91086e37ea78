"""A launched run's credentials: a private token file, TLS on demand, strangers refused.

The outside client here reads the run directory the way the README shows.
"""

from __future__ import annotations

import json
import stat

import grpc
import pytest

from emulator.config import RuntimeConfig, TlsConfig, load_config
from emulator.runtime import client_security, run_security
from emulator.train import train
from memoryx.checkpoint import load_checkpoint
from proto import memoryx_pb2_grpc as mgrpc
from proto import node_pb2_grpc as ngrpc
from proto import swarmx_pb2_grpc as sgrpc
from proto import tensor_pb2 as pb
from proto.rpc import Security, channel

TIMEOUT_S = 30


def _stats_calls(described: dict, security: Security) -> list:
    calls = [lambda: mgrpc.MemoryXStub(channel(described["memoryx"], security)).Stats]
    calls += [
        lambda a=a: sgrpc.SwarmXStub(channel(a, security)).Stats
        for a in described["swarmx"].values()
    ]
    calls += [
        lambda a=a: ngrpc.ComputeNodeStub(channel(a, security)).Stats for a in described["nodes"]
    ]
    return calls


@pytest.mark.integration
def test_run_over_tls_publishes_a_private_token_and_refuses_strangers(ray_session, tmp_path):
    run_dir = tmp_path / "run"
    seen: dict = {}

    def outside_client(step: int, layer: int, name: str) -> None:
        if seen or step != 1:
            return
        seen["token_mode"] = stat.S_IMODE((run_dir / "token").stat().st_mode)
        described = json.loads((run_dir / "cluster.json").read_text())
        seen["described"] = described
        security = client_security(run_dir)
        seen["answered"] = [
            call()(pb.Empty(), timeout=TIMEOUT_S) for call in _stats_calls(described, security)
        ]
        stranger = Security(token=Security.generate().token, tls=security.tls)
        codes = []
        for call in _stats_calls(described, stranger):
            try:
                call()(pb.Empty(), timeout=TIMEOUT_S)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())
        seen["stranger_codes"] = codes

    config = load_config(
        overrides={
            "model.name": "mlp-digits",
            "num_nodes": 2,
            "batch_size": 32,
            "num_steps": 3,
            "runtime.run_dir": str(run_dir),
            "runtime.tls.force": True,
            "save_checkpoint": str(tmp_path / "exported.pt"),
        }
    )
    report = train(config, progress=False, fault=outside_client)
    assert len(report.steps) == 3
    assert seen["token_mode"] == 0o600
    described = seen["described"]
    assert described["tls"] is True and (run_dir / "ca.pem").is_file()
    assert len(seen["answered"]) == 1 + len(described["swarmx"]) + 2
    assert seen["stranger_codes"] == [grpc.StatusCode.UNAUTHENTICATED] * len(seen["answered"])
    # The token dies with the run; the checkpoint MemoryX chose a name for is exported.
    assert not (run_dir / "token").exists()
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-00000003.pt"]
    store, _ = load_checkpoint(tmp_path / "exported.pt", config.optimizer.build())
    assert store.version(0) == 3


def test_an_off_host_bind_gets_tls_unless_insecure_is_explicit(capsys):
    assert run_security(RuntimeConfig(bind_host="127.0.0.1")).tls is None
    assert run_security(RuntimeConfig(bind_host="127.0.0.1", tls=TlsConfig(force=True))).tls
    off_host = run_security(RuntimeConfig(bind_host="10.1.2.3"))
    assert off_host.tls is not None and off_host.tls.server_name
    assert run_security(RuntimeConfig(address="auto")).tls is not None  # binds the node's IP
    assert "WARNING" not in capsys.readouterr().err
    insecure = run_security(RuntimeConfig(bind_host="10.1.2.3", insecure=True))
    assert insecure.tls is None
    assert "WARNING: runtime.insecure = true" in capsys.readouterr().err
    assert run_security(RuntimeConfig()).token != run_security(RuntimeConfig()).token


@pytest.mark.parametrize(
    "runtime, message",
    [
        ({"insecure": True, "tls": {"force": True}}, "set one"),
        ({"tls": {"ca": "ca.pem"}}, "not all of ca, cert and key"),
        ({"stream_idle_s": 0}, "stream_idle_s"),
        ({"max_streams_per_service": 2}, "max_streams_per_service"),
    ],
)
def test_security_settings_are_validated(runtime, message):
    with pytest.raises(ValueError, match=message):
        load_config(overrides={f"runtime.{k}": v for k, v in runtime.items()})
