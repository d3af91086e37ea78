"""Small shared gRPC plumbing: servers, channels, the run's credentials and error mapping.

Every server starts through ``start_server`` and every client channel comes
from ``channel``; both take the run's ``Security``. On the server a guard
interceptor checks the run token of every call (constant-time compare),
caps the concurrent streams and cancels a stream whose client goes idle; on
the client the same token travels as call metadata. With ``Security.tls``
set, both ends speak TLS.
"""

from __future__ import annotations

import functools
import ipaddress
import secrets
import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2_grpc

from proto import shm
from proto.frames import WireError
from proto.guard import BEARER, TOKEN_METADATA_KEY, Guard
from proto.shm import SharedMemoryPlan

# Chunks are ~1 MB; leave room for the message envelope. A larger message is
# refused with RESOURCE_EXHAUSTED before any servicer sees it.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
# Threads kept free for unary calls (Stats, CommitStep, ...) however many streams are open.
_UNARY_WORKERS = 8


@dataclass(frozen=True)
class TlsMaterial:
    """PEM bytes of a CA, and the certificate and key every service of the run presents."""

    ca_pem: bytes = field(repr=False)
    cert_pem: bytes = field(repr=False)
    key_pem: bytes = field(repr=False)
    # Name the certificate is issued to, checked instead of the address's host (a per-run
    # certificate names the run, not the hosts, which are unknown at launch); None: the host.
    server_name: str | None = None


@dataclass(frozen=True)
class Security:
    """What the services and clients of one run share: its token, TLS and stream bounds.

    Handed to actors through Ray (a constructor argument), never on a command
    line; ``repr`` never shows the token or the key.
    """

    token: str = field(repr=False)
    tls: TlsMaterial | None = None
    stream_idle_s: float = 60.0  # a stream waiting this long on its client is cancelled, s
    max_streams: int = 64  # concurrent streaming calls per service, count
    #: Chunk payloads through shared memory (every component on one host); None: as bytes.
    shared_memory: SharedMemoryPlan | None = None

    def __post_init__(self) -> None:
        if len(self.token) < 16:
            raise ValueError("Security.token must be at least 16 characters (use generate()).")
        if self.stream_idle_s <= 0:
            raise ValueError(f"Security.stream_idle_s = {self.stream_idle_s} must be positive.")
        if self.max_streams < 1:
            raise ValueError(f"Security.max_streams = {self.max_streams} must be at least 1.")

    @classmethod
    def generate(cls, **kwargs: Any) -> Security:
        """A fresh random run token (256 bits) with the given TLS material and bounds."""
        return cls(token=secrets.token_urlsafe(32), **kwargs)


def is_loopback(host: str) -> bool:
    """True for an address only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


#: The fixed part of a layer pass through the tree, which also waits for the nodes'
#: compute (forward, backward, optimizer update), s.
LAYER_TIMEOUT_S = 600.0
#: A caller's time left beyond this means it set no deadline, s.
_NO_DEADLINE_S = 1e9


def time_left_s(context: grpc.ServicerContext) -> float:
    """Deadline for a call a servicer makes on behalf of ``context``'s call: what it has left.

    A caller that set no deadline gets ``LAYER_TIMEOUT_S``: every call still has one.
    """
    left = context.time_remaining()
    # Without a deadline gRPC reports None or the distance to the end of time (~292 years).
    return LAYER_TIMEOUT_S if left is None or left > _NO_DEADLINE_S else left


# -- server ------------------------------------------------------------------

#: How often a thread that waits for a peer (a layer for its turn, a pass for room)
#: also checks by itself whether its call is still active, s. Its call's end wakes it at
#: once (a call-context callback, e.g. ``notifier``); this is only the fallback. Not shorter: every waiting thread
#: of a host of many nodes wakes and takes the GIL each period, so with 0.05 s a step's
#: polls grew as the number of nodes times the step's length (192-node mlp-digits).
CANCEL_CHECK_S = 1.0


def notifier(condition: threading.Condition) -> Callable[[], None]:
    """A callback that wakes every thread waiting on ``condition`` (give it to a call
    context's ``add_callback``: the call's end then wakes those waiting for their turn)."""

    def notify() -> None:
        with condition:
            condition.notify_all()

    return notify


def is_cancelled(error: BaseException | None) -> bool:
    """Whether ``error`` is a cancelled call: a client call's error with CANCELLED, or the
    bare ``grpc.RpcError`` (no status code) that a server's request iterator raises when its
    client cancels."""
    if not isinstance(error, grpc.RpcError):
        return False
    code = getattr(error, "code", None)
    return code is None or code() == grpc.StatusCode.CANCELLED


def start_server(
    register: Callable[[grpc.Server], None], host: str, *, security: Security
) -> tuple[grpc.Server, str]:
    """Start a guarded server on an OS-chosen port of ``host``; returns it and its ``host:port``.

    Every server also serves the standard gRPC health-checking service
    (``grpc.health.v1.Health``, overall status SERVING, behind the same token
    guard), which the driver polls to tell a dead or hung component from a slow one.
    """
    guard = Guard(security)
    # The process's layer streams go through its shared-memory ring from now on (proto.shm).
    shm.activate(security.shared_memory)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=security.max_streams + _UNARY_WORKERS),
        interceptors=[guard],
        options=GRPC_OPTIONS,
    )
    register(server)
    # Check is a tiny unary call on the server's pool: a live process answers it even
    # while it streams layers; a stopped or dead one does not.
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    address = bind_port(server, host, security)
    server.start()
    guard.start_watchdog()
    return server, address


def bind_port(server: Any, host: str, security: Security) -> str:
    """Bind ``server`` (sync or ``grpc.aio``) to an OS-chosen port of ``host``, with TLS if
    the run has it; its ``host:port``."""
    if security.tls is not None:
        credentials = grpc.ssl_server_credentials(
            [(security.tls.key_pem, security.tls.cert_pem)], root_certificates=None
        )
        port = server.add_secure_port(f"{host}:0", credentials)
    else:
        port = server.add_insecure_port(f"{host}:0")
    if port == 0:
        raise ValueError(
            f"could not bind a gRPC port on host {host!r}; set bind_host to an address of this machine"
        )
    return f"{host}:{port}"


# -- client ------------------------------------------------------------------


class _WithToken:
    """A multicallable of any kind that adds the run token to the call's metadata.

    Per-call credentials without gRPC's client-interceptor machinery, which
    costs more per call than the call itself on loopback.
    """

    __slots__ = ("_call", "_metadatum", "_loop_twin")

    def __init__(
        self, call: Any, metadatum: tuple[str, str], loop_twin: Callable[[], Any] | None = None
    ):
        self._call = call
        self._metadatum = metadatum
        # Makes the same method on the process loop's channel (``on_loop``), once.
        self._loop_twin: Any = loop_twin

    def on_loop(self) -> _WithToken:
        """This method on a ``grpc.aio`` channel to the same peer, with the same token, TLS
        and codecs (``proto.loop_streams``). Call on the process's event loop only."""
        twin = self._loop_twin
        if not isinstance(twin, _WithToken):
            if twin is None:
                raise TypeError("this method has no event-loop twin (not from proto.rpc.channel)")
            twin = self._loop_twin = _WithToken(twin(), self._metadatum)
        return twin

    def _metadata(self, metadata: Any) -> tuple:
        return (self._metadatum,) if not metadata else (*metadata, self._metadatum)

    def __call__(self, request: Any, timeout: float | None = None, metadata: Any = None, **kw):
        return self._call(request, timeout=timeout, metadata=self._metadata(metadata), **kw)

    def with_call(self, request: Any, timeout: float | None = None, metadata: Any = None, **kw):
        return self._call.with_call(
            request, timeout=timeout, metadata=self._metadata(metadata), **kw
        )

    def future(self, request: Any, timeout: float | None = None, metadata: Any = None, **kw):
        return self._call.future(request, timeout=timeout, metadata=self._metadata(metadata), **kw)


class _TokenChannel(grpc.Channel):
    """``channel`` with the run token on every call made through it."""

    def __init__(self, inner: grpc.Channel, address: str, security: Security):
        self._inner = inner
        self._address, self._security = address, security
        self._metadatum = (TOKEN_METADATA_KEY, BEARER + security.token)

    def unary_unary(self, method, *args, **kwargs):
        return _WithToken(self._inner.unary_unary(method, *args, **kwargs), self._metadatum)

    def unary_stream(self, method, *args, **kwargs):
        return _WithToken(self._inner.unary_stream(method, *args, **kwargs), self._metadatum)

    def stream_unary(self, method, *args, **kwargs):
        return _WithToken(self._inner.stream_unary(method, *args, **kwargs), self._metadatum)

    def stream_stream(self, method, *args, **kwargs):
        def loop_twin() -> Any:
            return _loop_channel(self._address, self._security).stream_stream(
                method, *args, **kwargs
            )

        return _WithToken(
            self._inner.stream_stream(method, *args, **kwargs), self._metadatum, loop_twin
        )

    def subscribe(self, callback, try_to_connect=False):
        self._inner.subscribe(callback, try_to_connect=try_to_connect)

    def unsubscribe(self, callback):
        self._inner.unsubscribe(callback)

    def close(self):
        self._inner.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc_val, exc_tb):
        self._inner.close()
        return False


@functools.cache
def channel(address: str, security: Security) -> grpc.Channel:
    """One shared channel per peer and run for the life of the process.

    The only place channel credentials are chosen: TLS when the run has TLS
    material, plaintext otherwise; the run token rides on every call.
    """
    return _TokenChannel(_raw_channel(grpc, address, security), address, security)


@functools.cache
def _loop_channel(address: str, security: Security) -> Any:
    """``channel``'s twin on the process's event loop (``proto.loop_streams``), one per
    peer; made, cached and used on that loop's thread only."""
    return _raw_channel(grpc.aio, address, security)


def _raw_channel(kind: Any, address: str, security: Security) -> Any:
    """A channel of ``kind`` (``grpc`` or ``grpc.aio``) with the run's credentials."""
    if security.tls is not None:
        options = list(GRPC_OPTIONS)
        if security.tls.server_name:
            options.append(("grpc.ssl_target_name_override", security.tls.server_name))
        return kind.secure_channel(
            address,
            grpc.ssl_channel_credentials(root_certificates=security.tls.ca_pem),
            options=options,
        )
    return kind.insecure_channel(address, options=GRPC_OPTIONS)


class StepConflict(Exception):
    """A request for a step version this component cannot serve (FAILED_PRECONDITION)."""


#: The status of a NaN/Inf update MemoryX refused: a re-run would compute the same values.
NONFINITE_STATUS = grpc.StatusCode.DATA_LOSS


class NonFiniteValues(Exception):
    """NaN/Inf values that must not be applied (NONFINITE_STATUS); retrying cannot help."""


#: What ``rpc_errors`` maps to a status; any other exception is the servicer's bug (UNKNOWN).
MAPPED_ERRORS = (WireError, StepConflict, NonFiniteValues, grpc.RpcError)


def status_for(exc: Exception) -> tuple[grpc.StatusCode, str]:
    """The status that names ``exc`` (a wire, step, NaN/Inf or downstream error)."""
    if isinstance(exc, WireError):
        code, details = grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    elif isinstance(exc, StepConflict):
        code, details = grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    elif isinstance(exc, NonFiniteValues):
        code, details = NONFINITE_STATUS, str(exc)
    else:
        code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
        details = exc.details() if hasattr(exc, "details") else str(exc)
    return code, details


def _abort_for(exc: Exception, context: grpc.ServicerContext) -> None:
    """End the call with the status that names ``exc``."""
    context.abort(*status_for(exc))


def rpc_errors(method: Callable[..., Any]) -> Callable[..., Any]:
    """Map our exceptions to gRPC status codes so servicers stay thin.

    WireError -> INVALID_ARGUMENT, StepConflict -> FAILED_PRECONDITION,
    NonFiniteValues -> NONFINITE_STATUS, and an error from a downstream call
    keeps its code and message.
    """

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except MAPPED_ERRORS as exc:
            _abort_for(exc, context)

    return wrapper


def rpc_stream_errors(method: Callable[..., Any]) -> Callable[..., Any]:
    """``rpc_errors`` for server-streaming methods (generators)."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            yield from method(self, request, context)
        except MAPPED_ERRORS as exc:
            _abort_for(exc, context)

    return wrapper


NODE_IP = "node-ip"


def resolve_host(host: str) -> str:
    """``"node-ip"`` means the address of the Ray node this process runs on."""
    if host != NODE_IP:
        return host
    return ray_node_ip()


@functools.cache
def ray_node_ip() -> str:
    """The address the Ray node of this (actor) process advertises (``ray start
    --node-ip-address``), which ``ray.util.get_node_ip_address`` is not in a worker:
    there it is the machine's routable address, even on a loopback-only cluster."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node["NodeID"] == node_id:
            return node["NodeManagerAddress"]
    return ray.util.get_node_ip_address()
