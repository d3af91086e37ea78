"""core.mask_positions: the kept positions of a mask, found once per mask object."""

from __future__ import annotations

import gc

import numpy as np
import torch

from core.mask_positions import kept_positions


def test_positions_are_the_kept_flat_indices_ascending() -> None:
    mask = torch.tensor([[True, False, True], [False, False, True]])
    positions = kept_positions(mask)
    assert positions.dtype == np.int64 and positions.tolist() == [1, 3, 4]
    assert kept_positions(torch.ones(4, dtype=torch.bool)).tolist() == []
    assert kept_positions(torch.zeros(3, dtype=torch.bool)).tolist() == [0, 1, 2]
    # A non-contiguous mask reads in its logical (row-major) order.
    assert kept_positions(mask.t()).tolist() == [1, 2, 3]


def test_found_once_per_mask_object_and_dropped_with_it() -> None:
    mask = torch.rand(1000, generator=torch.Generator().manual_seed(0)) < 0.9
    positions = kept_positions(mask)
    assert kept_positions(mask) is positions
    # An equal mask is another object: its own positions, the same values.
    twin = mask.clone()
    assert kept_positions(twin) is not positions
    assert np.array_equal(kept_positions(twin), positions)
    before = len(kept_positions)
    del mask, twin
    gc.collect()
    assert len(kept_positions) == before - 2


def test_a_new_mask_never_gets_a_dead_masks_positions() -> None:
    # Ids of freed objects are reused; the positions must follow the object, not the id.
    for seed in range(50):
        mask = torch.rand(64, generator=torch.Generator().manual_seed(seed)) < 0.5
        expected = np.flatnonzero(~mask.numpy())
        assert np.array_equal(kept_positions(mask), expected)
        del mask
