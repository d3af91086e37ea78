"""Training steps and their passes as the driver plans and records them (``emulator.coordinator``).

Plain data and functions, no cluster: the order of a pass's layer phases, which steps a
pass's answers complete, the answers put back in their requests' order, how many steps
``runtime.steps_per_pass = "auto"`` gives a pass, and the records a step leaves.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from emulator.emulated import PassMeasurement
from proto.clients import RpcError
from proto.domain import LayerAck, LayerRequest, Phase, TrafficStats

#: ``runtime.steps_per_pass = "auto"``: at most this many training steps per pass, while
#: MemoryX's snapshots of the steps after a pass's first fit this budget.
AUTO_STEPS_PER_PASS = 4
AUTO_SNAPSHOT_BUDGET_BYTES = 128 << 20

PASS_NAMES = {Phase.FORWARD: "forward", Phase.BACKWARD: "backward"}


@dataclass
class StepRecord:
    step: int
    loss: float
    accuracy: float | None
    memoryx_egress_bytes: int
    memoryx_ingress_bytes: int
    bytes_to_nodes: int
    gradient_bytes_from_nodes: int
    flops: float
    node_compute_seconds: float
    wall_time_s: float
    num_attempts: int
    #: Disk tier traffic of all MemoryX servers in this step (0 when the state is in RAM).
    memoryx_disk_read_bytes: int = 0
    memoryx_disk_written_bytes: int = 0
    #: MemoryX refused a NaN/Inf update and skipped the step (optimizer.nonfinite = skip).
    skipped: bool = False

    @classmethod
    def from_answers(
        cls,
        step: int,
        acks: list[LayerAck],
        before: TrafficStats,
        after: TrafficStats,
        *,
        wall_time_s: float,
        attempts: int,
        classifier: bool,
    ) -> StepRecord:
        """The record of a step from its answers (in ``training_order``) and MemoryX's
        counters ``before`` and ``after`` it."""
        last = acks[len(acks) // 2 - 1]  # the last forward layer's: the loss
        return cls(
            step=step,
            loss=last.loss_sum / last.num_targets,
            accuracy=last.num_correct / last.num_targets if classifier else None,
            memoryx_egress_bytes=after.egress_bytes - before.egress_bytes,
            memoryx_ingress_bytes=after.ingress_bytes - before.ingress_bytes,
            bytes_to_nodes=sum(a.bytes_to_nodes for a in acks),
            gradient_bytes_from_nodes=sum(a.gradient_bytes for a in acks),
            flops=sum(a.flops for a in acks),
            node_compute_seconds=sum(a.compute_seconds for a in acks),
            wall_time_s=wall_time_s,
            num_attempts=attempts,
            memoryx_disk_read_bytes=after.disk_read_bytes - before.disk_read_bytes,
            memoryx_disk_written_bytes=after.disk_written_bytes - before.disk_written_bytes,
            skipped=after.num_skipped_steps > before.num_skipped_steps,
        )


@dataclass
class EvalRecord:
    step: int
    loss: float
    accuracy: float | None
    num_samples: int


def auto_steps_per_pass(num_nodes: int, weight_bytes: int) -> int:
    """``runtime.steps_per_pass = "auto"`` for a model of ``weight_bytes`` fp32 weights: on
    one compute node, up to ``AUTO_STEPS_PER_PASS`` while MemoryX's snapshots of the steps
    beyond the first (weights and optimizer state, counted as three fp32 copies of the
    weights) fit ``AUTO_SNAPSHOT_BUDGET_BYTES``; on several, one.

    Measured on 2 vCPUs (benchmarks/README.md, "Several training steps in one pass"): a
    1-node step is a chain of hops, and the driver's round trip between steps was 5-10% of
    it; a 4-node step is bound by CPU, which the round trip does not add to, and 4 steps
    per pass ran 4% slower."""
    if num_nodes > 1:
        return 1
    extra = AUTO_SNAPSHOT_BUDGET_BYTES // max(1, 3 * weight_bytes)
    return max(1, min(AUTO_STEPS_PER_PASS, 1 + extra))


def training_order(first: int, count: int, num_layers: int) -> list[tuple[int, int, Phase]]:
    """Steps ``first`` .. ``first + count - 1`` as one pass, (step, layer, phase) each: each
    step's forward layers, then its backward layers, the next step's right after.

    The root asks MemoryX for the next step's layers at once, and MemoryX sends each once
    this step's update of it is answered (``MemoryXServicer._await_update``), so no round
    trip through the driver separates two steps. Each keeps its own answers, versions and
    updates."""
    layers = range(num_layers)
    order = []
    for step in range(first, first + count):
        order += [(step, layer, Phase.FORWARD) for layer in layers]
        order += [(step, layer, Phase.BACKWARD) for layer in reversed(layers)]
    return order


def completed_steps(
    first: int, num_layers: int, answered: list[tuple[LayerAck, float]]
) -> list[tuple[list[LayerAck], float]]:
    """The steps from ``first`` whose every layer phase ``answered`` holds, in order: each
    step's answers in pass order and the time its last one came. (A step's forward needs
    the updates of the step before: the steps complete one after another.)"""
    by_key = {(a.step, a.layer, a.phase): (a, t) for a, t in answered}
    done = []
    for step in itertools.count(first):
        keys = training_order(step, 1, num_layers)
        if not all(key in by_key for key in keys):
            return done
        done.append(([by_key[k][0] for k in keys], max(by_key[k][1] for k in keys)))


def in_pass_order(requests: list[LayerRequest], acks: list[LayerAck]) -> list[LayerAck]:
    """``acks`` in the order of the ``requests`` they answer. The root answers layers as
    they complete: in a pass of several steps the next step's first forward layers may
    complete before this step's last update is answered. StepFault if the answers are not
    one to each request."""
    places = {(r.step, r.layer, r.phase): i for i, r in enumerate(requests)}
    found = sorted(places.get((a.step, a.layer, a.phase), -1) for a in acks)
    if found != list(range(len(requests))):
        got = [(a.step, a.layer, a.phase) for a in acks]
        raise StepFault(f"the root's answers (step, layer, phase) {got} do not answer the pass")
    return sorted(acks, key=lambda a: places[a.step, a.layer, a.phase])


def measurement(ack: LayerAck) -> PassMeasurement:
    """What a training layer phase moved and computed (``emulator.emulated``)."""
    return PassMeasurement(
        layer=ack.layer,
        phase=PASS_NAMES[ack.phase],
        num_nodes=ack.num_nodes,
        bytes_to_nodes=ack.bytes_to_nodes,
        gradient_bytes=ack.gradient_bytes,
        flops=ack.flops,
    )


def describe(exc: BaseException) -> str:
    """One line: a gRPC status code and its details, or the exception's message."""
    if isinstance(exc, RpcError) and hasattr(exc, "code"):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"


class StepFault(Exception):
    """A step failed mid-way: raised by a ``Coordinator.fault`` hook to simulate a failure,
    or by the driver when the root's answers are not those of the pass (run again)."""


class NonFiniteError(Exception):
    """MemoryX refused a NaN/Inf update (optimizer.nonfinite = error); the message names layer and step."""
