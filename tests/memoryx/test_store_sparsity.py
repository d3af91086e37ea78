"""ParameterStore with sparsity: masks per version, zeroed weights, updates, rollback, state."""

from __future__ import annotations

import pytest
import torch

from memoryx.optim import Optimizer
from memoryx.sparsity import Sparsity, UpdateSchedule, num_to_prune
from memoryx.store import ParameterStore


def _layers() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [
        {"weight": torch.randn(16, 12, generator=gen), "bias": torch.randn(16, generator=gen)},
        {"weight": torch.randn(4, 16, generator=gen), "bias": torch.randn(4, generator=gen)},
    ]


def _sparsity(layers, **config) -> Sparsity:
    shapes = {
        f"{i}.{n}": tuple(t.shape) for i, layer in enumerate(layers) for n, t in layer.items()
    }
    return Sparsity.Config(**config).build(shapes)


def _grads(store: ParameterStore, layer: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=gen) for name, shape in store.layout(layer)}


def _adam() -> Optimizer:
    return Optimizer.Config(name="adam", lr=1e-2).build()


def _run(store: ParameterStore, steps: range) -> None:
    for step in steps:
        for layer in range(store.num_layers):
            store.apply_gradients(layer, step, _grads(store, layer, 10 * step + layer))
        store.commit(step)


def test_masks_start_applied_and_stay_zero_after_50_steps():
    layers = _layers()
    store = ParameterStore(layers, _adam(), sparsity=_sparsity(layers, sparsity=0.75))
    masks = [store.masks(i, 0) for i in range(2)]
    assert [sorted(m) for m in masks] == [["weight"], ["weight"]]
    _run(store, range(50))
    for layer, mask in enumerate(masks):
        weight = store.weights(layer, 50)["weight"]
        assert int(mask["weight"].sum()) == num_to_prune(0.75, weight.numel())
        assert torch.count_nonzero(weight[mask["weight"]]) == 0
        assert torch.equal(store.masks(layer, 50)["weight"], mask["weight"])
    assert store.num_kept(0) == 16 * 12 - num_to_prune(0.75, 16 * 12) + 16


def test_set_changes_masks_on_update_steps_and_rollback_restores_them():
    layers = _layers()
    sparsity = _sparsity(
        layers, algorithm="set", sparsity=0.5, update=UpdateSchedule.Config(freq=2, start=1, stop=9)
    )
    store = ParameterStore(layers, _adam(), sparsity=sparsity)
    _run(store, range(1))
    before = store.masks(0, 1)["weight"]
    store.apply_gradients(0, 1, _grads(store, 0, 99))  # step 1 updates the masks
    after = store.masks(0, 2)["weight"]
    assert not torch.equal(before, after)
    assert int(after.sum()) == int(before.sum())
    regrown = before & ~after
    assert torch.count_nonzero(store.weights(0, 2)["weight"][after | regrown]) == 0
    assert torch.equal(store.masks(0, 1)["weight"], before)  # the snapshot keeps its masks
    assert store.rollback(1) == [0]
    assert torch.equal(store.masks(0, 1)["weight"], before)


def test_mask_update_is_skipped_when_a_gradient_is_not_finite():
    layers = _layers()
    sparsity = _sparsity(
        layers, algorithm="set", sparsity=0.5, update=UpdateSchedule.Config(freq=1, start=0, stop=9)
    )
    # MemoryX never applies a non-finite gradient; skipping the step keeps the masks too.
    optimizer = Optimizer.Config(name="sgd", lr=0.1, nonfinite="skip").build()
    store = ParameterStore(layers, optimizer, sparsity=sparsity)
    before = store.masks(0, 0)["weight"]
    grads = _grads(store, 0, 1)
    grads["bias"][0] = float("inf")
    assert store.apply_gradients(0, 0, grads) is False
    assert torch.equal(store.masks(0, 1)["weight"], before)


def test_state_dict_round_trip_keeps_masks_and_checks_the_config():
    layers = _layers()
    sparsity = _sparsity(layers, sparsity=0.75)
    store = ParameterStore(layers, _adam(), sparsity=sparsity)
    _run(store, range(3))
    state = store.state_dict()
    restored = ParameterStore.from_state_dict(state, _adam(), sparsity=sparsity)
    for layer in range(2):
        assert torch.equal(restored.masks(layer, 3)["weight"], store.masks(layer, 3)["weight"])
    with pytest.raises(ValueError, match="resume with the same sparsity"):
        ParameterStore.from_state_dict(state, _adam())
