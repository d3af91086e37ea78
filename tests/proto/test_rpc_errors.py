"""``proto.rpc.is_cancelled``: which errors count as a cancelled call."""

from __future__ import annotations

import grpc

from proto.frames import WireError
from proto.rpc import is_cancelled


class _CallError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode):
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code


def test_a_cancelled_call_and_a_servers_bare_rpc_error_are_cancelled():
    assert is_cancelled(_CallError(grpc.StatusCode.CANCELLED))
    # A server's request iterator raises a bare RpcError, without a code, when its client
    # cancels; asking it for its code raised AttributeError before.
    assert is_cancelled(grpc.RpcError())


def test_other_errors_are_not_cancelled():
    assert not is_cancelled(_CallError(grpc.StatusCode.DEADLINE_EXCEEDED))
    assert not is_cancelled(WireError("bad stream"))
    assert not is_cancelled(None)
