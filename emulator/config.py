"""The cluster/job config of ``wafer train``: a YAML file plus CLI flags.

``load_config`` is the only place raw dictionaries exist; it returns a
validated ``ClusterConfig`` or raises ``ValueError`` naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from core.config import doc, from_dict, load_yaml
from core.cost.hardware import Hardware
from core.data import DataConfig
from core.presets import load_hardware
from emulator.zoo import ModelConfig, default_data_config
from memoryx.config import MemoryXConfig
from memoryx.optim import Optimizer
from memoryx.sparsity import Sparsity
from nodes.backend import Backend
from nodes.cs2 import Cs2Backend
from swarmx.tree import SwarmXTree


@dataclass(kw_only=True)
class TlsConfig:
    """TLS of the gRPC services: on whenever a service binds an address other machines reach."""

    force: bool = doc(
        "use TLS even when every service binds loopback (tests, benchmarks)", default=False
    )
    ca: str | None = doc("PEM file of the CA that signed cert; None: a per-run CA", default=None)
    cert: str | None = doc("PEM certificate every service presents, path", default=None)
    key: str | None = doc("PEM private key of cert, path", default=None)
    server_name: str | None = doc(
        "name clients check in cert instead of each service's host; None: the host",
        default=None,
    )

    def __post_init__(self) -> None:
        given = [name for name in ("ca", "cert", "key") if getattr(self, name) is not None]
        if given and len(given) != 3:
            raise ValueError(
                f"runtime.tls sets {', '.join(given)} but not all of ca, cert and key; "
                "give all three PEM files, or none for a per-run CA."
            )
        for name in given:
            if not Path(getattr(self, name)).is_file():
                raise ValueError(f"runtime.tls.{name} = {getattr(self, name)!r} is not a file.")

    @property
    def user_provided(self) -> bool:
        return self.ca is not None


@dataclass(kw_only=True)
class RuntimeConfig:
    address: str | None = doc(
        "Ray cluster to join (e.g. 'ray://head:10001' or 'auto'); None starts a local Ray instance",
        default=None,
    )
    bind_host: str | None = doc(
        "address gRPC services bind; None: 127.0.0.1 locally, each Ray node's IP on a cluster",
        default=None,
    )
    max_step_retries: int = doc(
        "times a failed step is run again before giving up, count", default=2
    )
    num_threads_per_node: int = doc("torch threads per compute-node process, threads", default=1)
    nodes_per_process: int | Literal["auto"] = doc(
        "emulated compute or SwarmX nodes one actor process hosts, each with its own gRPC "
        "server; 'auto': one each while the machine's memory and cores have room, shared "
        "when not",
        default="auto",
    )
    placement: Literal["pack", "spread"] | None = doc(
        "how Ray places MemoryX and the host processes on the cluster's machines through a "
        "placement group: 'pack' (as few as possible), 'spread' (over all); None: Ray's own",
        default=None,
    )
    verbose: bool = doc(
        "show Ray's warnings in the driver's output (the CLI's --verbose also shows gRPC's "
        "C-core logs); off, only errors",
        default=False,
    )
    run_dir: str | None = doc(
        "directory of the run: token file (0600), CA, addresses, checkpoints; "
        "None: a fresh private temporary directory",
        default=None,
    )
    tls: TlsConfig = doc("TLS of the services", default_factory=TlsConfig)
    insecure: bool = doc(
        "allow services on a non-loopback address without TLS (prints a warning)", default=False
    )
    stream_idle_s: float = doc(
        "a stream waiting this long on its peer is cancelled, seconds", default=60.0
    )
    max_streams_per_service: int = doc(
        "concurrent streams one service serves; more get RESOURCE_EXHAUSTED, count", default=64
    )
    rpc_timeout_s: float = doc(
        "deadline of an RPC that moves no bulk data, and the fixed part of one that does, s",
        default=60.0,
    )
    layer_timeout_s: float = doc(
        "fixed part of the deadline of one layer pass through the tree (the nodes compute), s",
        default=600.0,
    )
    min_bandwidth_bytes_per_s: float = doc(
        "slowest transfer a healthy RPC still makes: a call gets 1/this seconds per byte it "
        "moves on top of its fixed part, bytes/s",
        default=float(1 << 20),
    )
    health_timeout_s: float = doc(
        "a component that does not answer its gRPC health check within this is dead or hung, s",
        default=3.0,
    )
    health_interval_s: float = doc(
        "while a layer pass is under way, check every component's health this often, s",
        default=1.0,
    )
    max_restarts: int = doc(
        "components (compute node, SwarmX node, MemoryX) replaced before the run gives up, count",
        default=10,
    )
    spare_actor: bool = doc(
        "keep one warm spare process that a replacement starts in (seconds faster than a "
        "new process; costs one idle process)",
        default=True,
    )
    on_node_loss: Literal["replace", "shrink"] = doc(
        "a lost compute node is 'replace'd (same rank, shard and state: bit-identical), or the "
        "survivors 'shrink' the cluster and split the same global batch among them (changes the "
        "numerics; a batch that does not divide across the survivors falls back to replace)",
        default="replace",
    )
    steps_per_pass: int | Literal["auto"] = doc(
        "training steps the driver sends as one pass: the next step's first layers stream "
        "as soon as MemoryX has applied this step's updates to them, with no round trip "
        "through the driver between the steps; a pass that fails keeps the steps it "
        "completed and runs the rest again, and MemoryX keeps a snapshot of each step until "
        "the next pass. 'auto': on one compute node up to 4 while those extra snapshots stay "
        "under 128 MiB, else 1 (measured: it pays where a step is a chain, not bound by CPU). One "
        "per pass with a disk tier, layers split over servers or nodes that keep state; an "
        "evaluation or a checkpoint ends a pass, and a stop signal waits for its end, count",
        default="auto",
    )
    shared_memory: Literal["auto", "off"] = doc(
        "move chunk payloads between co-located components through shared memory instead of "
        "gRPC bytes (still counted as fabric traffic); 'auto': when every component runs on "
        "one machine (a local Ray, or a Ray cluster of one node), 'off': always gRPC bytes",
        default="auto",
    )

    def __post_init__(self) -> None:
        if self.insecure and (self.tls.force or self.tls.user_provided):
            raise ValueError(
                "runtime.insecure = true turns TLS off, but runtime.tls asks for it; set one."
            )
        if self.stream_idle_s <= 0:
            raise ValueError(f"runtime.stream_idle_s = {self.stream_idle_s} must be positive.")
        if self.max_streams_per_service < 8:
            raise ValueError(
                f"runtime.max_streams_per_service = {self.max_streams_per_service} must be at "
                "least 8 (a SwarmX node takes a stream per child at once)."
            )
        if self.steps_per_pass != "auto" and (
            isinstance(self.steps_per_pass, bool) or not 1 <= self.steps_per_pass <= 64
        ):
            raise ValueError(
                f"runtime.steps_per_pass = {self.steps_per_pass!r} must be 'auto' or 1..64 steps."
            )
        if self.max_step_retries < 0:
            raise ValueError(f"max_step_retries = {self.max_step_retries} must be 0 or more.")
        if self.nodes_per_process != "auto" and (
            isinstance(self.nodes_per_process, bool) or self.nodes_per_process < 1
        ):
            raise ValueError(
                f"nodes_per_process = {self.nodes_per_process!r} must be 'auto' or at least 1."
            )
        if self.num_threads_per_node < 1:
            raise ValueError(
                f"num_threads_per_node = {self.num_threads_per_node} must be at least 1."
            )
        for name in (
            "rpc_timeout_s",
            "layer_timeout_s",
            "min_bandwidth_bytes_per_s",
            "health_timeout_s",
            "health_interval_s",
        ):
            value = getattr(self, name)
            if not value > 0 or value == float("inf"):
                raise ValueError(f"runtime.{name} = {value} must be a positive finite number.")
        if self.max_restarts < 0:
            raise ValueError(f"runtime.max_restarts = {self.max_restarts} must be 0 or more.")

    @property
    def host(self) -> str:
        if self.bind_host is not None:
            return self.bind_host
        return "127.0.0.1" if self.address is None else "node-ip"


@dataclass(kw_only=True)
class CheckpointConfig:
    """Periodic MemoryX checkpoints: what a dead MemoryX or driver restarts from."""

    every_steps: int = doc(
        "write a checkpoint after every this many steps (0: never), steps", default=0
    )
    dir: str | None = doc(
        "directory of the run's periodic checkpoints (created if missing), path", default=None
    )
    keep: int = doc("newest checkpoints kept in dir; older ones are deleted, count", default=2)

    def __post_init__(self) -> None:
        if self.every_steps < 0:
            raise ValueError(f"checkpoint.every_steps = {self.every_steps} must be 0 or more.")
        if self.keep < 1:
            raise ValueError(f"checkpoint.keep = {self.keep} must be at least 1.")
        if self.every_steps and self.dir is None:
            raise ValueError(
                f"checkpoint.every_steps = {self.every_steps} needs checkpoint.dir, the directory "
                "to write the checkpoints to."
            )


#: Preset field that the functional SwarmX tree sets (``swarmx.fanout``), so it is not overridden.
_TREE_FAN_OUT = "swarmx.fan_out"


@dataclass(kw_only=True)
class HardwareConfig:
    """The emulated hardware a functional run reports on (``wafer simulate``'s presets)."""

    preset: str = doc(
        "hardware preset: a bundled name (cs2, cs3) or the path of a preset YAML file",
        default="cs2",
    )
    overrides: dict[str, int | float | str | list[float]] = doc(
        "preset fields to change, by dotted name, e.g. {wafer.compute_efficiency: 0.4}",
        default_factory=dict,
    )

    def __post_init__(self) -> None:
        try:
            load_hardware(self.preset)
        except ValueError as exc:
            raise ValueError(f"preset = {self.preset!r} is not valid: {exc}") from None
        if _TREE_FAN_OUT in self.overrides:
            raise ValueError(
                f"overrides sets {_TREE_FAN_OUT!r}, but the emulated SwarmX tree is the one "
                "that ran; set swarmx.fanout instead."
            )
        try:
            self.build()
        except ValueError as exc:
            raise ValueError(f"overrides of preset {self.preset!r} are not valid: {exc}") from None

    def build(self, fan_out: int | None = None) -> Hardware.Config:
        """The preset with the overrides applied (and the tree's fan-out, if given)."""
        overrides = dict(self.overrides)
        if fan_out is not None:
            overrides[_TREE_FAN_OUT] = fan_out
        return load_hardware(self.preset, overrides)


class NodeGroup:
    """A set of identical compute nodes inside a (possibly heterogeneous) cluster."""

    @dataclass(kw_only=True)
    class Config:
        num_nodes: int = doc("compute nodes of this group, nodes")
        backend: Backend.Config = doc(
            "backend of this group's nodes", default_factory=Cs2Backend.Config
        )
        hardware: HardwareConfig | None = doc(
            "hardware preset of this group's nodes; None: the cluster's hardware", default=None
        )

        def __post_init__(self) -> None:
            if self.num_nodes < 1:
                raise ValueError(
                    f"num_nodes = {self.num_nodes} is not valid; a group needs at least 1 node."
                )

        @property
        def label(self) -> str:
            """``kind`` or ``kind@preset`` (the CLI shorthand's spelling of this group)."""
            if self.hardware is None:
                return self.backend.kind
            return f"{self.backend.kind}@{self.hardware.preset}"


def parse_node_groups(text: str) -> list[dict[str, Any]]:
    """``--node-groups cs2:2,pcm:2`` (or ``cs2@cs3:2``: kind, hardware preset) as raw groups."""
    groups = []
    for part in text.split(","):
        kind_preset, _, count = part.strip().rpartition(":")
        kind, _, preset = kind_preset.partition("@")
        if not kind or not count.isdigit():
            raise ValueError(
                f"--node-groups {text!r}: {part.strip()!r} is not KIND[@PRESET]:N; "
                "write e.g. cs2:2,pcm:2 or cs2:2,cs2@cs3:2."
            )
        group: dict[str, Any] = {"num_nodes": int(count), "backend": {"kind": kind}}
        if preset:
            group["hardware"] = {"preset": preset}
        groups.append(group)
    return groups


@dataclass(kw_only=True)
class ClusterConfig:
    model: ModelConfig = doc(
        "model to train: a zoo name or 'module:factory'", default_factory=ModelConfig
    )
    data: DataConfig | None = doc(
        "data set: a shipped name or the user's own (data.path); None: the model's default",
        default=None,
    )
    num_nodes: int | None = doc(
        "compute nodes (data parallel), nodes; None: 4, or the sum over node_groups",
        default=None,
    )
    node_groups: list[NodeGroup.Config] | None = doc(
        "heterogeneous cluster: groups of nodes, each with its own backend and hardware, "
        "e.g. [{num_nodes: 2, backend: {kind: cs2}}, {num_nodes: 2, backend: {kind: pcm}}]; "
        "None: num_nodes nodes of backend",
        default=None,
    )
    balance: Literal["equal", "throughput"] = doc(
        "batch shares of the nodes: equal, or in proportion to each group's emulated speed",
        default="equal",
    )
    batch_size: int = doc("global batch, samples per step across all nodes", default=128)
    num_steps: int = doc("training steps, steps", default=300)
    seed: int = doc("seed of model init and batch order", default=0)
    optimizer: Optimizer.Config = doc(
        "optimizer MemoryX applies", default_factory=lambda: Optimizer.Config(name="adamw", lr=2e-3)
    )
    backend: Backend.Config | None = doc(
        "compute-node backend; None: cs2, or with node_groups the first group's backend",
        default=None,
    )
    swarmx: SwarmXTree.Config = doc("broadcast/reduce tree", default_factory=SwarmXTree.Config)
    memoryx: MemoryXConfig = doc(
        "MemoryX servers and where they keep the state, e.g. {num_servers: 2} or "
        "{ram_budget_bytes: 4000000000, spill_dir: /scratch/memoryx}",
        default_factory=MemoryXConfig,
    )
    runtime: RuntimeConfig = doc("where and how the actors run", default_factory=RuntimeConfig)
    checkpoint: CheckpointConfig = doc(
        "periodic MemoryX checkpoints, e.g. {every_steps: 50, dir: ckpt, keep: 2}",
        default_factory=CheckpointConfig,
    )
    sparsity: Sparsity.Config | None = doc(
        "weight sparsity MemoryX keeps and streams, e.g. {algorithm: set, sparsity: 0.9, "
        "update: {freq: 10, start: 0, stop: 200}}; None: dense",
        default=None,
    )
    hardware: HardwareConfig = doc(
        "emulated hardware whose step time, energy and memory fit the run reports",
        default_factory=HardwareConfig,
    )
    eval_every: int = doc("evaluate every this many steps (0: only at the end), steps", default=0)
    max_eval_samples: int | None = doc(
        "cap on evaluation samples (None: whole test set), samples", default=None
    )
    save_checkpoint: str | None = doc(
        "write a MemoryX checkpoint here at the end, path", default=None
    )
    resume: str | None = doc(
        "start from this MemoryX checkpoint file, or continue the run whose periodic checkpoints "
        "are in this directory ('auto': checkpoint.dir), path",
        default=None,
    )

    def __post_init__(self) -> None:
        self._resolve_groups()
        if self.num_nodes < 1:
            raise ValueError(
                f"num_nodes = {self.num_nodes} is not valid; a cluster needs at least 1 compute node."
            )
        if self.batch_size < 1:
            raise ValueError(
                f"batch_size = {self.batch_size} is not valid; use a positive number of samples."
            )
        if self.batch_size < self.num_nodes:
            raise ValueError(
                f"batch_size = {self.batch_size} is smaller than num_nodes = {self.num_nodes}; "
                "every node needs at least one sample."
            )
        if self.balance == "equal" and self.batch_size % self.num_nodes:
            lower = self.batch_size - self.batch_size % self.num_nodes
            upper = lower + self.num_nodes
            raise ValueError(
                f"batch_size = {self.batch_size} does not divide across num_nodes = {self.num_nodes}; "
                f"every node takes an equal shard, so use a multiple of {self.num_nodes} "
                f"(e.g. {lower or upper} or {upper})."
            )
        if self.num_steps < 1:
            raise ValueError(f"num_steps = {self.num_steps} is not valid; train at least 1 step.")
        if self.eval_every < 0:
            raise ValueError(
                f"eval_every = {self.eval_every} must be 0 (only at the end) or positive."
            )
        if self.max_eval_samples is not None and self.max_eval_samples < self.num_nodes:
            raise ValueError(
                f"max_eval_samples = {self.max_eval_samples} must be at least num_nodes = {self.num_nodes}."
            )
        for group in self.groups:
            group.backend.check_sparsity(self.sparsity)
        if self.memoryx.spill_dir is not None and self.optimizer.nonfinite == "skip":
            raise ValueError(
                "optimizer.nonfinite = 'skip' is not supported with a MemoryX disk tier "
                "(memoryx.spill_dir is set): its versions are files that a skipped step would "
                "have to duplicate. Use optimizer.nonfinite: error, or drop memoryx.spill_dir."
            )
        if self.memoryx.num_servers > 1 and self.optimizer.nonfinite == "skip":
            raise ValueError(
                f"optimizer.nonfinite = 'skip' is not supported with memoryx.num_servers = "
                f"{self.memoryx.num_servers}: a server that meets a non-finite update skips the "
                "step in its own layers only, while the others apply it. Use "
                "optimizer.nonfinite: error, or memoryx.num_servers: 1."
            )

    def _resolve_groups(self) -> None:
        """Fill num_nodes and backend from node_groups (or their defaults), checking both agree."""
        if not self.node_groups:
            if self.node_groups is not None:
                raise ValueError("node_groups = [] is not valid; list at least one group.")
            if self.num_nodes is None:
                self.num_nodes = 4
            if self.backend is None:
                self.backend = Cs2Backend.Config()
            return
        total = sum(group.num_nodes for group in self.node_groups)
        if self.num_nodes is not None and self.num_nodes != total:
            raise ValueError(
                f"num_nodes = {self.num_nodes} but node_groups add up to {total} nodes; "
                "leave num_nodes unset (or --nodes off) when the cluster declares node_groups."
            )
        lead = self.node_groups[0].backend
        if self.backend is not None and self.backend != lead:
            raise ValueError(
                f"backend (kind {self.backend.kind!r}) is set beside node_groups; set each "
                "group's own backend instead (node_groups[0].backend, node_groups[1].backend, ...)."
            )
        self.num_nodes = total
        self.backend = lead

    @property
    def groups(self) -> list[NodeGroup.Config]:
        """The node groups in rank order; a homogeneous cluster is one group."""
        if self.node_groups:
            return list(self.node_groups)
        return [NodeGroup.Config(num_nodes=self.num_nodes, backend=self.backend)]

    @property
    def heterogeneous(self) -> bool:
        return bool(self.node_groups) and len(self.node_groups) > 1

    def group_hardware(self, group: NodeGroup.Config) -> Hardware.Config:
        """A group's preset (the cluster's if it sets none), with the run's SwarmX fan-out."""
        hardware = group.hardware if group.hardware is not None else self.hardware
        return hardware.build(fan_out=self.swarmx.fanout)

    @property
    def data_config(self) -> DataConfig:
        return self.data if self.data is not None else default_data_config(self.model)

    @property
    def emulated_hardware(self) -> Hardware.Config:
        """The hardware preset, its SwarmX fan-out set to the tree the run uses."""
        return self.hardware.build(fan_out=self.swarmx.fanout)


# CLI flag -> dotted config field.
CLI_FIELDS = {
    "model": "model.name",
    "nodes": "num_nodes",
    "node_groups": "node_groups",
    "seq_len": "data.seq_len",
    "steps": "num_steps",
    "batch_size": "batch_size",
    "optimizer": "optimizer.name",
    "lr": "optimizer.lr",
    "precision": "backend.precision",
    "backend": "backend.kind",
    "training": "backend.training",
    "address": "runtime.address",
    "verbose": "runtime.verbose",
    "hardware": "hardware.preset",
    "sparsity": "sparsity.sparsity",
    "sparsity_algorithm": "sparsity.algorithm",
    "seed": "seed",
    "balance": "balance",
    "save_checkpoint": "save_checkpoint",
    "resume": "resume",
}


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = tree.get(key)
        if node is None:
            node = tree[key] = {}
        elif not isinstance(node, dict):
            raise ValueError(f"config key {key!r} must be a mapping to set {dotted!r}.")
        tree = node
    if leaf == "kind" and tree.get("kind") not in (None, value):
        # Switching backend kind drops the other backend's settings.
        tree.clear()
    tree[leaf] = value


def load_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> ClusterConfig:
    """Read YAML at ``path`` (if any), apply ``overrides`` (dotted keys), validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        loaded = load_yaml(path)
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(
                f"config file {str(path)!r} must hold a mapping of config keys at the top level."
            )
        raw = loaded or {}
    for dotted, value in (overrides or {}).items():
        if dotted == "node_groups" and isinstance(value, str):
            value = parse_node_groups(value)
        _set_dotted(raw, dotted, value)
    return from_dict(ClusterConfig, raw)


__all__ = [
    "CLI_FIELDS",
    "CheckpointConfig",
    "ClusterConfig",
    "NodeGroup",
    "parse_node_groups",
    "HardwareConfig",
    "RuntimeConfig",
    "field",
    "load_config",
]
