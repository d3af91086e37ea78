"""MemoryX as a Ray actor serving gRPC on its host's address."""

from __future__ import annotations

from memoryx.optim import Optimizer
from memoryx.service import MemoryXServicer, register
from memoryx.sparsity import Sparsity
from proto.rpc import resolve_host, start_server


class MemoryXActor:
    def __init__(
        self,
        optimizer: Optimizer.Config,
        *,
        host: str,
        chunk_bytes: int,
        checkpoint: str | None,
        sparsity: Sparsity.Config | None = None,
    ):
        self.servicer = MemoryXServicer(
            optimizer.build(), chunk_bytes=chunk_bytes, checkpoint=checkpoint, sparsity=sparsity
        )
        self.server, self.address = start_server(
            lambda server: register(server, self.servicer), resolve_host(host)
        )

    def get_address(self) -> str:
        return self.address

    def stop(self) -> None:
        self.server.stop(grace=None)
