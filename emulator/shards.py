"""The driver's view of a MemoryX of K servers as one MemoryX client.

Each server holds a contiguous range of layers, whole or, at the ends of its
range, pieces of a layer split over servers (``memoryx.shard_plan``).
``MemoryXServers`` has the calls of ``proto.clients.MemoryXClient``: per-layer
calls go to the owners, step-wide calls go to every server, and answers are
joined (layouts in layer order, pieces back into tensors; counters and gauges
summed over the servers).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch

from memoryx.shard_plan import Shard, join_pieces
from proto.clients import DEFAULT_DEADLINES, Deadlines, MemoryXClient
from proto.domain import (
    CheckpointInfo,
    LayerAck,
    LayerLayout,
    ModelLayout,
    TensorSpec,
    TrafficStats,
)
from proto.rpc import Security


class MemoryXServers:
    def __init__(
        self,
        addresses: Sequence[str],
        layers: Sequence[range | Shard],
        security: Security,
        deadlines: Deadlines = DEFAULT_DEADLINES,
    ) -> None:
        if len(addresses) != len(layers):
            raise ValueError(f"{len(addresses)} MemoryX addresses for {len(layers)} layer ranges.")
        self.shards = [s if isinstance(s, Shard) else Shard(s) for s in layers]
        self.layers = [s.layers for s in self.shards]
        self.clients = [MemoryXClient(a, security, deadlines) for a in addresses]

    def owners(self, layer: int) -> list[tuple[MemoryXClient, Shard]]:
        """The servers holding (part of) ``layer``, in element order."""
        found = [
            (client, shard)
            for client, shard in zip(self.clients, self.shards, strict=True)
            if layer in shard.layers
        ]
        if not found:
            raise ValueError(f"no MemoryX server holds layer {layer}; they hold {self.layers}.")
        return found

    def owner(self, layer: int) -> MemoryXClient:
        return self.owners(layer)[0][0]

    def load_weights(
        self,
        layers: Sequence[Mapping[str, torch.Tensor]],
        *,
        layer_bytes: Sequence[int] | None = None,
        **kwargs,
    ) -> None:
        """Each server gets its own range of ``layers`` (model indices kept), pieces cut out.

        ``layers[i]`` is read as layer ``i`` streams, in layer order (a layer split over
        servers twice in a row); ``layer_bytes`` (fp32 bytes per layer) sets the deadlines
        without reading ahead.
        """
        for client, shard in zip(self.clients, self.shards, strict=True):
            held = shard.layers
            client.load_weights(
                (shard.take(i, layers[i]) for i in held),
                first_layer=held.start,
                num_bytes=None if layer_bytes is None else sum(layer_bytes[i] for i in held),
                **kwargs,
            )

    def layout(self, *, timeout_s: float | None = None) -> ModelLayout:
        parts = [client.layout(timeout_s=timeout_s) for client in self.clients]
        joined: dict[int, list[LayerLayout]] = {}
        for shard, part in zip(self.shards, parts, strict=True):
            for index, layer in zip(shard.layers, part.layers, strict=True):
                joined.setdefault(index, []).append(layer)
        return ModelLayout(
            layers=tuple(_joined_layout(joined[i]) for i in sorted(joined)), step=parts[0].step
        )

    def fetch_layer(self, layer: int, step: int, spec, **kwargs):
        owners = self.owners(layer)
        if len(owners) == 1:
            return owners[0][0].fetch_layer(layer, step, spec, **kwargs)
        pieces: dict[str, torch.Tensor] = {}
        masks: dict[str, torch.Tensor] = {}
        for client, shard in owners:
            keys = shard.keys(layer)
            held = [(p.key, p.stored_shape) for p in shard.pieces[layer]] if keys else spec
            got, got_masks = client.fetch_layer(layer, step, held, **kwargs)
            pieces.update(got)
            masks.update(got_masks)
        return join_pieces(pieces), join_pieces(masks) if masks else {}

    def commit_step(self, step: int, *, timeout_s: float | None = None) -> TrafficStats:
        """Commit ``step`` on every server; their counters once it is committed, summed."""
        return summed_traffic(
            [client.commit_step(step, timeout_s=timeout_s) for client in self.clients]
        )

    def counters_in(self, acks: Sequence[LayerAck]) -> TrafficStats | None:
        """The servers' counters, summed, at the end of the step these are the answers of:
        each backward answer carries its server's once it took the layer's gradient
        (``LayerAck.memoryx``), so each server's latest is the one after its last. None
        unless every server answered so for a layer it holds whole."""
        latest: list[TrafficStats | None] = [None] * len(self.clients)
        for ack in acks:
            if ack.memoryx is None:
                continue
            owners = self.owners(ack.layer)
            if len(owners) != 1:
                return None  # (a split layer's answer joins its servers')
            server = self.clients.index(owners[0][0])
            seen = latest[server]
            if seen is None or ack.memoryx.num_gradient_streams > seen.num_gradient_streams:
                latest[server] = ack.memoryx
        if any(counters is None for counters in latest):
            return None
        return summed_traffic(latest)

    def save_checkpoint(self, **kwargs) -> list[CheckpointInfo]:
        """Every server saves its layers into the run's checkpoint directory."""
        return [client.save_checkpoint(**kwargs) for client in self.clients]

    def stats(self, *, timeout_s: float | None = None) -> TrafficStats:
        return summed_traffic(self.stats_per_server(timeout_s=timeout_s))

    def stats_per_server(self, *, timeout_s: float | None = None) -> list[TrafficStats]:
        return [client.stats(timeout_s=timeout_s) for client in self.clients]

    def reset_stats(self, *, timeout_s: float | None = None) -> None:
        for client in self.clients:
            client.reset_stats(timeout_s=timeout_s)


def summed_traffic(parts: Sequence[TrafficStats]) -> TrafficStats:
    """The servers' counters as one MemoryX's (each peak summed: every server's own)."""
    return TrafficStats(
        **{
            f.name: sum(getattr(part, f.name) for part in parts)
            for f in dataclasses.fields(TrafficStats)
        }
    )


def _joined_layout(parts: Sequence[LayerLayout]) -> LayerLayout:
    """One layer's layout from its owners' layouts: pieces back into whole tensors."""
    if len(parts) == 1:
        return parts[0]
    specs = {
        spec.name: torch.empty(spec.shape, device="meta") for part in parts for spec in part.tensors
    }
    whole = join_pieces(specs)
    return LayerLayout(
        tensors=tuple(TensorSpec(name, tuple(t.shape)) for name, t in whole.items()),
        num_kept=sum(part.num_kept for part in parts),
    )


__all__ = ["MemoryXServers", "summed_traffic"]
