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
        from emulator.runtime import ray_keeps_loopback

        with ray_keeps_loopback():
            ray.init(
                address="local",  # a fresh instance, never someone else's cluster
                _node_ip_address="127.0.0.1",  # Ray advertises loopback, as emulator.launch does
                num_cpus=2,
                include_dashboard=False,
                log_to_driver=False,
                logging_level=logging.WARNING,
            )
    yield ray
    ray.shutdown()
