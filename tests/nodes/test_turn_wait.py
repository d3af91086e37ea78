"""A pipelined layer waiting for its turn on a compute node is woken, not polling.

With many nodes to a process and steps that take longer the more nodes there are, a
wait that checks its call every 0.05 s made the CPU of a step grow as N squared.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from core.data import DataConfig
from nodes.cs2 import Cs2Backend
from nodes.service import ComputeNodeServicer
from nodes.worker import NodeWorker
from proto.domain import Phase
from proto.rpc import Security
from tests.waiting_context import (
    MAX_CHECKS,
    WAIT_S,
    CountingContext,
    assert_woken_when_the_call_ends,
    run_in_thread,
)

TIMEOUT_S = 30


@pytest.fixture(scope="module")
def servicer() -> ComputeNodeServicer:
    torch.manual_seed(0)
    worker = NodeWorker(
        rank=0,
        num_nodes=1,
        layers=[nn.Sequential(nn.Linear(64, 16), nn.ReLU()), nn.Linear(16, 10)],
        dataset=DataConfig(name="digits").build(seed=3),
        batch_size=16,
        seed=3,
        backend=Cs2Backend.Config().build(),
    )
    return ComputeNodeServicer(worker, name="node-0", security=Security.generate())


def _second_layer(pass_id: int) -> SimpleNamespace:
    """The header fields the turn reads: layer 1 of a forward pass waits for layer 0."""
    return SimpleNamespace(pass_id=pass_id, phase=Phase.FORWARD, layer=1)


def test_a_waiting_layer_is_woken_when_the_layer_before_it_is_computed(servicer):
    context = CountingContext()
    thread, outcome = run_in_thread(lambda: servicer._wait_turn(_second_layer(7), context))
    time.sleep(WAIT_S)
    assert not outcome  # its turn has not come
    with servicer._turn:  # as _compute marks layer 0 of pass 7 computed
        servicer._computed = (7, Phase.FORWARD, 0)
        servicer._turn.notify_all()
    thread.join(TIMEOUT_S)
    assert outcome == [None]
    assert context.checks <= MAX_CHECKS


def test_a_waiting_layer_is_woken_when_its_call_ends(servicer):
    assert_woken_when_the_call_ends(lambda context: servicer._wait_turn(_second_layer(8), context))
