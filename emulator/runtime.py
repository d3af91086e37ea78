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
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from core.atomic import write_bytes_atomic, write_json_atomic
from emulator import early_ray
from emulator.address import _host_port
from emulator.config import RuntimeConfig
from emulator.early_ray import ray_keeps_loopback, start_local_ray
from emulator.memory import available_memory_bytes
from memoryx.checkpoint import confined_path, copy_checkpoint_dir
from proto.rpc import TOKEN_METADATA_KEY, Security, TlsMaterial, is_loopback
from proto.shm import MIN_RING_BYTES, SHM_DIR, SharedMemoryPlan, ring_bytes_for
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
    """Start (or join) Ray; its warnings reach the user's output only when ``verbose``.

    A local Ray that the console script started early (``emulator.early_ray``) is kept.
    """
    if ray.is_initialized():
        if not (early_ray.started() and address is not None):
            return
        ray.shutdown()  # started for a local run, but the config names a cluster
    elif address is None and early_ray.failure() is not None:
        raise early_ray.failure()
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    level = logging.WARNING if verbose else logging.ERROR
    if address is None:
        # Ray starts its processes with SIGINT blocked: a terminal's Ctrl-C (sent to the whole
        # process group) reaches only this driver, which stops the run and then the actors.
        try:
            start_local_ray(logging_level=level)
        except Exception as exc:  # Ray raises a bare Exception when its processes time out
            ray.shutdown()
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RuntimeError(
                f"Ray could not start on this machine ({first}); on a busy machine, run the "
                "command again"
            ) from None
        return
    target = _host_port(address)
    loopback = target is not None and is_loopback(target[0]) and not address.startswith("ray://")
    try:
        if loopback:
            with ray_keeps_loopback():
                ray.init(
                    address=address,
                    _node_ip_address="127.0.0.1",
                    log_to_driver=False,
                    logging_level=level,
                )
        else:
            ray.init(address=address, log_to_driver=False, logging_level=level)
    except (ConnectionError, ray.exceptions.AuthenticationError) as exc:
        raise ValueError(
            f"runtime.address = {address!r}: could not join a Ray cluster there ({exc}). "
            "Start one with `ray start --head` and pass its address (e.g. 'auto' or 'HOST:6379'), "
            "or leave the address unset to start a local Ray instance."
        ) from None


#: CPU of one placement-group bundle (one host process): Ray needs a non-zero resource
#: to place a bundle, and this little lets thousands of them share a core.
_BUNDLE_CPU = 0.001
#: Seconds to wait for a placement group's bundles to be reserved.
_PLACEMENT_TIMEOUT_S = 120


def placement_options(
    strategy: str | None, num_processes: int
) -> tuple[list[dict], PlacementGroup | None]:
    """Ray options that put process i into bundle i of a PACK or SPREAD placement group
    (``runtime.placement``); None: no options, Ray's own scheduling."""
    if strategy is None:
        return [{} for _ in range(num_processes)], None
    group = placement_group([{"CPU": _BUNDLE_CPU}] * num_processes, strategy=strategy.upper())
    try:
        ray.get(group.ready(), timeout=_PLACEMENT_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(group)
        raise RuntimeError(
            f"runtime.placement = {strategy!r}: Ray could not reserve {num_processes} bundles "
            f"of {_BUNDLE_CPU} CPU in {_PLACEMENT_TIMEOUT_S} s; the cluster's nodes need "
            "CPU resources (ray start --num-cpus)."
        ) from None
    options = [
        {
            "num_cpus": _BUNDLE_CPU,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group=group, placement_group_bundle_index=i
            ),
        }
        for i in range(num_processes)
    ]
    return options, group


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


def _single_host() -> bool:
    """Every process of the run lands on one machine: the Ray cluster has one live node."""
    return sum(1 for node in ray.nodes() if node.get("Alive")) == 1


#: Share of the available memory the rings of a run may take (``shared_memory_plan``).
SHARED_MEMORY_FRACTION = 0.25
#: ``runtime.shared_memory``: whether a run moves chunk payloads through shared memory.
SHARED_MEMORY_WHEN = {"auto": _single_host, "off": lambda: False}


def shared_memory_free_bytes() -> int:
    """Free bytes of the file system POSIX shared memory lives in (0 where there is none)."""
    try:
        return shutil.disk_usage(SHM_DIR).free
    except OSError:
        return 0


def shared_memory_plan(
    runtime: RuntimeConfig, *, slot_bytes: int, layer_bytes: list[int], num_servers: int
) -> SharedMemoryPlan | None:
    """The run's shared-memory plan (its segment prefix, slot and ring sizes), or None when
    chunks travel as gRPC bytes (``runtime.shared_memory``; Ray must be up).

    ``auto`` also keeps gRPC bytes when the rings of ``num_servers`` servers would take more
    than ``SHARED_MEMORY_FRACTION`` of the available memory (a model beyond RAM) or of the
    free space of the shared-memory file system (a container's is often 64 MiB, and a ring
    that outgrows it kills its process with SIGBUS when its pages are touched)."""
    if not SHARED_MEMORY_WHEN[runtime.shared_memory]():
        return None
    ring_bytes = ring_bytes_for(layer_bytes)
    room_bytes = min(available_memory_bytes() or 0, shared_memory_free_bytes())
    if num_servers * max(ring_bytes, MIN_RING_BYTES) > SHARED_MEMORY_FRACTION * room_bytes:
        return None
    return SharedMemoryPlan.generate(slot_bytes=slot_bytes, ring_bytes=ring_bytes)


def run_security(
    runtime: RuntimeConfig, *, shared_memory: SharedMemoryPlan | None = None
) -> Security:
    """A fresh token, and TLS wherever a service binds an address other machines reach;
    ``shared_memory``: the run's plan for co-located chunk payloads (``proto.shm``)."""
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
        shared_memory=shared_memory,
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


def write_client_files(
    run_dir: Path,
    security: Security,
    memoryx_address: str,
    swarmx_addresses: dict[str, str],
    node_addresses: list[str],
) -> None:
    """What an outside client of this run needs: the token (0600), the CA and the addresses."""
    # write_bytes_atomic creates through mkstemp, so the token file is 0600 from the start.
    write_bytes_atomic(run_dir / TOKEN_FILE, security.token.encode())
    if security.tls is not None:
        write_bytes_atomic(run_dir / CA_FILE, security.tls.ca_pem)
    write_json_atomic(
        run_dir / ADDRESSES_FILE,
        {
            "memoryx": memoryx_address,
            "swarmx": swarmx_addresses,
            "nodes": node_addresses,
            "tls": security.tls is not None,
            "tls_server_name": security.tls.server_name if security.tls else None,
            "token_metadata_key": TOKEN_METADATA_KEY,
        },
    )


def export_checkpoint(checkpoint_dir: Path, name: str, destination: str | Path) -> None:
    """Copy checkpoint ``name`` that MemoryX wrote in ``checkpoint_dir`` to ``destination``."""
    source = confined_path(checkpoint_dir, name)
    destination = Path(destination)
    if source.is_dir():
        copy_checkpoint_dir(source, destination)
        return
    destination.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(
        dir=destination.parent, prefix=f".{destination.name}.", suffix=".tmp"
    )
    try:
        with open(source, "rb") as src, os.fdopen(fd, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(temp, destination)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
