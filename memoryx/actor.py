"""MemoryX as a Ray actor serving gRPC on its host's address."""

from __future__ import annotations

import os
import shutil

from core.allocator import keep_freed_memory
from memoryx.config import MemoryXConfig
from memoryx.optim import Optimizer
from memoryx.service import MemoryXServicer, register
from memoryx.sparsity import Sparsity
from memoryx.tiers import TieredStore
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
        memoryx: MemoryXConfig | None = None,
        server: int = 0,
        layers: range | None = None,
        pieces: dict[int, list[str]] | None = None,
    ):
        if memoryx is None or not memoryx.tiered:
            # Each step's update allocates a new version of the layer (weights and optimizer
            # state) and frees the one before: the same sizes every step. Not with a RAM
            # budget: freed memory kept by the C library would count against it.
            keep_freed_memory()
        self.servicer = MemoryXServicer(
            optimizer.build(),
            chunk_bytes=chunk_bytes,
            checkpoint_dir=checkpoint_dir,
            resume=resume,
            sparsity=sparsity,
            memoryx=memoryx,
            server=server,
            layers=layers,
            pieces=pieces,
        )
        self.server, self.address = start_server(
            lambda server: register(server, self.servicer), resolve_host(host), security=security
        )

    def get_address(self) -> str:
        return self.address

    def pid(self) -> int:
        """This actor's process id (fault-injection tests signal it)."""
        return os.getpid()

    def spill_dir(self) -> str | None:
        """The directory of this server's disk tier (absolute), or None when not tiered."""
        store = self.servicer.store
        return str(store.spill_dir.resolve()) if isinstance(store, TieredStore) else None

    def stop(self) -> None:
        self.server.stop(grace=None)
        store = self.servicer.store
        if isinstance(store, TieredStore):
            # The spill files are this run's working state; a checkpoint holds links of its own.
            store.close()
            shutil.rmtree(store.spill_dir, ignore_errors=True)
