"""Mask construction and application: exact counts, seeding, zeroing weights and state."""

from __future__ import annotations

import math

import pytest
import torch

from memoryx.sparsity.masks import (
    apply_mask,
    apply_masks,
    density,
    generator_for,
    init_mask,
    largest,
    num_to_prune,
    smallest,
)

SHAPES = [(1,), (7,), (33, 7), (16, 3, 3), (64, 65)]
SPARSITIES = [0.0, 0.1, 0.5, 0.9, 0.99]


@pytest.mark.parametrize("method", ["random", "topk"])
@pytest.mark.parametrize("shape", SHAPES)
def test_init_prunes_exactly_round_sparsity_numel(shape: tuple[int, ...], method: str) -> None:
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    for sparsity in SPARSITIES:
        mask = init_mask(weight, sparsity, method, generator=generator_for(0, "w", 0))
        assert mask.dtype == torch.bool and mask.shape == weight.shape
        numel = math.prod(shape)
        assert int(mask.sum()) == round(sparsity * numel) == num_to_prune(sparsity, numel)
        assert abs(density(mask) - (1 - sparsity)) <= 1 / numel


def test_topk_prunes_the_smallest_magnitudes() -> None:
    weight = torch.randn(40, 30, generator=torch.Generator().manual_seed(1))
    mask = init_mask(weight, 0.7, "topk")
    assert weight.abs()[mask].max() <= weight.abs()[~mask].min()


def test_topk_breaks_ties_by_position() -> None:
    weight = torch.tensor([1.0, -1.0, 1.0, 2.0, 1.0])
    # round(0.6 * 5) = 3 of the four magnitude-1 entries: the first three.
    assert init_mask(weight, 0.6, "topk").tolist() == [True, True, True, False, False]


def test_random_init_is_seeded_by_seed_name_and_step() -> None:
    weight = torch.zeros(20, 20)

    def mask(seed: int, name: str, step: int) -> torch.Tensor:
        return init_mask(weight, 0.5, "random", generator=generator_for(seed, name, step))

    assert torch.equal(mask(0, "a", 0), mask(0, "a", 0))
    assert not torch.equal(mask(0, "a", 0), mask(1, "a", 0))
    assert not torch.equal(mask(0, "a", 0), mask(0, "b", 0))
    assert not torch.equal(mask(0, "a", 0), mask(0, "a", 1))


def test_random_init_prunes_every_position_equally_often() -> None:
    # Each position is pruned with probability 30 / 100 = 0.3 per draw. Over 2000
    # draws its count is ~ Binomial(2000, 0.3): mean 600, std 20.5. With 100
    # positions, a 5-sigma band (+-103) fails by chance with probability < 1e-4.
    num_draws, weight = 2000, torch.zeros(10, 10)
    counts = torch.zeros(10, 10)
    for draw in range(num_draws):
        counts += init_mask(weight, 0.3, "random", generator=generator_for(7, "w", draw)).float()
    assert counts.sum() == num_draws * 30
    assert (counts - 600).abs().max() < 103
    # ...and the counts really spread like a binomial (std 20.5), not all equal.
    assert 15 < counts.std() < 26


def test_from_zeros_uses_existing_zeros_and_checks_their_count() -> None:
    weight = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    assert init_mask(weight, 0.5, "from_zeros").tolist() == [[True, False], [False, True]]
    with pytest.raises(ValueError, match="found 2 zeros in 'fc.weight' .* prunes 3 of 4"):
        init_mask(weight, 0.75, "from_zeros", name="fc.weight")


def test_smallest_and_largest_choose_among_candidates_only() -> None:
    scores = torch.tensor([5.0, 1.0, 4.0, 2.0, 3.0])
    candidates = torch.tensor([True, False, True, True, True])
    assert smallest(scores, candidates, 2).tolist() == [False, False, False, True, True]
    assert largest(scores, candidates, 2).tolist() == [True, False, True, False, False]
    assert not smallest(scores, candidates, 0).any()


def test_apply_mask_zeros_pruned_and_regrown_entries_in_param_and_state() -> None:
    param = torch.arange(1.0, 7.0)
    state = {"exp_avg": torch.full((6,), 0.5), "exp_avg_sq": torch.full((6,), 0.25)}
    previous = torch.tensor([True, True, False, False, False, False])
    mask = torch.tensor([True, False, False, False, True, False])  # regrows 1, prunes 4
    apply_mask(param, state, mask, previous)
    zeroed = torch.tensor([True, True, False, False, True, False])
    assert torch.equal(param == 0, zeroed)
    for tensor in state.values():
        assert torch.equal(tensor == 0, zeroed)


def test_apply_masks_leaves_unmasked_parameters_alone() -> None:
    params = {"weight": torch.ones(2, 2), "bias": torch.ones(2)}
    state = {"weight": {"momentum_buffer": torch.ones(2, 2)}, "bias": {}}
    apply_masks(params, state, {"weight": torch.tensor([[True, False], [False, False]])})
    assert params["weight"].tolist() == [[0.0, 1.0], [1.0, 1.0]]
    assert state["weight"]["momentum_buffer"].tolist() == [[0.0, 1.0], [1.0, 1.0]]
    assert params["bias"].tolist() == [1.0, 1.0]
