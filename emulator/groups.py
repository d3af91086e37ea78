"""Heterogeneous clusters: node groups, their batch shares and their emulated clock.

A cluster may declare ``node_groups``: sets of nodes that each have their own
backend and hardware preset (CS-2 beside PCM, CS-2 beside CS-3). The groups
train one model together: every node receives the same weights, trains its
share of the global batch and sends its gradients up the one SwarmX tree.

- **Mixing.** Groups mix only if they store the same parameters (names and
  shapes after ``Backend.prepare_layers``), take weights in the same wire
  dtype and stream the same passes. Otherwise the run is refused, naming the
  groups and the reason, before any actor starts.
- **Shares.** ``balance: equal`` gives every node ``batch / num_nodes``
  samples; ``throughput`` gives each group a share in proportion to its
  emulated speed on the whole batch, so that the groups finish together.
  Shares are integers that tile the global batch; every node scales its loss
  sum by the global number of targets, so the reduced gradient is exact.
- **Clock.** Each group's step comes from its own engine and preset on its
  share; the cluster's step waits for the slowest group, and the others idle.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from core.config import doc
from core.cost.workload import Workload
from core.precision import wire_precision
from emulator.config import ClusterConfig, NodeGroup
from emulator.cost.stats import predict
from emulator.cost.timeline import Event
from emulator.emulated import EmulatedStep, emulate
from proto.serde import WIRE_DTYPES, wider_dtype
from swarmx.tree import TreeNode, node_name


def check_mixable(config: ClusterConfig, layers: list[nn.Module]) -> list[list[nn.Module]]:
    """Each group's layers as its backend trains them; ValueError if the groups cannot mix.

    ``layers`` are the model's streamed layers before any backend re-parameterizes them.
    """
    groups = config.groups
    backends = [group.backend.build() for group in groups]
    prepared = [backend.prepare_layers(layers) for backend in backends]
    if len(groups) == 1:
        return prepared

    def describe(index: int) -> str:
        return f"node_groups[{index}] ({groups[index].label})"

    lead_layout = _layout(prepared[0])
    for index in range(1, len(groups)):
        layout = _layout(prepared[index])
        if layout != lead_layout:
            difference = f"{len(lead_layout)} layers against {len(layout)}"
            for i, (a, b) in enumerate(zip(lead_layout, layout, strict=False)):
                if a != b:
                    difference = f"layer {i} holds {dict(a)} against {dict(b)}"
                    break
            raise ValueError(
                f"{describe(index)} cannot train beside {describe(0)}: their backends store "
                f"different parameters ({difference}), so MemoryX cannot keep one set of weights "
                "for both and SwarmX cannot sum their gradients. A photonic backend training "
                "with backprop or ffm stores MZI phases, not weights; mix only groups that store "
                "the same weights the same way (e.g. cs2 and pcm)."
            )
        if (
            groups[index].backend.wire_dtype != groups[0].backend.wire_dtype
            and config.sparsity is not None
        ):
            raise ValueError(
                f"{describe(index)} takes weights in {groups[index].backend.wire_dtype} but "
                f"{describe(0)} in {groups[0].backend.wire_dtype}; SwarmX rounds dense weights per "
                "node, but sparse streams travel in one dtype. Give the groups the same "
                "precision (node_groups[i].backend.precision) or drop sparsity."
            )
        if (
            groups[index].backend.needs_weights_in_backward
            != groups[0].backend.needs_weights_in_backward
        ):
            raise ValueError(
                f"{describe(index)} and {describe(0)} disagree on whether the backward pass "
                "streams weights (a DFA backend needs none); mix groups that train the same way."
            )
    return prepared


def stream_dtype(config: ClusterConfig) -> str:
    """The dtype MemoryX streams weights in: the groups' own, or fp32 where they differ
    (SwarmX rounds it per node on the way down)."""
    return wider_dtype([group.backend.wire_dtype for group in config.groups])


def _layout(layers: list[nn.Module]) -> list[tuple[tuple[str, tuple[int, ...]], ...]]:
    return [tuple((n, tuple(p.shape)) for n, p in layer.named_parameters()) for layer in layers]


def split_batch(batch_size: int, weights: Sequence[float], minimums: Sequence[int]) -> list[int]:
    """Integer shares of ``batch_size`` in proportion to ``weights``, each at least its minimum.

    Largest remainder: the floor of each ideal share, then the samples left over
    go to the shares furthest below their ideal. The shares sum to ``batch_size``.
    """
    if batch_size < sum(minimums):
        raise ValueError(
            f"batch_size = {batch_size} is smaller than the {sum(minimums)} nodes; every node "
            "needs at least one sample."
        )
    total = sum(weights)
    ideal = [batch_size * w / total for w in weights]
    shares = [max(int(x), m) for x, m in zip(ideal, minimums, strict=True)]
    while sum(shares) < batch_size:
        index = max(range(len(shares)), key=lambda i: ideal[i] - shares[i])
        shares[index] += 1
    while sum(shares) > batch_size:
        index = max(
            (i for i in range(len(shares)) if shares[i] > minimums[i]),
            key=lambda i: shares[i] - ideal[i],
        )
        shares[index] -= 1
    return shares


def group_times(workload: Workload, config: ClusterConfig, shares: Sequence[int]) -> list[float]:
    """Emulated step time of each group alone on its share of the batch, s."""
    return [
        predict(
            dataclasses.replace(workload, samples_per_step=share),
            config.group_hardware(group),
            group.num_nodes,
            engine=group.backend.engine(config.group_hardware(group)),
        ).step_time_s
        for group, share in zip(config.groups, shares, strict=True)
    ]


def group_shares(config: ClusterConfig, workload: Workload | None = None) -> list[int]:
    """Samples of the global batch each group trains, in group order.

    ``equal``: ``batch / num_nodes`` per node. ``throughput``: in proportion to each
    group's speed (samples per second) on the whole batch, from ``workload`` (the
    model's analytic per-step workload).
    """
    groups = config.groups
    if config.balance == "equal" or len(groups) == 1:
        per_node = config.batch_size // config.num_nodes
        return [group.num_nodes * per_node for group in groups]
    if workload is None:
        raise ValueError("balance = 'throughput' needs the model's workload to weigh the groups.")
    whole = [config.batch_size] * len(groups)
    speeds = [config.batch_size / t for t in group_times(workload, config, whole)]
    return split_batch(config.batch_size, speeds, [group.num_nodes for group in groups])


def node_spans(groups: Sequence[NodeGroup.Config], shares: Sequence[int]) -> list[tuple[int, int]]:
    """Each node's span (start, stop) of the global batch, in rank order.

    A group's share is split as evenly as it goes over its nodes (the first ones take
    one sample more); the spans tile the batch.
    """
    spans = []
    start = 0
    for group, share in zip(groups, shares, strict=True):
        base, extra = divmod(share, group.num_nodes)
        for node in range(group.num_nodes):
            size = base + (node < extra)
            spans.append((start, start + size))
            start += size
    return spans


@dataclass(frozen=True)
class GroupStep:
    """One group's part of an emulated step."""

    index: int = doc("position in node_groups")
    group: NodeGroup.Config = doc("the group's config")
    batch_share: int = doc("samples of the global batch the group trains, samples")
    step: EmulatedStep = doc("the group's step alone, on its own engine and preset")

    def energy_j(self, step_time_s: float) -> float:
        """The group's nodes over the cluster's step: busy on their share, idle after it, J."""
        stats, engine = self.step.stats, self.step.engine
        idle_s = step_time_s - stats.step_time_s
        own = stats.energy_by_component_j[engine.component]
        return own + self.group.num_nodes * engine.idle_power_w * idle_s

    def to_json(self, step_time_s: float) -> dict:
        stats = self.step.stats
        return {
            "kind": self.group.backend.kind,
            "hardware": stats.hardware,
            "num_nodes": self.group.num_nodes,
            "batch_share": self.batch_share,
            "node_time_s": stats.step_time_s,
            "idle_s": step_time_s - stats.step_time_s,
            "energy_j": self.energy_j(step_time_s),
            "node": stats.node,
        }


@dataclass(frozen=True)
class GroupedStep:
    """A heterogeneous cluster's emulated step: the slowest group sets the step time."""

    groups: tuple[GroupStep, ...] = doc("each group's step")

    @property
    def slowest(self) -> GroupStep:
        return max(self.groups, key=lambda g: g.step.stats.step_time_s)

    @property
    def step_time_s(self) -> float:
        return self.slowest.step.stats.step_time_s

    def to_json(self, swarmx_power_w: float) -> dict:
        """The ``emulated`` block: the slowest group's figures, the whole cluster's
        step, throughput and energy, and ``groups[]``.

        ``swarmx_power_w``: the cluster's whole SwarmX tree (all groups' nodes), W.
        """
        step_s = self.step_time_s
        slowest = self.slowest.step
        data = slowest.to_json()
        energy = {
            f"group{g.index}.{g.step.engine.component}": g.energy_j(step_s) for g in self.groups
        }
        energy["memoryx"] = slowest.stats.energy_by_component_j["memoryx"]
        energy["swarmx"] = swarmx_power_w * step_s
        samples = sum(g.batch_share for g in self.groups)
        data.update(
            num_nodes=sum(g.group.num_nodes for g in self.groups),
            step_time_s=step_s,
            samples_per_s=samples / step_s,
            tokens_per_s=samples / step_s * slowest.workload.tokens_per_sample,
            energy_j=sum(energy.values()),
            energy_by_component_j=energy,
            slowest_group=self.slowest.index,
            groups=[group.to_json(step_s) for group in self.groups],
        )
        return data

    def events(self) -> tuple[Event, ...]:
        """Every group's nodes in the trace, each under its group's name; MemoryX and
        SwarmX as the slowest group's step saw them (the run streams once)."""
        events: list[Event] = []
        slowest = self.slowest.index
        for group in self.groups:
            label = f"group {group.index} ({group.group.label})"
            for event in group.step.events:
                if event.component.startswith("node"):
                    events.append(
                        dataclasses.replace(event, component=f"{label} {event.component}")
                    )
                elif group.index == slowest:
                    events.append(event)
        return tuple(events)


def emulate_groups(
    workload: Workload,
    config: ClusterConfig,
    shares: Sequence[int],
    *,
    peak_activation_bytes_per_node: Sequence[float],
) -> GroupedStep:
    """Each group's measured step on its own engine and preset (``workload`` is per sample).

    Where the groups take weights in different dtypes, the measured bytes are the nodes'
    average: each group's weights and kept activations are scaled to its own dtype.
    """
    groups = config.groups
    dtypes = [group.backend.wire_dtype for group in groups]
    itemsizes = [WIRE_DTYPES[d].itemsize for d in dtypes]
    mean_itemsize = sum(g.num_nodes * i for g, i in zip(groups, itemsizes, strict=True)) / sum(
        g.num_nodes for g in groups
    )
    stream_itemsize = WIRE_DTYPES[stream_dtype(config)].itemsize
    steps = []
    for index, (group, share) in enumerate(zip(groups, shares, strict=True)):
        hardware = config.group_hardware(group)
        own = dataclasses.replace(workload, samples_per_step=share)
        if len(set(dtypes)) > 1:
            weights = itemsizes[index] / mean_itemsize
            kept = itemsizes[index] / stream_itemsize
            own = dataclasses.replace(
                own,
                precision=wire_precision(dtypes[index]),
                layers=tuple(
                    dataclasses.replace(
                        layer,
                        weight_bytes=layer.weight_bytes * weights,
                        backward_weight_bytes=layer.backward_weight_bytes * weights,
                        activation_bytes=layer.activation_bytes * kept,
                    )
                    for layer in own.layers
                ),
            )
        step = emulate(
            own,
            hardware,
            group.num_nodes,
            peak_activation_bytes_per_node=peak_activation_bytes_per_node[index],
            engine=group.backend.engine(hardware),
        )
        steps.append(GroupStep(index=index, group=group, batch_share=share, step=step))
    return GroupedStep(groups=tuple(steps))


def subtree_dtypes(tree: list[TreeNode], node_dtypes: list[str]) -> dict[str, str]:
    """Weights' dtype into every SwarmX node and compute node, when the nodes differ; else {}.

    A SwarmX node takes the wider dtype of its subtree (fp32 where it mixes) and rounds it
    per child on the way down, so each node gets what MemoryX would have sent it alone.
    """
    if len(set(node_dtypes)) <= 1:
        return {}
    dtypes = {node_name(rank): dtype for rank, dtype in enumerate(node_dtypes)}
    children = {t.name: t.children for t in tree}

    def of(name: str) -> str:
        if name not in dtypes:
            dtypes[name] = wider_dtype([of(c) for c in children[name]])
        return dtypes[name]

    for t in tree:
        of(t.name)
    return dtypes


__all__ = [
    "GroupStep",
    "GroupedStep",
    "check_mixable",
    "emulate_groups",
    "group_shares",
    "group_times",
    "node_spans",
    "split_batch",
    "subtree_dtypes",
]
