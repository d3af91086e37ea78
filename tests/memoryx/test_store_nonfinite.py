"""MemoryX never applies a NaN/Inf update: ``optimizer.nonfinite`` error rolls back, skip skips."""

from __future__ import annotations

import math

import grpc
import pytest
import torch

from memoryx.gradient_checks import all_finite
from memoryx.optim import Optimizer
from memoryx.service import MemoryXServicer, register
from memoryx.store import NonFiniteUpdate, ParameterStore
from proto import memoryx_pb2_grpc as mgrpc
from proto import tensor_pb2 as pb
from proto.rpc import NONFINITE_STATUS, Security, channel, start_server
from proto.serde import encode_layer

NUM_LAYERS = 3


def _layers() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [
        {"weight": torch.randn(4, 3, generator=gen), "bias": torch.randn(4, generator=gen)}
        for _ in range(NUM_LAYERS)
    ]


def _grads(store: ParameterStore, layer: int, seed: int, bad: float | None = None) -> dict:
    gen = torch.Generator().manual_seed(seed)
    grads = {name: torch.randn(shape, generator=gen) for name, shape in store.layout(layer)}
    if bad is not None:
        grads["weight"][1, 2] = bad
    return grads


def _store(nonfinite: str, **optimizer) -> ParameterStore:
    config = Optimizer.Config(name="adam", lr=1e-2, nonfinite=nonfinite, **optimizer)
    return ParameterStore(_layers(), config.build())


def _backward(store: ParameterStore, step: int, seed: int, bad_layer: int | None = None, bad=None):
    """Gradients of one step in backward order (last layer first), as the coordinator sends them."""
    applied = []
    for layer in reversed(range(NUM_LAYERS)):
        value = bad if layer == bad_layer else None
        applied.append(store.apply_gradients(layer, step, _grads(store, layer, seed, value)))
    return applied


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_error_policy_names_layer_and_step_and_rolls_the_step_back(bad):
    store = _store("error")
    _backward(store, 0, seed=1)
    store.commit(0)
    before = store.state_dict()
    store.apply_gradients(2, 1, _grads(store, 2, 2))  # layer 2 takes step 1 first
    with pytest.raises(NonFiniteUpdate, match=r"step 1, layer 1: the gradient of 'weight'") as info:
        store.apply_gradients(1, 1, _grads(store, 1, 2, bad))
    assert (info.value.layer, info.value.step) == (1, 1)
    assert "optimizer.nonfinite: skip" in str(info.value)
    # Every layer is back at the start of step 1, bit for bit, with nothing left to commit.
    after = store.state_dict()
    for old, new in zip(before["layers"], after["layers"], strict=True):
        assert new["version"] == 1 and new["num_updates"] == old["num_updates"] == 1
        for name, tensor in old["params"].items():
            assert torch.equal(tensor, new["params"][name])
            for key, state in old["optimizer_state"][name].items():
                assert torch.equal(state, new["optimizer_state"][name][key])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_all_finite_agrees_with_isfinite(dtype):
    """The check by sum finds every NaN and infinity, also among values whose sum overflows
    (which alone proves nothing) or cancels out (inf - inf)."""
    big = torch.finfo(dtype).max
    cases = [
        torch.randn(1000, dtype=torch.float64),
        [],
        [big] * 10,  # finite values whose sum overflows
        [big, -big, big, -big],
        [1.0, math.nan, 2.0],
        [math.inf, -math.inf],  # the sum is NaN
        [big, big, math.nan],
        [-math.inf, 3.0],
    ]
    for values in cases:
        tensor = torch.as_tensor(values, dtype=torch.float64).to(dtype)
        assert all_finite(tensor) == bool(torch.isfinite(tensor).all()), tensor
    assert all_finite(torch.arange(5))  # integers are always finite


def test_error_policy_refuses_an_update_that_overflows_finite_weights():
    # A finite gradient and a finite lr whose product overflows float32.
    config = Optimizer.Config(name="sgd", lr=1e38, momentum=0.0)
    store = ParameterStore(_layers(), config.build())
    grads = {name: torch.full(shape, 1e3) for name, shape in store.layout(0)}
    with pytest.raises(NonFiniteUpdate, match="gives NaN or Inf weights from a finite gradient"):
        store.apply_gradients(0, 0, grads)
    assert store.version(0) == 0 and all(
        torch.isfinite(t).all() for t in store.weights(0, 0).values()
    )


def test_skip_policy_skips_the_whole_step_like_grad_scaler():
    store = _store("skip")
    _backward(store, 0, seed=1)
    store.commit(0)
    start = {i: store.weights(i, 1) for i in range(NUM_LAYERS)}
    # Layer 2 is updated, layer 1 gets a NaN gradient, layer 0 still sends its gradient.
    applied = _backward(store, 1, seed=2, bad_layer=1, bad=math.nan)
    assert applied == [True, False, False]
    assert store.num_skipped_steps == 1
    for layer in range(NUM_LAYERS):
        assert store.version(layer) == 2
        weights = store.weights(layer, 2)
        assert all(torch.equal(weights[n], start[layer][n]) for n in weights)
        # A re-run of step 1 streams the same weights and its gradients are not applied again.
        assert store.weights(layer, 1) == weights
        assert store.apply_gradients(layer, 1, _grads(store, layer, 2)) is False
    store.commit(1)

    # The next step is exactly the update a run without step 1 would have made as its second:
    # the update count (Adam's bias correction) did not move.
    reference = _store("skip")
    _backward(reference, 0, seed=1)
    reference.commit(0)
    _backward(reference, 1, seed=3)
    _backward(store, 2, seed=3)
    store.commit(2)
    for layer in range(NUM_LAYERS):
        ours, theirs = store.weights(layer, 3), reference.weights(layer, 2)
        assert all(torch.equal(ours[n], theirs[n]) for n in ours)
    assert [entry["num_updates"] for entry in store.state_dict()["layers"]] == [2] * NUM_LAYERS


def test_skip_policy_when_the_first_layer_of_the_backward_pass_is_bad():
    store = _store("skip")
    applied = _backward(store, 0, seed=1, bad_layer=NUM_LAYERS - 1, bad=math.inf)
    assert applied == [False] * NUM_LAYERS and store.num_skipped_steps == 1
    store.commit(0)
    for layer, original in enumerate(_layers()):
        assert all(torch.equal(store.weights(layer, 1)[n], original[n]) for n in original)


@pytest.mark.parametrize("nonfinite", ["error", "skip"])
def test_service_maps_the_policy_to_status_and_stats(nonfinite):
    optimizer = Optimizer.Config(name="sgd", lr=0.1, momentum=0.0, nonfinite=nonfinite).build()
    servicer = MemoryXServicer(optimizer)
    security = Security.generate()
    server, address = start_server(lambda s: register(s, servicer), "127.0.0.1", security=security)
    try:
        stub = mgrpc.MemoryXStub(channel(address, security))
        layers = _layers()

        def load():
            for index, tensors in enumerate(layers):
                yield from encode_layer(index, 0, pb.FORWARD, tensors, sender="driver")

        stub.LoadWeights(load(), timeout=20)
        grads = {name: torch.full(t.shape, math.nan) for name, t in layers[2].items()}
        stream = encode_layer(2, 0, pb.BACKWARD, grads, sender="swarmx")
        if nonfinite == "error":
            with pytest.raises(grpc.RpcError) as info:
                stub.PushGradients(iter(stream), timeout=20)
            assert info.value.code() == NONFINITE_STATUS
            assert "step 0, layer 2" in info.value.details()
            assert stub.Stats(pb.Empty(), timeout=20).num_skipped_steps == 0
        else:
            ack = stub.PushGradients(iter(stream), timeout=20)
            assert not ack.update_applied
            assert stub.Stats(pb.Empty(), timeout=20).num_skipped_steps == 1
    finally:
        server.stop(grace=None)
