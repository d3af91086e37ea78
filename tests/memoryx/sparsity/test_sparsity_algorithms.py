"""static, gmp, set and rigl: exact densities on schedule, when masks change, what they pick."""

from __future__ import annotations

import math

import pytest
import torch

from core.config import from_dict
from memoryx.sparsity import ALGORITHMS, Sparsity, apply_masks

# Sizes where round(sparsity * numel) rounds both ways.
SHAPES = {"fc1.weight": (33, 7), "fc2.weight": (10, 33), "fc2.bias": (10,)}
NUM_STEPS = 60
UPDATE = {"freq": 5, "start": 3, "stop": 50}

CONFIGS = {
    "static": {"algorithm": "static", "sparsity": 0.9},
    "static_topk": {"algorithm": "static", "sparsity": 0.75, "init_method": "topk"},
    "gmp": {"algorithm": "gmp", "sparsity": 0.9, "update": UPDATE},
    "gmp_linear": {
        "algorithm": "gmp",
        "sparsity": {"kind": "linear", "init": 0.2, "final": 0.8},
        "update": UPDATE,
    },
    "set": {"algorithm": "set", "sparsity": 0.9, "update": UPDATE},
    "set_ramp": {
        "algorithm": "set",
        "sparsity": {"kind": "cycling", "values": [0.5, 0.8, 0.6]},
        "update": UPDATE,
        "drop_fraction": 0.2,
    },
    "rigl": {"algorithm": "rigl", "sparsity": 0.9, "update": UPDATE},
    "rigl_groups": {
        "algorithm": "rigl",
        "sparsity": 0.5,
        "update": UPDATE,
        "groups": [{"param_filter": ["fc2.*"], "sparsity": 0.95, "drop_fraction": 0.5}],
    },
}


def _run(config: Sparsity.Config, seed: int = 0):
    """Drive masks through NUM_STEPS steps of random weight updates, as MemoryX would.

    Yields (step, masks before the step's update, masks after, target counts).
    """
    generator = torch.Generator().manual_seed(seed)
    sparsity = config.build(SHAPES)
    weights = {name: torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}
    state = {name: {} for name in SHAPES}
    masks = sparsity.init_masks(weights, step=0)
    apply_masks(weights, state, masks)
    for step in range(NUM_STEPS):
        grads = {name: torch.randn(w.shape, generator=generator) for name, w in weights.items()}
        for name, weight in weights.items():
            weight.add_(grads[name], alpha=-0.1)
        apply_masks(weights, state, masks)
        new = sparsity.update_masks(step, weights, grads, masks, grads_finite=True)
        apply_masks(weights, state, new, previous=masks)
        yield sparsity, step, masks, new, weights
        masks = new


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_density_equals_the_target_within_one_weight_at_every_step(case: str) -> None:
    config = from_dict(Sparsity.Config, CONFIGS[case])
    for sparsity, step, _, masks, weights in _run(config):
        assert set(masks) == set(sparsity.params)
        for name, mask in masks.items():
            param = sparsity.params[name]
            # The mask made at an update step serves until the next one: its
            # target is the schedule's value at the last update step (or step 0).
            last_update = max([0] + [s for s in range(step + 1) if sparsity.is_update_step(s)])
            target = sparsity.target_sparsity(name, last_update)
            assert int(mask.sum()) == round(target * mask.numel()) == param.num_pruned(last_update)
            assert abs((1 - int(mask.sum()) / mask.numel()) - (1 - target)) <= 1 / mask.numel()
            assert bool((weights[name][mask] == 0).all())


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_masks_change_only_on_update_steps(case: str) -> None:
    config = from_dict(Sparsity.Config, CONFIGS[case])
    changed_steps = []
    for sparsity, step, before, after, _ in _run(config):
        changed = any(not torch.equal(before[n], after[n]) for n in before)
        assert not changed or sparsity.is_update_step(step), step
        if changed:
            changed_steps.append(step)
    if config.algorithm == "static":
        assert changed_steps == []
    elif config.algorithm == "gmp":
        # The ramp starts at update.start, where its value is the initial mask's
        # (nothing new to prune), and rises on every later update step.
        assert changed_steps == [8, 13, 18, 23, 28, 33, 38, 43, 48]
    elif case == "rigl":
        # The drop fraction decays to 0 at update.stop = 50: at step 48 it is
        # 0.15 (1 + cos(pi 45/47)) = 1.3e-3, which rounds to 0 of 23 or 33 survivors.
        assert changed_steps == [3, 8, 13, 18, 23, 28, 33, 38, 43]
    else:
        assert changed_steps == [3, 8, 13, 18, 23, 28, 33, 38, 43, 48]


@pytest.mark.parametrize("algorithm", ["gmp", "set", "rigl"])
def test_no_change_when_gradients_are_not_finite(algorithm: str) -> None:
    config = from_dict(Sparsity.Config, {"algorithm": algorithm, "sparsity": 0.9, "update": UPDATE})
    sparsity = config.build(SHAPES)
    generator = torch.Generator().manual_seed(3)
    weights = {name: torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}
    grads = {name: torch.full(shape, float("nan")) for name, shape in SHAPES.items()}
    masks = sparsity.init_masks(weights, step=0)
    assert sparsity.is_update_step(13)
    kept = sparsity.update_masks(13, weights, grads, masks, grads_finite=False)
    assert all(torch.equal(kept[n], masks[n]) for n in masks)
    # The same call with finite gradients does change them.
    finite = {name: torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}
    changed = sparsity.update_masks(13, weights, finite, masks, grads_finite=True)
    assert any(not torch.equal(changed[n], masks[n]) for n in masks)


def test_gmp_prunes_the_smallest_survivors_and_never_regrows() -> None:
    config = from_dict(Sparsity.Config, CONFIGS["gmp"])
    for _, _, before, after, _ in _run(config):
        for name in before:
            assert bool((after[name] | ~before[name]).all()), "a pruned weight came back"
    sparsity = config.build({"w": (10, 10)})
    weights = {"w": torch.arange(1.0, 101.0).view(10, 10)}
    masks = {"w": torch.zeros(10, 10, dtype=torch.bool)}
    step = 28  # cubic ramp over [3, 50]: 0.9 (1 - (1 - 25/47)^3) = 0.8077...
    target = round(0.9 * (1 - (1 - 25 / 47) ** 3) * 100)
    new = sparsity.update_masks(step, weights, {}, masks, grads_finite=True)["w"]
    assert new.view(-1).nonzero().squeeze(1).tolist() == list(range(target))


def test_set_and_rigl_drop_the_smallest_survivors() -> None:
    weight = torch.tensor([[0.0, 0.0, 5.0, -0.1, 3.0, 0.2, -4.0, 6.0, 0.0, 1.0]])
    mask = weight == 0  # 3 pruned, 7 alive
    for algorithm in ("set", "rigl"):
        config = from_dict(
            Sparsity.Config,
            {"algorithm": algorithm, "sparsity": 0.3, "update": UPDATE, "drop_fraction": 0.3},
        )
        sparsity = config.build({"w": (1, 10)})
        grad = torch.zeros(1, 10)
        new = sparsity.update_masks(3, {"w": weight}, {"w": grad}, {"w": mask}, grads_finite=True)
        # round(0.3 * 7) = 2 dropped: -0.1 and 0.2, the smallest magnitudes alive;
        # 2 regrown among the 5 pruned after the drop, so the larger 5 stay alive.
        assert int(new["w"].sum()) == 3
        assert not new["w"][0, [2, 4, 6, 7, 9]].any()


def test_rigl_regrows_where_the_dense_gradient_is_largest() -> None:
    config = from_dict(
        Sparsity.Config,
        {"algorithm": "rigl", "sparsity": 0.5, "update": UPDATE, "drop_fraction": 0.25},
    )
    sparsity = config.build({"w": (4, 4)})
    weight = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]] + [[1.0, 2.0, 3.0, 4.0]] * 2)
    weight[3] += 4.0  # alive magnitudes 1..8, unique
    mask = weight == 0
    grad = torch.zeros(4, 4)
    grad[0, 1], grad[1, 3] = 10.0, -9.0  # largest |grad| among pruned positions
    grad[2, 2] = 100.0  # alive: not a regrowth candidate unless dropped
    new = sparsity.update_masks(3, {"w": weight}, {"w": grad}, {"w": mask}, grads_finite=True)["w"]
    # round(0.25 * 8) = 2 dropped (magnitudes 1 and 2), 2 regrown at the largest |grad|.
    assert bool(new[2, 0]) and bool(new[2, 1])
    assert not new[0, 1] and not new[1, 3]
    assert int(new.sum()) == 8
    with pytest.raises(ValueError, match="rigl regrows 'w' by gradient magnitude"):
        sparsity.update_masks(3, {"w": weight}, {}, {"w": mask}, grads_finite=True)
    assert sparsity.needs_dense_gradients(3) and not sparsity.needs_dense_gradients(4)


def test_set_regrows_at_random_reproducibly() -> None:
    config = from_dict(Sparsity.Config, CONFIGS["set"])
    runs = [
        [after for *_, after, _ in _run(config, seed=0)],
        [after for *_, after, _ in _run(config, seed=0)],
    ]
    for first, second in zip(*runs, strict=True):
        assert all(torch.equal(first[n], second[n]) for n in first)
    other = from_dict(Sparsity.Config, {**CONFIGS["set"], "seed": 1})
    differs = [after for *_, after, _ in _run(other, seed=0)]
    assert any(
        not torch.equal(a[n], b[n]) for a, b in zip(runs[0], differs, strict=True) for n in a
    )


def test_regrown_positions_are_spread_over_all_candidates() -> None:
    # SET regrows uniformly among the positions pruned after the drop: over 400
    # seeds each of the 90 candidates of a 10x10 weight at 0.9 sparsity (10 alive,
    # 3 dropped, 3 regrown) is picked with probability 3/93 per update (the 3
    # just-dropped are candidates too), i.e. ~12.9 times (std 3.5); every candidate
    # must come up, and none over 35 times (6 sigma).
    weight = torch.zeros(10, 10)
    weight.view(-1)[:10] = torch.arange(1.0, 11.0)
    mask = weight == 0
    counts = torch.zeros(10, 10)
    for seed in range(400):
        config = from_dict(Sparsity.Config, {**CONFIGS["set"], "seed": seed})
        new = config.build({"w": (10, 10)}).update_masks(
            3, {"w": weight}, {}, {"w": mask}, grads_finite=True
        )["w"]
        counts += (~new & mask).float()
    assert bool((counts.view(-1)[10:] > 0).all())
    assert counts.max() <= 35
    assert counts.sum() == pytest.approx(400 * 3 * 90 / 93, rel=0.1)


def test_every_algorithm_is_registered() -> None:
    assert set(ALGORITHMS) == {"static", "gmp", "set", "rigl"}
    assert [ALGORITHMS[n].is_dynamic for n in ("static", "gmp", "set", "rigl")] == [
        False,
        True,
        True,
        True,
    ]
    assert math.isclose(
        Sparsity.Config(sparsity=0.5).build({"w": (2, 2)}).target_sparsity("w", 9), 0.5
    )
