"""Per-parameter pruning masks: bool tensors where True marks a PRUNED entry.

The convention is ``memoryx.optim.Optimizer.update``'s ``mask``. Every mask
prunes exactly ``round(sparsity * numel)`` entries, so the density a layer
achieves equals its target to within one weight. Selections break ties by
position (stable sorts), and random choices draw from a generator seeded by
(seed, purpose, parameter name, step), so a step that MemoryX runs again picks the same
mask.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor

InitMethod = Literal["random", "topk", "from_zeros"]
INIT_METHODS: tuple[InitMethod, ...] = ("random", "topk", "from_zeros")


def num_to_prune(sparsity: float, numel: int) -> int:
    """Entries a mask of ``sparsity`` prunes in a tensor of ``numel`` entries."""
    assert 0 <= sparsity < 1, sparsity
    return round(sparsity * numel)


def generator_for(seed: int, name: str, step: int, purpose: str = "init") -> torch.Generator:
    """A CPU generator that depends only on its arguments, not on call order.

    ``purpose`` keeps the draws of different uses (``init``, ``regrow``) at the
    same step independent.
    """
    # torch's CPU generator keeps only the low 32 bits of a seed, so everything goes in the hash.
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{purpose}:{name}@{step}".encode()))


def smallest(scores: Tensor, candidates: Tensor, count: int) -> Tensor:
    """Bool mask of the ``count`` candidates with the smallest score (ties: lower index)."""
    positions = candidates.reshape(-1).nonzero().squeeze(1)
    assert count <= positions.numel(), (count, positions.numel())
    order = torch.argsort(scores.reshape(-1)[positions], stable=True)
    chosen = torch.zeros(candidates.numel(), dtype=torch.bool)
    chosen[positions[order[:count]]] = True
    return chosen.view(candidates.shape)


def largest(scores: Tensor, candidates: Tensor, count: int) -> Tensor:
    """Bool mask of the ``count`` candidates with the largest score (ties: lower index)."""
    return smallest(-scores, candidates, count)


def random_choice(candidates: Tensor, count: int, generator: torch.Generator) -> Tensor:
    """Bool mask of ``count`` candidates drawn uniformly without replacement."""
    positions = candidates.reshape(-1).nonzero().squeeze(1)
    assert count <= positions.numel(), (count, positions.numel())
    picked = positions[torch.randperm(positions.numel(), generator=generator)[:count]]
    chosen = torch.zeros(candidates.numel(), dtype=torch.bool)
    chosen[picked] = True
    return chosen.view(candidates.shape)


def init_mask(
    weight: Tensor,
    sparsity: float,
    method: InitMethod,
    *,
    generator: torch.Generator | None = None,
    name: str = "weight",
) -> Tensor:
    """The first mask of ``weight``: ``round(sparsity * numel)`` entries pruned.

    ``random`` prunes uniformly chosen entries (``generator`` required);
    ``topk`` prunes the smallest magnitudes; ``from_zeros`` prunes the entries
    that are already exactly zero (a pruned checkpoint), and their count must
    match the target.
    """
    count = num_to_prune(sparsity, weight.numel())
    everywhere = torch.ones(weight.shape, dtype=torch.bool)
    if method == "random":
        assert generator is not None, "random init needs a generator"
        return random_choice(everywhere, count, generator)
    if method == "topk":
        return smallest(weight.detach().abs().float(), everywhere, count)
    if method == "from_zeros":
        mask = weight.detach() == 0
        num_zeros = int(mask.sum())
        if num_zeros != count:
            raise ValueError(
                f"init_method = 'from_zeros' found {num_zeros} zeros in {name!r} "
                f"(sparsity {num_zeros / max(weight.numel(), 1):.4f}), but its target sparsity "
                f"{sparsity} prunes {count} of {weight.numel()}; set sparsity to match the "
                "checkpoint or use init_method 'topk'."
            )
        return mask
    raise AssertionError(f"unknown init method {method!r}")


def apply_mask(
    param: Tensor,
    state: Mapping[str, Tensor],
    mask: Tensor,
    previous: Tensor | None = None,
) -> None:
    """Zero, in place, ``param`` and every state tensor where ``mask`` prunes.

    Positions that ``previous`` pruned and ``mask`` regrows are zeroed too, so
    a regrown weight starts from 0 with zero optimizer state (SET, RigL), and
    a pruned one can never be revived by momentum or Adam moments.
    """
    assert mask.dtype == torch.bool and mask.shape == param.shape, (mask.dtype, mask.shape)
    zero = mask if previous is None else mask | previous
    param.masked_fill_(zero, 0.0)
    for tensor in state.values():
        tensor.masked_fill_(zero, 0.0)


def apply_masks(
    params: Mapping[str, Tensor],
    state: Mapping[str, Mapping[str, Tensor]],
    masks: Mapping[str, Tensor],
    previous: Mapping[str, Tensor] | None = None,
) -> None:
    """``apply_mask`` for every masked parameter of a layer (unmasked ones are left alone)."""
    for name, mask in masks.items():
        apply_mask(
            params[name], state.get(name, {}), mask, None if previous is None else previous[name]
        )


def density(mask: Tensor) -> float:
    """Fraction of entries a mask keeps."""
    return 1.0 - int(mask.sum()) / max(mask.numel(), 1)


__all__ = [
    "INIT_METHODS",
    "InitMethod",
    "apply_mask",
    "apply_masks",
    "density",
    "generator_for",
    "init_mask",
    "largest",
    "num_to_prune",
    "random_choice",
    "smallest",
]
