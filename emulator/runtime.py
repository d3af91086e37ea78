"""The run's environment: the Ray instance, the addresses services bind, and the run's
credentials and directory.

Each launch is one run with its own credentials: a random token (and, when a service
binds an address other machines reach, TLS material) handed to the actors as a
constructor argument through Ray, never on a command line or in a log. The run
directory (0700) holds the token file (0600), the CA certificate, the services'
addresses and the checkpoints. ``client_security(run_dir)`` is what an outside client
reads to call the services of a running cluster.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

import ray

from emulator.config import RuntimeConfig
from memoryx.checkpoint import copy_checkpoint_dir
from proto.rpc import Security, TlsMaterial, is_loopback
from proto.tls import generate_run_tls, read_tls


def check_bind_host(runtime: RuntimeConfig) -> None:
    """ValueError unless this machine can bind ``runtime.bind_host`` (local runs only).

    On a Ray cluster (``runtime.address`` set) the services bind on other
    machines, so only those machines could tell.
    """
    host = runtime.bind_host
    if host is None or runtime.address not in (None, "local"):
        return
    try:
        for family, kind, proto, _, sockaddr in socket.getaddrinfo(
            host, 0, type=socket.SOCK_STREAM
        ):
            with socket.socket(family, kind, proto) as probe:
                probe.bind(sockaddr[:2] if family == socket.AF_INET else sockaddr)
            return
    except OSError as exc:
        raise ValueError(
            f"runtime.bind_host = {host!r} is not an address of this machine "
            f"({exc.strerror or exc}); leave it unset (127.0.0.1), or use 0.0.0.0 or one of "
            "this machine's own addresses."
        ) from None


def ensure_ray(address: str | None, *, verbose: bool = False) -> None:
    """Start (or join) Ray; its warnings reach the user's output only when ``verbose``."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Ray's start-up warnings (token authentication, /dev/shm size, ...) are about the
    # machine, not the run; the actors' own output goes to Ray's log files.
    level = logging.WARNING if verbose else logging.ERROR
    if address is None:
        # Ray starts its processes with SIGINT blocked: a terminal's Ctrl-C (sent to the whole
        # process group) reaches only this driver, which stops the run and then the actors.
        ray.init(
            address="local",
            # Ray advertises loopback; its processes still listen on every interface
            # (Ray has no switch for that), guarded by Ray's token auth (on by default).
            _node_ip_address="127.0.0.1",
            include_dashboard=False,
            log_to_driver=False,
            logging_level=level,
        )
        return
    try:
        ray.init(address=address, log_to_driver=False, logging_level=level)
    except (ConnectionError, ray.exceptions.AuthenticationError) as exc:
        raise ValueError(
            f"runtime.address = {address!r}: could not join a Ray cluster there ({exc}). "
            "Start one with `ray start --head` and pass its address (e.g. 'auto' or 'HOST:6379'), "
            "or leave the address unset to start a local Ray instance."
        ) from None


#: Files of the run directory an outside client reads.
TOKEN_FILE = "token"
CA_FILE = "ca.pem"
ADDRESSES_FILE = "cluster.json"
CHECKPOINT_DIR = "checkpoints"


def client_security(run_dir: str | Path) -> Security:
    """The credentials an outside client of a running cluster reads from its run directory."""
    run_dir = Path(run_dir)
    described = json.loads((run_dir / ADDRESSES_FILE).read_text())
    tls = None
    if described["tls"]:
        tls = TlsMaterial(
            ca_pem=(run_dir / CA_FILE).read_bytes(),
            cert_pem=b"",  # a client presents no certificate: the token says who it is
            key_pem=b"",
            server_name=described["tls_server_name"],
        )
    return Security(token=(run_dir / TOKEN_FILE).read_text().strip(), tls=tls)


def run_security(runtime: RuntimeConfig) -> Security:
    """A fresh token, and TLS wherever a service binds an address other machines reach."""
    off_host = not is_loopback(runtime.host)
    if runtime.tls.user_provided:
        tls = read_tls(runtime.tls.ca, runtime.tls.cert, runtime.tls.key, runtime.tls.server_name)
    elif runtime.tls.force or (off_host and not runtime.insecure):
        tls = generate_run_tls()
    else:
        tls = None
    if off_host and tls is None:
        print(
            f"wafer: WARNING: runtime.insecure = true: the services bind {runtime.host!r} "
            "without TLS; anyone on that network can read the run token and the tensors.",
            file=sys.stderr,
        )
    return Security.generate(
        tls=tls,
        stream_idle_s=runtime.stream_idle_s,
        max_streams=runtime.max_streams_per_service,
    )


def _make_run_dir(runtime: RuntimeConfig) -> tuple[Path, bool]:
    """The run directory (private to the user) and whether launch made it up."""
    if runtime.run_dir is None:
        return Path(tempfile.mkdtemp(prefix="wafer-run-")), True
    path = Path(runtime.run_dir)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path, False


def _stage_resume(resume: str, checkpoint_dir: Path) -> str:
    """The name, inside the run's checkpoint directory, of the checkpoint to resume from.

    MemoryX reads checkpoints only from there: the driver (the user's own
    process) links or copies the file the user named into it.
    """
    source = Path(resume).resolve()
    if source.is_dir():  # a directory checkpoint (tiered or sharded MemoryX)
        if source.parent == checkpoint_dir.resolve():
            return source.name
        copy_checkpoint_dir(source, checkpoint_dir / "resume")
        return "resume"
    if not source.is_file():
        raise ValueError(f"resume = {resume!r} is not a checkpoint file.")
    if source.parent == checkpoint_dir.resolve():
        return source.name
    name = "resume.pt"
    target = checkpoint_dir / name
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:  # another file system
        shutil.copyfile(source, target)
    return name
