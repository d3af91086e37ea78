"""Small shared gRPC plumbing: servers, channels and error mapping."""

from __future__ import annotations

import functools
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc

from proto.serde import WireError

# Chunks are ~1 MB; leave room for the message envelope.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


def start_server(
    register: Callable[[grpc.Server], None], host: str, *, max_workers: int = 32
) -> tuple[grpc.Server, str]:
    """Start a server on an OS-chosen port of ``host``; returns it and its ``host:port``."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=_OPTIONS)
    register(server)
    port = server.add_insecure_port(f"{host}:0")
    if port == 0:
        raise ValueError(
            f"could not bind a gRPC port on host {host!r}; set bind_host to an address of this machine"
        )
    server.start()
    return server, f"{host}:{port}"


@functools.cache
def channel(address: str) -> grpc.Channel:
    """One shared channel per peer address for the life of the process."""
    return grpc.insecure_channel(address, options=_OPTIONS)


class StepConflict(Exception):
    """A request for a step version this component cannot serve (FAILED_PRECONDITION)."""


def rpc_errors(method: Callable[..., Any]) -> Callable[..., Any]:
    """Map our exceptions to gRPC status codes so servicers stay thin.

    WireError -> INVALID_ARGUMENT, StepConflict -> FAILED_PRECONDITION, and an
    error from a downstream call keeps its code and message.
    """

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except WireError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except StepConflict as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
            details = exc.details() if hasattr(exc, "details") else str(exc)
            context.abort(code, details)

    return wrapper


def rpc_stream_errors(method: Callable[..., Any]) -> Callable[..., Any]:
    """``rpc_errors`` for server-streaming methods (generators)."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            yield from method(self, request, context)
        except WireError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except StepConflict as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))

    return wrapper


NODE_IP = "node-ip"


def resolve_host(host: str) -> str:
    """``"node-ip"`` means the address of the Ray node this process runs on."""
    if host != NODE_IP:
        return host
    import ray

    return ray.util.get_node_ip_address()
