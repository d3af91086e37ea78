"""Every service answers the standard gRPC health check; a dead one is told apart."""

from __future__ import annotations

from proto.clients import HEALTH_TIMED_OUT, HealthClient
from proto.rpc import Security, start_server

SECURITY = Security.generate()


def test_every_server_answers_serving_and_a_stopped_one_is_refused():
    server, address = start_server(lambda server: None, "127.0.0.1", security=SECURITY)
    try:
        assert HealthClient(address, SECURITY).check(timeout_s=5.0) is None
        # The health check sits behind the run's token like every other call.
        other = HealthClient(address, Security.generate()).check(timeout_s=5.0)
        assert other is not None and "UNAUTHENTICATED" in other
    finally:
        server.stop(grace=None)
    problem = HealthClient(address, SECURITY).check(timeout_s=5.0)
    assert problem is not None and "UNAVAILABLE" in problem


def test_a_server_that_never_answers_times_out():
    import socket

    # A listening socket that accepts but never speaks HTTP/2: the check must not wait forever.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    try:
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        problem = HealthClient(address, SECURITY).check(timeout_s=0.5)
        assert problem is not None and problem.startswith(HEALTH_TIMED_OUT)
    finally:
        listener.close()
