"""A launched run's credentials: a private token file, TLS on demand, strangers refused.

The outside client here reads the run directory the way the README shows.
"""

from __future__ import annotations

import datetime
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
from proto.tls import generate_run_tls

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


def _write_user_tls(directory, server_name: str) -> dict[str, str]:
    """A CA of the user's and a server certificate it signed for ``server_name``, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    day = datetime.timedelta(days=1)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("test site CA"))
        .issuer_name(name("test site CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - day)
        .not_valid_after(now + day)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name(server_name))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - day)
        .not_valid_after(now + day)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(server_name)]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    files = {
        "ca": ca.public_bytes(serialization.Encoding.PEM),
        "cert": cert.public_bytes(serialization.Encoding.PEM),
        "key": key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    }
    for field, pem in files.items():
        (directory / f"{field}.pem").write_bytes(pem)
    return {field: str(directory / f"{field}.pem") for field in files}


@pytest.mark.integration
def test_a_run_with_the_users_tls_files_serves_over_them_and_refuses_other_cas(
    ray_session, tmp_path
):
    server_name = "services.site.test"
    files = _write_user_tls(tmp_path, server_name)
    run_dir = tmp_path / "run"
    seen: dict = {}

    def outside_clients(step: int, layer: int, name: str) -> None:
        if seen or step != 1:
            return
        described = json.loads((run_dir / "cluster.json").read_text())
        seen["described"] = described
        security = client_security(run_dir)  # the user's CA, published in the run directory
        seen["answered"] = [
            call()(pb.Empty(), timeout=TIMEOUT_S) for call in _stats_calls(described, security)
        ]
        # The same token, but a client that trusts another CA, or none: no connection at all.
        codes = []
        for stranger in (
            Security(token=security.token, tls=generate_run_tls()),
            Security(token=security.token, tls=None),
        ):
            for call in _stats_calls(described, stranger):
                try:
                    call()(pb.Empty(), timeout=5)
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as exc:
                    codes.append(exc.code())
        seen["stranger_codes"] = codes

    config = load_config(
        overrides={
            "model.name": "mlp-digits",
            "num_nodes": 2,
            "batch_size": 32,
            "num_steps": 2,
            "runtime.run_dir": str(run_dir),
            **{f"runtime.tls.{field}": path for field, path in files.items()},
            "runtime.tls.server_name": server_name,
        }
    )
    report = train(config, progress=False, fault=outside_clients)
    assert len(report.steps) == 2  # every hop (MemoryX, SwarmX, nodes) over the user's TLS
    described = seen["described"]
    assert described["tls"] is True and described["tls_server_name"] == server_name
    assert (run_dir / "ca.pem").read_bytes() == (tmp_path / "ca.pem").read_bytes()
    assert len(seen["answered"]) == 1 + len(described["swarmx"]) + 2
    assert seen["stranger_codes"] == [grpc.StatusCode.UNAVAILABLE] * (2 * len(seen["answered"]))
