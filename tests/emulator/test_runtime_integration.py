"""The local Ray instance a run starts stays on loopback and keeps Ray's token auth on."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.integration,
    # The sockets and the processes that own them are read from /proc.
    pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc"),
]

_LISTEN = "0A"


def _address(hex_address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address of /proc/net/tcp{,6}: 32-bit words in host (little-endian) byte order."""
    raw = bytes.fromhex(hex_address)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    address = ipaddress.ip_address(words)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _listening() -> dict[int, ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Socket inode -> local address, for every TCP socket in LISTEN state."""
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], int(fields[9])
            if state == _LISTEN:
                found[inode] = _address(local.split(":")[0])
    return found


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def _descendants(root: int) -> dict[int, str]:
    """pid -> command name of every process below ``root``."""
    parents: dict[int, tuple[int, str]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        parents[int(stat.parent.name)] = (int(text[text.rindex(")") + 2 :].split()[1]), name)
    found: dict[int, str] = {}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, name) in parents.items():
            if ppid == parent and pid not in found:
                found[pid] = name
                frontier.append(pid)
    return found


def test_every_ray_process_of_a_local_run_listens_on_loopback_only(ray_session):
    import ray

    @ray.remote(num_cpus=0)
    class Probe:
        def pid(self) -> int:
            return os.getpid()

    probe = Probe.remote()
    actor_pid = ray.get(probe.pid.remote(), timeout=60)
    try:
        processes = _descendants(os.getpid())
        # The GCS, the raylet and the worker of a fresh actor: Ray's own servers (other
        # workers may host an earlier test's services, which bind what that test chose).
        checked = {
            pid: name
            for pid, name in processes.items()
            if name in ("gcs_server", "raylet") or pid == actor_pid
        }
        assert {"gcs_server", "raylet"} <= set(checked.values()), processes
        assert actor_pid in checked
        listening = _listening()
        for pid, name in checked.items():
            addresses = [listening[i] for i in _socket_inodes(pid) if i in listening]
            assert addresses, f"{name} (pid {pid}) listens on nothing: the check found no port"
            off_host = [str(a) for a in addresses if not a.is_loopback]
            assert not off_host, f"{name} (pid {pid}) listens on {off_host}"
        # Ray's own token authentication is on (its default for a new local instance).
        assert os.environ.get("RAY_AUTH_MODE") == "token"
    finally:
        ray.kill(probe)


def test_a_local_ray_runs_none_of_the_helpers_a_run_never_uses(ray_session):
    """No autoscaler monitor, log monitor or dashboard API server: each is a Python
    process importing Ray (about 0.8 s of CPU) at every start (emulator.early_ray)."""
    import ray
    from ray._private import ray_constants

    started = ray._private.worker._global_node.all_processes
    for helper in (
        ray_constants.PROCESS_TYPE_MONITOR,
        ray_constants.PROCESS_TYPE_LOG_MONITOR,
        ray_constants.PROCESS_TYPE_DASHBOARD,
    ):
        assert helper not in started, sorted(started)
    assert {ray_constants.PROCESS_TYPE_GCS_SERVER, ray_constants.PROCESS_TYPE_RAYLET} <= set(
        started
    )


def test_a_local_rays_workers_run_with_one_malloc_arena(ray_session):
    """Every thread of a component's process allocates from glibc's main heap, which keeps
    what it frees (``emulator.early_ray._workers_share_one_heap``): without it a node's
    compute threads fault a step's pages in again every step."""
    import ray

    from emulator.launch import ComponentHost, _remote

    host = _remote(ComponentHost).remote()
    try:
        pid = ray.get(host.pid.remote(), timeout=60)
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        # One arena, unless whoever ran this set their own.
        expected = os.environ.get("MALLOC_ARENA_MAX", "1")
        assert f"MALLOC_ARENA_MAX={expected}".encode() in environ
    finally:
        ray.kill(host)


def test_the_address_decoder_reads_proc_net_tcp_notation():
    assert str(_address("0100007F")) == "127.0.0.1"
    assert str(_address("00000000")) == "0.0.0.0"
    assert str(_address("0000000000000000FFFF00000100007F")) == "127.0.0.1"
    assert str(_address("00000000000000000000000001000000")) == "::1"
    assert not _address("00000000000000000000000000000000").is_loopback
