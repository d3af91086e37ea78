"""A root SwarmX layer waiting for the layer before it in its pass is woken, not polling.

With steps that take longer the more nodes there are, a wait that checks its call every
0.05 s costs CPU in proportion to N times the step's length.
"""

from __future__ import annotations

import time

from proto.domain import LayerRequest, Phase
from proto.rpc import Security
from swarmx.service import SwarmXServicer
from tests.waiting_context import (
    MAX_CHECKS,
    WAIT_S,
    CountingContext,
    assert_woken_when_the_call_ends,
    run_in_thread,
)

TIMEOUT_S = 30


def _second(pass_id: int) -> LayerRequest:
    return LayerRequest(1, 0, Phase.FORWARD, "float32", False, pass_id, 2, 4)


def test_a_waiting_layer_is_woken_when_the_layer_before_it_is_sent():
    servicer = SwarmXServicer("swarmx-0", security=Security.generate())
    context = CountingContext()
    thread, outcome = run_in_thread(lambda: servicer._await_pass_turn(_second(7), context))
    time.sleep(WAIT_S)
    assert not outcome  # the layer before it is not on the pass's streams yet
    with servicer._pass_turn:  # as the broadcast of position 1 marks it sent
        servicer._pass_done = (7, 1)
        servicer._pass_turn.notify_all()
    thread.join(TIMEOUT_S)
    assert outcome == [None]
    assert context.checks <= MAX_CHECKS


def test_a_waiting_layer_is_woken_when_its_call_ends():
    servicer = SwarmXServicer("swarmx-0", security=Security.generate())
    assert_woken_when_the_call_ends(lambda context: servicer._await_pass_turn(_second(8), context))
