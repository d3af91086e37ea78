"""The Ray address a run joins, checked in milliseconds: standard library only.

``wafer train --address HOST:PORT`` with nothing listening must fail at once, and
importing torch alone takes seconds (15 s on a loaded host), so the console script
runs ``fail_fast`` before it imports anything heavy (``emulator.cli``).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

# A GCS (or Ray client server) on a reachable host answers a TCP connect in milliseconds.
_CONNECT_TIMEOUT_S = 2.0
_DEFAULT_PORTS = {"ray://": 10001, "": 6379}  # Ray client server, GCS


def _host_port(address: str) -> tuple[str, int] | None:
    """``(host, port)`` that ``ray.init(address)`` will connect to; None when Ray finds it itself."""
    if address in ("auto", "local"):
        address = os.environ.get("RAY_ADDRESS", "") if address == "auto" else ""
        if not address or address in ("auto", "local"):
            return None
    scheme = "ray://" if address.startswith("ray://") else ""
    rest = address[len(scheme) :].split("/", 1)[0]
    host, sep, port = rest.rpartition(":")
    if not sep or "]" in port:  # no port (an IPv6 literal's colons end in "]")
        host, port = rest, str(_DEFAULT_PORTS[scheme])
    if not port.isdigit():
        raise ValueError(
            f"runtime.address = {address!r} is not a Ray address; use HOST:PORT, "
            "ray://HOST:PORT or 'auto'."
        )
    return host.strip("[]"), int(port)


def check_address(address: str | None) -> None:
    """ValueError in at most a few seconds if nothing listens at the Ray address.

    ``ray.init`` retries an unreachable address for tens of seconds and logs a
    warning on each try; a plain TCP connect to the same port answers at once.
    """
    target = None if address is None else _host_port(address)
    if target is None:
        return
    host, port = target
    try:
        with socket.create_connection((host, port), timeout=_CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else exc.strerror or str(exc)
        raise ValueError(
            f"runtime.address = {address!r}: nothing answers at {host}:{port} ({reason}). "
            f"Start a Ray cluster there (`ray start --head --port={port}`) and pass the address "
            "it prints (e.g. 'auto' or 'HOST:6379'), or leave the address unset to start a "
            "local Ray instance."
        ) from None


def _train_address(argv: list[str]) -> str | None:
    """The Ray address of a ``wafer train`` command line (``--address``), else None."""
    if not argv or argv[0] != "train":
        return None
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--address")
    known, _ = parser.parse_known_args(argv[1:])
    return known.address


def fail_fast(argv: list[str]) -> None:
    """Exit 2 with the one-paragraph error if ``wafer train --address`` names an address
    nothing answers at; otherwise return (every other check runs later, with the config)."""
    address = _train_address(argv)
    if address is None:
        return
    try:
        check_address(address)
    except ValueError as exc:
        print(f"wafer train: error: {exc}", file=sys.stderr)
        sys.exit(2)


__all__ = ["check_address", "fail_fast"]
