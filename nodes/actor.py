"""A compute node as a Ray actor serving gRPC on its host's address."""

from __future__ import annotations

import os

import torch
from torch import nn

from core.allocator import keep_freed_memory
from core.data import DataConfig, Dataset
from nodes.backend import Backend
from nodes.service import ComputeNodeServicer, serve
from nodes.worker import NodeWorker
from proto.rpc import Security, resolve_host


class NodeActor:
    def __init__(
        self,
        *,
        rank: int,
        num_nodes: int,
        layers: list[nn.Module],
        data: DataConfig | Dataset,
        batch_size: int,
        seed: int,
        backend: Backend.Config,
        max_eval_samples: int | None,
        chunk_bytes: int,
        host: str,
        num_threads: int,
        security: Security,
        share: tuple[int, int] | None = None,
        pass_state: object | None = None,
    ):
        """``pass_state``: the backend state of the node this one replaces (``pass_state()``)."""
        # A shipped data set is rebuilt here; a user's data arrives loaded (never as a path).
        dataset = data if isinstance(data, Dataset) else data.build(seed=seed)
        # Several nodes share a host's cores; one thread each keeps them from thrashing.
        torch.set_num_threads(num_threads)
        # Each layer's weights, activations and gradients are allocated afresh every step.
        keep_freed_memory()
        worker = NodeWorker(
            rank=rank,
            num_nodes=num_nodes,
            layers=layers,
            dataset=dataset,
            batch_size=batch_size,
            seed=seed,
            backend=backend.build(),
            max_eval_samples=max_eval_samples,
            share=share,
        )
        if pass_state is not None:
            worker.backend.adopt_pass_state(pass_state)
        self.servicer = ComputeNodeServicer(
            worker, name=f"node-{rank}", security=security, chunk_bytes=chunk_bytes
        )
        self.server, self.address = serve(self.servicer, resolve_host(host), security=security)

    def get_address(self) -> str:
        return self.address

    def pid(self) -> int:
        """This actor's process id (fault-injection tests signal it)."""
        return os.getpid()

    def pass_state(self) -> object | None:
        """The backend's state between passes, for a replacement (``Backend.pass_state``)."""
        return self.servicer.worker.backend.pass_state()

    def adopt_pass_state(self, state: object | None) -> None:
        """Continue from a kept ``pass_state()`` (MemoryX came back at an earlier step)."""
        self.servicer.worker.backend.adopt_pass_state(state)

    def reshard(self, rank: int, num_nodes: int) -> None:
        """Take shard ``rank`` of ``num_nodes`` (the cluster shrank after losing a node)."""
        self.servicer.worker.reshard(rank, num_nodes)

    def connect(self, parent: str) -> None:
        self.servicer.connect(parent)

    def stop(self) -> None:
        self.server.stop(grace=None)
