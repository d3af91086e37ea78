"""Shared fixtures. Ray starts once per test session (it takes seconds)."""

from __future__ import annotations

import logging
import os

import pytest

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        from emulator.runtime import start_local_ray

        # As `wafer train` starts it: every Ray process on loopback.
        start_local_ray(logging_level=logging.WARNING, num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(autouse=True)
def _fresh_grpc_channels():
    """Each test gets new channels: proto.rpc.channel keeps one per address for the life
    of the process, and a later test's server may get a port an earlier test's server had.
    A channel still backing off from that server's shutdown then fails at once
    (UNAVAILABLE, connection refused) although the new server is up.
    """
    yield
    from proto.rpc import channel

    channel.cache_clear()
