"""The serde boundary for everything that is not a layer stream.

Requests, answers and counters: each ``proto.domain`` dataclass to the
protobuf message that carries it (``*_to_wire``) and back (``*_from_wire``).
Layer streams themselves are in ``proto.serde``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import asdict, fields

from proto import memoryx_pb2 as mpb
from proto import node_pb2 as npb
from proto import swarmx_pb2 as spb
from proto import tensor_pb2 as pb
from proto.domain import (
    CheckpointInfo,
    Header,
    LayerAck,
    LayerLayout,
    LayerRequest,
    LinkStats,
    ModelLayout,
    NodeStats,
    SwarmXStats,
    TensorSpec,
    TrafficStats,
)
from proto.frames import Bundle, WireError, expand, payload_bytes
from proto.wire import encode

EMPTY = pb.Empty()


@functools.cache
def _names(cls) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls))


def _fields(message, cls) -> dict:
    return {name: getattr(message, name) for name in _names(cls)}


def _flat(item) -> dict:
    """``asdict`` of a dataclass of scalars, without its deep copies (a call per layer pass)."""
    return _fields(item, type(item))


# -- acks ---------------------------------------------------------------------


#: The fields of an answer other than the gradient it may carry (a layer stream's items).
_ACK_SCALARS = tuple(name for name in _names(LayerAck) if name not in ("gradient", "memoryx"))


def ack_to_wire(ack: LayerAck) -> pb.LayerAck:
    message = pb.LayerAck(**{name: getattr(ack, name) for name in _ACK_SCALARS})
    if ack.memoryx is not None:
        message.memoryx.CopyFrom(traffic_to_wire(ack.memoryx))
    if isinstance(ack.gradient, bytes):  # (its sender's: encoded once, as it goes)
        message.gradient.MergeFromString(ack.gradient)
    elif ack.gradient:
        # As a layer stream sends it: a chunk read from the wire as the bytes it came in,
        # one in shared memory as its slot's reference.
        message.gradient.MergeFromString(encode(Bundle(tuple(ack.gradient))))
    return message


def ack_from_wire(message: pb.LayerAck) -> LayerAck:
    """The answer ``message`` carries; WireError if the gradient in it is not one layer's
    header and chunks."""
    ack = LayerAck(**{name: getattr(message, name) for name in _ACK_SCALARS})
    if message.HasField("memoryx"):
        ack.memoryx = traffic_from_wire(message.memoryx)
    if message.HasField("gradient"):
        ack.gradient = expand(message.gradient)
        if any(isinstance(item, Header) for item in ack.gradient[1:]):
            raise WireError("an answer's gradient is one layer's header and chunks, not several")
    return ack


def memoryx_counters(message: pb.LayerAck) -> TrafficStats | None:
    """The MemoryX counters an answer on the wire carries (``LayerAck.memoryx``), if any."""
    return traffic_from_wire(message.memoryx) if message.HasField("memoryx") else None


def acks_to_wire(acks: Sequence[LayerAck]) -> pb.LayerAck:
    """Answers to consecutive layers of a pass in one message (``LayerAck.following``):
    the first, and the others after it."""
    message = ack_to_wire(acks[0])
    message.following.extend(ack_to_wire(ack) for ack in acks[1:])
    return message


def acks_in_messages(acks: Sequence[LayerAck], max_gradient_bytes: int) -> list[pb.LayerAck]:
    """Consecutive answers as few messages (``acks_to_wire``) as keep the gradients they
    carry (``LayerAck.gradient``) within ``max_gradient_bytes`` each (one answer with a
    larger one goes alone). An answer's ``gradient_bytes`` is a count, not a payload: a
    parent's sums carry none, and go in one message however much they count."""
    messages: list[pb.LayerAck] = []
    group: list[LayerAck] = []
    size = 0
    for ack in acks:
        gradient = ack.gradient
        carried = len(gradient) if isinstance(gradient, bytes) else payload_bytes(gradient)
        if group and size + carried > max_gradient_bytes:
            messages.append(acks_to_wire(group))
            group, size = [], 0
        group.append(ack)
        size += carried
    if group:
        messages.append(acks_to_wire(group))
    return messages


def acks_from_wire(message: pb.LayerAck) -> list[LayerAck]:
    """Every answer ``message`` carries, in pass order (``acks_to_wire``); WireError if a
    following answer has answers of its own, or any gradient is not one layer's."""
    # (``ack_from_wire`` reads no ``following``: the first needs no copy without them.)
    return [ack_from_wire(message), *map(ack_from_wire, _following(message, "answer"))]


# -- requests -----------------------------------------------------------------


def layer_request_to_wire(request: LayerRequest) -> spb.LayerRequest:
    return spb.LayerRequest(**_flat(request))


def layer_request_from_wire(message: spb.LayerRequest) -> LayerRequest:
    return LayerRequest(**_fields(message, LayerRequest))


def requests_to_wire(requests: Sequence[LayerRequest]) -> spb.LayerRequest:
    """Consecutive requests of a pass in one message (``LayerRequest.following``)."""
    message = layer_request_to_wire(requests[0])
    message.following.extend(map(layer_request_to_wire, requests[1:]))
    return message


def weights_requests_to_wire(requests: Sequence[LayerRequest]) -> mpb.WeightsRequest:
    """Consecutive layers of a pass asked of MemoryX in one message (``following``)."""
    message = weights_request_to_wire(requests[0])
    message.following.extend(map(weights_request_to_wire, requests[1:]))
    return message


def unfolded(message, what: str = "request") -> list:
    """The requests (or answers) one message carries (``requests_to_wire``,
    ``weights_requests_to_wire``, ``acks_to_wire``), each as if it came alone: the first
    without the ones that follow it (a copy), then those; WireError if one of those
    carries ``what``s of its own."""
    following = _following(message, what)
    if not following:
        return [message]
    # (An answer may be passed on as it is: a SwarmX node answers a child's layer with the
    # answer MemoryX gave it, which must not bring the other layers' answers along.)
    first = type(message)()
    first.CopyFrom(message)
    del first.following[:]
    return [first, *following]


def _following(message, what: str):
    """The requests (answers) sent after ``message`` in it; WireError if one of them
    carries ``what``s of its own."""
    following = message.following
    if any(len(part.following) for part in following):
        raise WireError(f"a {what} that follows another carries no {what}s of its own")
    return following


def weights_request_to_wire(request: LayerRequest) -> mpb.WeightsRequest:
    """MemoryX's StreamWeights takes a ``LayerRequest`` without ``without_weights``."""
    if request.without_weights:
        raise ValueError("a weights request cannot be without weights; do not ask MemoryX")
    return mpb.WeightsRequest(
        layer=request.layer,
        step=request.step,
        phase=request.phase,
        dtype=request.dtype,
        commit_before=request.commit_before,
        after_update=request.after_update,
    )


def weights_request_from_wire(message: mpb.WeightsRequest) -> LayerRequest:
    return LayerRequest(
        layer=message.layer,
        step=message.step,
        phase=message.phase,
        dtype=message.dtype,
        commit_before=message.commit_before,
        after_update=message.after_update,
    )


def step_request_to_wire(step: int) -> mpb.StepRequest:
    return mpb.StepRequest(step=step)


def checkpoint_request_to_wire() -> mpb.CheckpointRequest:
    """No path travels: MemoryX chooses the name inside its run's checkpoint directory."""
    return mpb.CheckpointRequest()


# -- MemoryX answers ----------------------------------------------------------


def checkpoint_to_wire(info: CheckpointInfo) -> mpb.CheckpointReply:
    return mpb.CheckpointReply(**asdict(info))


def checkpoint_from_wire(message: mpb.CheckpointReply) -> CheckpointInfo:
    return CheckpointInfo(**_fields(message, CheckpointInfo))


def layout_to_wire(layout: ModelLayout) -> mpb.LayoutReply:
    return mpb.LayoutReply(
        layers=[
            mpb.LayerLayout(
                tensors=[mpb.TensorSpec(name=t.name, shape=list(t.shape)) for t in layer.tensors],
                num_kept=layer.num_kept,
            )
            for layer in layout.layers
        ],
        step=layout.step,
    )


def layout_from_wire(message: mpb.LayoutReply) -> ModelLayout:
    return ModelLayout(
        layers=tuple(
            LayerLayout(
                tensors=tuple(TensorSpec(t.name, tuple(t.shape)) for t in layer.tensors),
                num_kept=layer.num_kept,
            )
            for layer in message.layers
        ),
        step=message.step,
    )


def traffic_to_wire(stats: TrafficStats) -> pb.TrafficStats:
    # (``_flat``: MemoryX's counters go with every backward answer, through the root.)
    return pb.TrafficStats(**_flat(stats))


def traffic_from_wire(message: pb.TrafficStats) -> TrafficStats:
    return TrafficStats(**_fields(message, TrafficStats))


# -- SwarmX and node counters ---------------------------------------------------


def _link_to_wire(link: LinkStats) -> spb.LinkStats:
    return spb.LinkStats(**_flat(link))


def _link_from_wire(message: spb.LinkStats) -> LinkStats:
    return LinkStats(**_fields(message, LinkStats))


def swarmx_stats_to_wire(stats: SwarmXStats) -> spb.SwarmXStats:
    return spb.SwarmXStats(
        name=stats.name,
        down=[_link_to_wire(d) for d in stats.down],
        up=_link_to_wire(stats.up),
        reduced_in_bytes=stats.reduced_in_bytes,
    )


def swarmx_stats_from_wire(message: spb.SwarmXStats) -> SwarmXStats:
    return SwarmXStats(
        name=message.name,
        down=tuple(_link_from_wire(d) for d in message.down),
        up=_link_from_wire(message.up),
        reduced_in_bytes=message.reduced_in_bytes,
    )


def node_stats_to_wire(stats: NodeStats) -> npb.NodeStats:
    return npb.NodeStats(**asdict(stats))


def node_stats_from_wire(message: npb.NodeStats) -> NodeStats:
    values = _fields(message, NodeStats)
    values["backend_stats"] = dict(message.backend_stats)
    return NodeStats(**values)
