"""Passes run as the coordinator runs them, for the tests of an in-process cluster
(``benchmarks.fuzz_services.Services``: MemoryX, the SwarmX tree and compute nodes over
real gRPC on loopback, no Ray)."""

from __future__ import annotations

import torch

from benchmarks.fuzz_services import Services
from proto import memoryx_pb2 as mpb
from proto.clients import SwarmXClient
from proto.domain import LayerAck, LayerRequest, Phase

TIMEOUT_S = 30
#: Layer requests a driver keeps unanswered in a pass (``Coordinator``'s window).
WINDOW = 2


def pass_requests(services: Services, step: int, pass_id: int, phases) -> list[LayerRequest]:
    num_layers = len(services.layers)
    order = [(layer, phase) for phase in phases for layer in range(num_layers)]
    if Phase.BACKWARD in phases:  # backward runs from the last layer down
        order = [(layer, phase) for layer, phase in order if phase != Phase.BACKWARD]
        order += [(layer, Phase.BACKWARD) for layer in reversed(range(num_layers))]
    return [
        LayerRequest(layer, step, phase, "float32", False, pass_id, position, len(order))
        for position, (layer, phase) in enumerate(order, start=1)
    ]


def run_pass(
    services: Services, requests: list[LayerRequest], ahead: int | None = WINDOW
) -> list[LayerAck]:
    """As ``Coordinator._run_pass``: one call, at most ``ahead`` requests unanswered (the
    root runs at most two layers at a time whatever the driver sends); ``ahead`` None:
    every request at once, in one message (``PendingPass.send_all``)."""
    root = SwarmXClient(services.addresses[services.root_name], services.security)
    pending = root.start_pass(timeout_s=TIMEOUT_S)
    acks: list[LayerAck] = []
    try:
        if ahead is None:
            pending.send_all(requests)
        for sent, request in enumerate(requests if ahead is not None else ()):
            if sent - len(acks) == ahead:
                acks.append(pending.next_ack(timeout_s=TIMEOUT_S))
            pending.send(request)
        pending.close()
        while len(acks) < len(requests):
            acks.append(pending.next_ack(timeout_s=TIMEOUT_S))
    except BaseException:
        pending.cancel()
        raise
    return acks


def train_step(
    services: Services, step: int, pass_id: int, ahead: int | None = WINDOW
) -> list[LayerAck]:
    requests = pass_requests(services, step, pass_id, (Phase.FORWARD, Phase.BACKWARD))
    acks = run_pass(services, requests, ahead)
    services.memoryx_stub.CommitStep(mpb.StepRequest(step=step), timeout=TIMEOUT_S)
    return acks


def memoryx_state(services: Services) -> dict[str, torch.Tensor]:
    return services.memoryx.store.state_dict()


def assert_bitwise_equal(one, two) -> None:
    assert type(one) is type(two)
    if isinstance(one, torch.Tensor):
        assert torch.equal(one, two)
    elif isinstance(one, dict):
        assert one.keys() == two.keys()
        for key in one:
            assert_bitwise_equal(one[key], two[key])
    elif isinstance(one, list | tuple):
        assert len(one) == len(two)
        for a, b in zip(one, two, strict=True):
            assert_bitwise_equal(a, b)
    else:
        assert one == two
