"""``emulator.steps``: a pass's order, which steps its answers complete, and a step's record."""

from __future__ import annotations

import pytest

from emulator.steps import (
    AUTO_SNAPSHOT_BUDGET_BYTES,
    AUTO_STEPS_PER_PASS,
    StepRecord,
    auto_steps_per_pass,
    completed_steps,
    training_order,
)
from proto.domain import LayerAck, Phase, TrafficStats

F, B = Phase.FORWARD, Phase.BACKWARD


def test_a_pass_runs_each_step_forward_then_backward_then_the_next_step():
    assert training_order(4, 2, 2) == [
        (4, 0, F), (4, 1, F), (4, 1, B), (4, 0, B),
        (5, 0, F), (5, 1, F), (5, 1, B), (5, 0, B),
    ]  # fmt: skip


def _answers(order, times=None):
    return [
        (LayerAck(layer=layer, step=step, phase=phase), t)
        for (step, layer, phase), t in zip(order, times or range(len(order)), strict=True)
    ]


def test_only_steps_with_every_answer_are_complete_each_in_pass_order():
    order = training_order(7, 3, 2)
    # Step 8's first forward answer (at t = 3) overtook step 7's last backward one (t = 4);
    # step 8 has no backward answers yet.
    answered = _answers([*order[:3], order[4], order[3], order[5]], times=[0, 1, 2, 3, 4, 5])
    done = completed_steps(7, 2, answered)
    assert len(done) == 1
    acks, last_s = done[0]
    assert [(a.step, a.layer, a.phase) for a in acks] == order[:4]
    assert last_s == 4  # when the step's last answer came
    assert completed_steps(8, 2, answered) == []
    assert [acks[0].step for acks, _ in completed_steps(7, 2, _answers(order))] == [7, 8, 9]


def test_a_step_record_takes_the_loss_of_the_last_forward_layer_and_sums_the_rest():
    acks = [
        LayerAck(layer=0, step=3, phase=F, bytes_to_nodes=10, flops=1.0, compute_seconds=0.5),
        LayerAck(layer=1, step=3, phase=F, loss_sum=6.0, num_targets=4, num_correct=3, flops=2.0),
        LayerAck(layer=1, step=3, phase=B, gradient_bytes=7, bytes_to_nodes=20),
        LayerAck(layer=0, step=3, phase=B, gradient_bytes=5),
    ]
    before = TrafficStats(egress_bytes=100, ingress_bytes=50, num_skipped_steps=1)
    after = TrafficStats(egress_bytes=130, ingress_bytes=62, num_skipped_steps=2)
    record = StepRecord.from_answers(
        3, acks, before, after, wall_time_s=0.25, attempts=2, classifier=True
    )
    assert (record.loss, record.accuracy) == (1.5, 0.75)
    assert (record.memoryx_egress_bytes, record.memoryx_ingress_bytes) == (30, 12)
    assert (record.bytes_to_nodes, record.gradient_bytes_from_nodes) == (30, 12)
    assert (record.flops, record.node_compute_seconds) == (3.0, 0.5)
    assert (record.wall_time_s, record.num_attempts, record.skipped) == (0.25, 2, True)
    other = StepRecord.from_answers(
        3, acks, before, before, wall_time_s=0.25, attempts=1, classifier=False
    )
    assert other.accuracy is None and not other.skipped


@pytest.mark.parametrize(
    ("num_nodes", "weight_bytes", "want"),
    [
        (1, 1, AUTO_STEPS_PER_PASS),
        (1, AUTO_SNAPSHOT_BUDGET_BYTES // 3, 2),  # one extra snapshot fits
        (1, AUTO_SNAPSHOT_BUDGET_BYTES // 3 + 1, 1),  # none does
        (2, 1, 1),  # several nodes: one step per pass
    ],
)
def test_auto_steps_per_pass_counts_the_snapshots_that_fit(num_nodes, weight_bytes, want):
    assert auto_steps_per_pass(num_nodes, weight_bytes) == want
