"""Domain types of the wire: what the rest of the project sees instead of protobuf.

``proto.serde`` turns these into protobuf messages and back; the typed
clients (``proto.clients``) take and return them. Nothing here imports
protobuf, so a module that works on layer streams (the SwarmX reduction, the
coordinator) depends on plain dataclasses only. Field names match the
``.proto`` fields they stand for.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field


class Phase(enum.IntEnum):
    """Which pass a layer stream is for; the values are those of ``tensor.proto``'s ``Phase``."""

    FORWARD = 1  # weights in, activations kept on the nodes
    BACKWARD = 2  # weights in again, gradients out
    EVAL = 3  # forward on the evaluation shard, nothing kept


@dataclass(frozen=True)
class Header:
    """Opens a layer stream: what follows and how big it is in all."""

    layer: int
    step: int
    phase: int
    num_tensors: int = 0
    total_bytes: int = 0  # payload bytes that follow, all tensors together
    sender: str = ""  # who sent it (node rank, SwarmX id), for errors
    dense_gradients: bool = False  # BACKWARD weight streams: send dense gradients this step
    pass_id: int = 0  # nonzero: of this pipelined pass; computed after the layer before it
    #: With ``pass_id``: layer number ``pass_position`` (1-based) of the pass's
    #: ``pass_length`` (SwarmX nodes below the root stream it on the pass's streams).
    pass_position: int = 0
    pass_length: int = 0
    #: BACKWARD on a pass stream: a compute node answers with its gradient in the layer's
    #: answer (``LayerAck.gradient``) if it fits one bundle, not on a ``ReducePass`` stream.
    gradient_in_answer: bool = False


@dataclass(frozen=True)
class SharedSlot:
    """Where a chunk's payload lies in its writer's shared-memory ring (``proto.shm``)."""

    segment: str  # the ring's shared-memory name (a name of this run, never a path)
    slot: int  # entry of the ring whose generation guards the payload
    length: int  # payload bytes in the slot
    generation: int  # the slot's generation when written (even: complete)
    offset: int = 0  # where the payload starts in the ring's data bytes


@dataclass(frozen=True)
class Chunk:
    """One slice of one tensor of a layer: raw little-endian bytes at ``offset``."""

    layer: int
    step: int
    name: str  # parameter name inside the layer, e.g. "0.weight"
    dtype: str  # "float32" | "bfloat16" | "float16"
    shape: tuple[int, ...]  # full tensor shape
    offset: int  # byte offset of ``data`` inside the tensor's payload
    tensor_bytes: int  # payload bytes of the whole tensor (values + index if sparse)
    data: bytes | memoryview
    encoding: str = ""  # "" dense; "bitmap" / "indices" / "masked_values" (proto.sparse)
    index_bytes: int = 0  # bytes of the index at the end of the payload
    #: The encoded message this chunk arrived in (``proto.wire.decode``), so that a relay
    #: forwards it without encoding it again. Not an init field: ``dataclasses.replace``
    #: (a changed chunk) drops it.
    wire: bytes | None = field(default=None, init=False, repr=False, compare=False)
    #: The shared-memory slot ``data`` views (``proto.shm``), which its writer may reuse:
    #: a reader checks it is unchanged after copying ``data`` (``proto.shm.verify``).
    shared: SharedSlot | None = field(default=None, init=False, repr=False, compare=False)


#: One element of a layer stream: a ``Header``, then the ``Chunk`` s of every tensor.
StreamItem = Header | Chunk


@dataclass
class LayerAck:
    """What a subtree did with one layer phase; SwarmX sums these on the way up."""

    layer: int
    step: int
    phase: int
    num_nodes: int = 0  # compute nodes that completed it
    loss_sum: float = 0.0  # sum of per-target losses (last layer only)
    num_targets: int = 0  # targets the loss covers
    num_correct: int = 0  # correct predictions (classifiers, last layer)
    bytes_to_nodes: int = 0  # weight payload bytes delivered to compute nodes
    gradient_bytes: int = 0  # gradient payload bytes sent up by compute nodes
    flops: float = 0.0  # floating-point operations computed by the nodes
    compute_seconds: float = 0.0  # sum over nodes of wall time spent computing, s
    update_applied: bool = False  # BACKWARD: MemoryX applied this layer's update
    #: A compute node's gradient of the layer in its answer (``Header.gradient_in_answer``):
    #: its header and chunks, which the parent sums; () otherwise, and in a total. The node
    #: that sends it holds it as the encoded ``LayerMessage`` (bytes) it goes up as.
    gradient: tuple | bytes = ()
    #: BACKWARD: MemoryX's counters once it took this layer's gradient (SwarmX passes
    #: them on), so that a step's MemoryX figures need no call of their own; None elsewhere.
    memoryx: TrafficStats | None = None

    @classmethod
    def total(cls, acks: Iterable[LayerAck], *, layer: int, step: int, phase: int) -> LayerAck:
        """The sum of the children's answers, in their order (fp sums stay repeatable)."""
        out = cls(layer=layer, step=step, phase=phase, update_applied=True)
        for ack in acks:
            out.num_nodes += ack.num_nodes
            out.loss_sum += ack.loss_sum
            out.num_targets += ack.num_targets
            out.num_correct += ack.num_correct
            out.bytes_to_nodes += ack.bytes_to_nodes
            out.gradient_bytes += ack.gradient_bytes
            out.flops += ack.flops
            out.compute_seconds += ack.compute_seconds
            out.update_applied = out.update_applied and ack.update_applied
            # Every child's comes from the one answer of the sum they took part in.
            out.memoryx = out.memoryx or ack.memoryx
        return out


@dataclass(frozen=True)
class LayerRequest:
    """Run one layer phase through the tree (SwarmX root) or stream one layer (MemoryX)."""

    layer: int
    step: int
    phase: int
    dtype: str  # weight dtype on the wire
    #: A pass whose backend needs no weights (DFA backward): header-only stream.
    without_weights: bool = False
    #: Nonzero: one of up to two layers of this pass in flight at once (LayerHeader.pass_id).
    pass_id: int = 0
    #: Nonzero: this is layer number ``pass_position`` (1-based) of the ``pass_length``
    #: layers of pass ``pass_id``, sent to compute nodes on one stream per pass.
    pass_position: int = 0
    pass_length: int = 0
    #: Nonzero: every step before this one has ended (the driver has its answers), so
    #: MemoryX commits them before serving the layer (no ``CommitStep`` round trip).
    commit_before: int = 0
    #: A later step of a pass of several: the layer's update of the step before may still
    #: be on its way when the root asks for it; MemoryX sends this version once it is in.
    after_update: bool = False


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class LayerLayout:
    tensors: tuple[TensorSpec, ...]
    num_kept: int  # weights no sparsity mask prunes (all of them without sparsity)

    @property
    def spec(self) -> list[tuple[str, tuple[int, ...]]]:
        """``(name, shape)`` pairs in stream order, as ``serde.Expected`` takes them."""
        return [(t.name, t.shape) for t in self.tensors]


@dataclass(frozen=True)
class ModelLayout:
    layers: tuple[LayerLayout, ...]
    step: int  # the next step MemoryX expects to run


@dataclass(frozen=True)
class CheckpointInfo:
    name: str  # file name inside the run's checkpoint directory, chosen by MemoryX
    step: int  # next step to run
    num_bytes: int


@dataclass(frozen=True)
class TrafficStats:
    """MemoryX counters since it started (or since ``ResetStats``)."""

    egress_bytes: int = 0  # weight payload bytes sent
    ingress_bytes: int = 0  # gradient payload bytes received
    num_weight_streams: int = 0
    num_gradient_streams: int = 0
    num_updates: int = 0  # layer updates applied
    num_duplicate_gradients: int = 0  # gradient streams for updates already applied (re-runs)
    update_seconds: float = 0.0  # wall time spent in optimizer updates, s
    # The store (not reset by ResetStats): weights, optimizer state and masks of every layer,
    # tensor bytes held in RAM now and at the peak, and disk tier bytes since the start.
    state_bytes: int = 0
    resident_bytes: int = 0
    peak_resident_bytes: int = 0
    disk_read_bytes: int = 0
    disk_written_bytes: int = 0
    process_peak_rss_bytes: int = 0  # the server process's peak RSS at the last load or commit
    num_skipped_steps: int = 0  # steps skipped for NaN/Inf values (optimizer.nonfinite = skip)


@dataclass(frozen=True)
class LinkStats:
    link: str  # "<from> -> <to>"
    payload_bytes: int = 0
    num_chunks: int = 0


@dataclass(frozen=True)
class SwarmXStats:
    name: str
    down: tuple[LinkStats, ...]  # weight bytes sent to each child
    up: LinkStats  # reduced gradient bytes sent to the parent
    reduced_in_bytes: int = 0  # gradient bytes received from children


@dataclass(frozen=True)
class NodeStats:
    rank: int
    weight_bytes_received: int = 0
    gradient_bytes_sent: int = 0
    activation_bytes_held: int = 0  # activations the node's process holds right now
    peak_activation_bytes: int = 0
    weight_bytes_held: int = 0  # weights kept between layers (0: dropped)
    flops: float = 0.0
    compute_seconds: float = 0.0
    #: The backend's own counters (``Backend.stats()``); dotted names ending in their unit.
    backend_stats: dict[str, float] = field(default_factory=dict)
    #: Activations the modelled node holds (each layer's input kept for its backward and the
    #: one passed on), now and at the peak: what the emulated memory fit counts. The process
    #: may hold more (a kept forward graph saves more than a layer's input) or the same.
    layer_input_bytes_held: int = 0
    peak_layer_input_bytes: int = 0
