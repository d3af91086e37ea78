"""MemoryX as a Ray actor serving gRPC on its host's address."""

from __future__ import annotations

import os

from memoryx.optim import Optimizer
from memoryx.service import MemoryXServicer, register
from memoryx.sparsity import Sparsity
from proto.rpc import Security, resolve_host, start_server


class MemoryXActor:
    def __init__(
        self,
        optimizer: Optimizer.Config,
        *,
        host: str,
        chunk_bytes: int,
        security: Security,
        checkpoint_dir: str | None,
        resume: str | None = None,
        sparsity: Sparsity.Config | None = None,
    ):
        self.servicer = MemoryXServicer(
            optimizer.build(),
            chunk_bytes=chunk_bytes,
            checkpoint_dir=checkpoint_dir,
            resume=resume,
            sparsity=sparsity,
        )
        self.server, self.address = start_server(
            lambda server: register(server, self.servicer), resolve_host(host), security=security
        )

    def get_address(self) -> str:
        return self.address

    def pid(self) -> int:
        """This actor's process id (fault-injection tests signal it)."""
        return os.getpid()

    def stop(self) -> None:
        self.server.stop(grace=None)
