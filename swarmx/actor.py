"""A SwarmX tree node as a Ray actor serving gRPC on its host's address."""

from __future__ import annotations

import os

from proto.rpc import Security, resolve_host
from swarmx.service import SwarmXServicer, serve


class SwarmXActor:
    def __init__(self, name: str, *, host: str, security: Security):
        self.servicer = SwarmXServicer(name, security=security)
        self.server, self.address = serve(self.servicer, resolve_host(host), security=security)

    def get_address(self) -> str:
        return self.address

    def pid(self) -> int:
        """This actor's process id (fault-injection tests signal it)."""
        return os.getpid()

    def connect(
        self,
        *,
        children: dict[str, str],
        parent: str | None,
        memoryx: str | dict[int, str] | None,
        child_dtypes: dict[str, str] | None = None,
        dtype: str | None = None,
        memoryx_split: dict[int, list[tuple[str, list[tuple]]]] | None = None,
    ) -> None:
        self.servicer.connect(
            children=children,
            parent=parent,
            memoryx=memoryx,
            child_dtypes=child_dtypes,
            dtype=dtype,
            memoryx_split=memoryx_split,
        )

    def stop(self) -> None:
        self.servicer.stream_pool.clear()  # the streams kept for the next pass
        self.server.stop(grace=None)
