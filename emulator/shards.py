"""The driver's view of a MemoryX of K servers as one MemoryX client.

Each server holds a contiguous range of layers. ``MemoryXServers`` has the
calls of ``proto.clients.MemoryXClient``: per-layer calls go to the owner,
step-wide calls go to every server, and answers are joined (layouts in layer
order; counters and gauges summed over the servers).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch

from proto.clients import DEFAULT_DEADLINES, Deadlines, MemoryXClient
from proto.domain import CheckpointInfo, ModelLayout, TrafficStats
from proto.rpc import Security


class MemoryXServers:
    def __init__(
        self,
        addresses: Sequence[str],
        layers: Sequence[range],
        security: Security,
        deadlines: Deadlines = DEFAULT_DEADLINES,
    ) -> None:
        if len(addresses) != len(layers):
            raise ValueError(f"{len(addresses)} MemoryX addresses for {len(layers)} layer ranges.")
        self.layers = list(layers)
        self.clients = [MemoryXClient(a, security, deadlines) for a in addresses]

    def owner(self, layer: int) -> MemoryXClient:
        for client, held in zip(self.clients, self.layers, strict=True):
            if layer in held:
                return client
        raise ValueError(f"no MemoryX server holds layer {layer}; they hold {self.layers}.")

    def load_weights(self, layers: Sequence[Mapping[str, torch.Tensor]], **kwargs) -> None:
        """Each server gets its own range of ``layers`` (model indices kept)."""
        for client, held in zip(self.clients, self.layers, strict=True):
            client.load_weights(layers[held.start : held.stop], first_layer=held.start, **kwargs)

    def layout(self, *, timeout_s: float | None = None) -> ModelLayout:
        parts = [client.layout(timeout_s=timeout_s) for client in self.clients]
        return ModelLayout(
            layers=tuple(layer for part in parts for layer in part.layers), step=parts[0].step
        )

    def fetch_layer(self, layer: int, step: int, spec, **kwargs):
        return self.owner(layer).fetch_layer(layer, step, spec, **kwargs)

    def commit_step(self, step: int, *, timeout_s: float | None = None) -> None:
        for client in self.clients:
            client.commit_step(step, timeout_s=timeout_s)

    def save_checkpoint(self, **kwargs) -> list[CheckpointInfo]:
        """Every server saves its layers into the run's checkpoint directory."""
        return [client.save_checkpoint(**kwargs) for client in self.clients]

    def stats(self, *, timeout_s: float | None = None) -> TrafficStats:
        parts = [client.stats(timeout_s=timeout_s) for client in self.clients]
        return TrafficStats(
            **{
                f.name: sum(getattr(part, f.name) for part in parts)
                for f in dataclasses.fields(TrafficStats)
            }
        )

    def reset_stats(self, *, timeout_s: float | None = None) -> None:
        for client in self.clients:
            client.reset_stats(timeout_s=timeout_s)


__all__ = ["MemoryXServers"]
