"""A short pass layer computes on the compute node's event loop, not on a thread.

Over real gRPC on loopback (an in-process cluster: MemoryX, the SwarmX root, compute
nodes; no Ray), training passes run as the coordinator runs them. A layer whose compute
took less than ``nodes.service.INLINE_COMPUTE_MAX_S`` the last time runs on the loop
that read it; the weights trained are the same bits as with every layer on a thread. A
node with a layer of ``LONG_LAYER_S`` or more in a kind of pass (training, evaluation)
computes each layer of such passes on a thread.
"""

from __future__ import annotations

import dataclasses
import threading

import pytest

from benchmarks.fuzz_services import build_services
from nodes import service as node_service
from nodes.worker import _PROCESS_LOCK, NodeWorker, process_computing
from proto import threads
from proto.domain import Phase
from proto.rpc import Security
from tests.swarmx.passes import (
    assert_bitwise_equal,
    memoryx_state,
    pass_requests,
    run_pass,
    train_step,
)

NUM_STEPS = 3


@pytest.fixture
def layer_threads(monkeypatch) -> list[str]:
    """Names of the threads compute nodes start for their layers (``node-R-layer``; the
    SwarmX root's are ``swarmx-pass-layer``)."""
    started: list[str] = []
    start = threads.start

    def counted(target, *args, name: str = "", **kwargs):
        if name.startswith("node-") and name.endswith("-layer"):
            started.append(name)
        return start(target, *args, name=name, **kwargs)

    monkeypatch.setattr(node_service.threads, "start", counted)
    return started


def _train(*, inline_max_s: float, monkeypatch, started: list[str]) -> tuple[dict, list[int]]:
    """The weights after ``NUM_STEPS`` steps on 2 nodes, and the layer threads per step."""
    monkeypatch.setattr(node_service, "INLINE_COMPUTE_MAX_S", inline_max_s)
    # No layer of this test's model is long, however busy the machine.
    monkeypatch.setattr(node_service, "LONG_LAYER_S", 60.0)
    services = build_services(Security.generate(), num_nodes=2, fanout=2)
    per_step = []
    try:
        for step in range(NUM_STEPS):
            before = len(started)
            acks = train_step(services, step, pass_id=step + 1)
            assert all(ack.num_nodes == 2 and ack.update_applied for ack in acks)
            assert sum(ack.gradient_bytes > 0 for ack in acks if ack.phase == Phase.BACKWARD)
            per_step.append(len(started) - before)
        return memoryx_state(services), per_step
    finally:
        services.stop()


def test_short_layers_compute_on_the_loop_and_train_the_same_bits(monkeypatch, layer_threads):
    on_threads, threaded_per_step = _train(
        inline_max_s=0.0, monkeypatch=monkeypatch, started=layer_threads
    )
    # Every layer, forward and backward, of both nodes on a thread of its own.
    layers_per_step = threaded_per_step[0]
    assert layers_per_step > 0 and threaded_per_step == [layers_per_step] * NUM_STEPS
    on_loop, inline_per_step = _train(
        inline_max_s=60.0, monkeypatch=monkeypatch, started=layer_threads
    )
    # The first step measures each layer's compute (on threads); later ones run on the loop.
    assert inline_per_step[0] == layers_per_step
    assert inline_per_step[1:] == [0] * (NUM_STEPS - 1)
    assert_bitwise_equal(on_loop, on_threads)


def test_a_layer_waits_on_a_thread_while_another_node_of_the_process_computes(
    monkeypatch, layer_threads
):
    """The loop never waits for another node's compute (nodes may share a process): a
    layer whose node, or process, is busy goes to a thread."""
    assert not process_computing()
    with _PROCESS_LOCK:
        assert process_computing()
    # With the process's compute lock held by a thread whenever a layer would go on the
    # loop, every layer takes a thread, and training still completes.
    busy = threading.Event()

    def always_busy() -> bool:
        busy.set()
        return True

    monkeypatch.setattr(node_service, "process_computing", always_busy)
    _, per_step = _train(inline_max_s=60.0, monkeypatch=monkeypatch, started=layer_threads)
    assert busy.is_set()
    assert per_step == [per_step[0]] * NUM_STEPS


def test_a_node_with_a_long_layer_computes_every_layer_on_a_thread(monkeypatch, layer_threads):
    """A node whose layers are not all short keeps its loop free to read the next layer's
    weights while one computes (gpt-10m: its embedding and head are short, its blocks are
    not): none of its layers runs on the loop, however short."""
    forward = NodeWorker.forward

    def last_layer_long(self, layer, step, params):
        result = forward(self, layer, step, params)
        if layer == self.num_layers - 1:  # as if it had computed for a minute
            result = dataclasses.replace(result, compute_seconds=60.0, cpu_seconds=60.0)
        return result

    monkeypatch.setattr(NodeWorker, "forward", last_layer_long)
    _, per_step = _train(inline_max_s=1.0, monkeypatch=monkeypatch, started=layer_threads)
    assert per_step == [per_step[0]] * NUM_STEPS


def test_a_short_layer_descheduled_mid_compute_stays_on_the_loop(monkeypatch, layer_threads):
    """Whether a layer is short is judged by the CPU time it computed, not the wall time:
    on a loaded machine (192 nodes on 2 cores) a short layer descheduled mid-compute took
    milliseconds of wall time, and judged by that, the node's next layers went to threads,
    whose hand-offs loaded the machine more (a third of the layers on threads, steps twice
    as long)."""
    forward, backward = NodeWorker.forward, NodeWorker.backward

    def descheduled(result):  # a minute of wall time, no CPU time more
        return dataclasses.replace(result, compute_seconds=result.compute_seconds + 60.0)

    def descheduled_backward(*args):
        grads, result = backward(*args)
        return grads, descheduled(result)

    monkeypatch.setattr(NodeWorker, "forward", lambda *args: descheduled(forward(*args)))
    monkeypatch.setattr(NodeWorker, "backward", descheduled_backward)
    _, per_step = _train(inline_max_s=0.5, monkeypatch=monkeypatch, started=layer_threads)
    # The first step measures each layer (on threads); later ones run on the loop.
    assert per_step[0] > 0 and per_step[1:] == [0] * (NUM_STEPS - 1)


def test_a_long_evaluation_layer_keeps_training_layers_on_the_loop(monkeypatch, layer_threads):
    """Whether a node's layers are long is judged per kind of pass: an evaluation over a
    large batch does not take a model's short training layers off the loop."""
    evaluate = NodeWorker.evaluate

    def evaluation_long(self, layer, step, params):
        result = evaluate(self, layer, step, params)
        return dataclasses.replace(result, compute_seconds=60.0, cpu_seconds=60.0)

    monkeypatch.setattr(NodeWorker, "evaluate", evaluation_long)
    monkeypatch.setattr(node_service, "INLINE_COMPUTE_MAX_S", 1.0)
    monkeypatch.setattr(node_service, "LONG_LAYER_S", 30.0)
    services = build_services(Security.generate(), num_nodes=2, fanout=2)
    try:
        train_step(services, 0, pass_id=1)
        after_training = len(layer_threads)
        run_pass(services, pass_requests(services, 1, 2, (Phase.EVAL,)))
        assert len(layer_threads) > after_training  # evaluation layers computed on threads
        before = len(layer_threads)
        train_step(services, 1, pass_id=3)
        assert len(layer_threads) == before  # ... and training layers still on the loop
    finally:
        services.stop()
