"""The idle-stream watchdog: one thread per process, whatever the number of servers in it.

A process hosting many emulated nodes runs one gRPC server per node; a watchdog thread
each made the periodic wake-ups of a step grow as the nodes times the step's length.
"""

from __future__ import annotations

import threading

from proto.rpc import Security, start_server


def _watchdogs() -> int:
    return sum(1 for thread in threading.enumerate() if thread.name == "grpc-idle")


def test_servers_of_one_process_share_one_idle_watchdog():
    security = Security.generate()
    servers = [
        start_server(lambda server: None, "127.0.0.1", security=security)[0] for _ in range(5)
    ]
    try:
        assert _watchdogs() == 1
    finally:
        for server in servers:
            server.stop(grace=None)
