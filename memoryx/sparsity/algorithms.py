"""Sparsity algorithms: how a parameter's mask changes on an update step.

Each algorithm is a strategy object; MemoryX calls ``update`` after applying
an update step's gradient, and only on steps its ``UpdateSchedule`` names.
Every new mask prunes exactly ``round(sparsity(step) * numel)`` entries.

- ``static``: the initial mask, forever.
- ``gmp`` (Zhu & Gupta 2017, "To prune, or not to prune"): prune the
  smallest-magnitude surviving weights until the scheduled sparsity is reached;
  pruned weights stay pruned.
- ``set`` (Mocanu et al. 2018, "Scalable training of artificial neural
  networks..."): drop the smallest-magnitude ``drop_fraction`` of surviving
  weights, regrow as many at random among the pruned positions.
- ``rigl`` (Evci et al. 2020, "Rigging the Lottery"): drop as SET does, regrow
  where the dense gradient is largest in magnitude.

SET and RigL regrow among every position that is pruned after the drop,
as RigL's reference implementation does; regrown weights and their optimizer
state start at zero (``masks.apply_mask``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import ClassVar, Literal

from torch import Tensor

from memoryx.sparsity.filters import ParamSparsity
from memoryx.sparsity.masks import generator_for, largest, random_choice, smallest

AlgorithmName = Literal["static", "gmp", "set", "rigl"]


class SparsityAlgorithm(ABC):
    """Turns the masks of an update step into the masks of the next steps."""

    name: ClassVar[AlgorithmName]
    #: False for algorithms whose mask never changes (no update schedule).
    is_dynamic: ClassVar[bool] = True
    #: True when an update needs the gradient at pruned positions as well.
    needs_dense_gradients: ClassVar[bool] = False
    #: True when updates drop and regrow weights (and so take a drop_fraction).
    regrows: ClassVar[bool] = False

    def update(
        self,
        step: int,
        weights: Mapping[str, Tensor],
        grads: Mapping[str, Tensor],
        masks: Mapping[str, Tensor],
        *,
        params: Mapping[str, ParamSparsity],
        grads_finite: bool,
    ) -> dict[str, Tensor]:
        """New masks for every name in ``masks`` after update step ``step``.

        ``weights`` are the weights after the step's optimizer update;
        ``grads`` the step's reduced gradients (dense, at pruned positions too,
        when ``needs_dense_gradients``). With ``grads_finite`` False (an
        overflowed mixed-precision step) the masks are returned unchanged.
        """
        if not grads_finite:
            return dict(masks)
        return {
            name: self.update_mask(step, params[name], weights[name], grads.get(name), mask)
            for name, mask in masks.items()
        }

    @abstractmethod
    def update_mask(
        self, step: int, param: ParamSparsity, weight: Tensor, grad: Tensor | None, mask: Tensor
    ) -> Tensor:
        """The new mask of one parameter; never modifies ``mask``."""


class Static(SparsityAlgorithm):
    name = "static"
    is_dynamic = False

    def update_mask(
        self, step: int, param: ParamSparsity, weight: Tensor, grad: Tensor | None, mask: Tensor
    ) -> Tensor:
        return mask


class GMP(SparsityAlgorithm):
    name = "gmp"

    def update_mask(
        self, step: int, param: ParamSparsity, weight: Tensor, grad: Tensor | None, mask: Tensor
    ) -> Tensor:
        missing = param.num_pruned(step) - int(mask.sum())
        if missing <= 0:
            return mask
        return mask | smallest(weight.detach().abs().float(), ~mask, missing)


class _DropAndRegrow(SparsityAlgorithm):
    """Drop the weakest surviving weights, regrow elsewhere, land on the scheduled sparsity."""

    regrows = True

    def update_mask(
        self, step: int, param: ParamSparsity, weight: Tensor, grad: Tensor | None, mask: Tensor
    ) -> Tensor:
        assert param.drop_fraction is not None, f"{self.name} needs a drop_fraction schedule"
        num_pruned = int(mask.sum())
        num_alive = mask.numel() - num_pruned
        target = param.num_pruned(step)
        # A rising sparsity target drops more than it regrows, a falling one regrows more.
        num_drop = max(round(param.drop_fraction.value(step) * num_alive), target - num_pruned)
        num_drop = min(num_drop, num_alive)
        dropped = smallest(weight.detach().abs().float(), ~mask, num_drop)
        after_drop = mask | dropped
        num_regrow = num_pruned + num_drop - target
        grown = self.regrow(step, param, grad, after_drop, num_regrow)
        return after_drop & ~grown

    @abstractmethod
    def regrow(
        self, step: int, param: ParamSparsity, grad: Tensor | None, candidates: Tensor, count: int
    ) -> Tensor:
        """Bool mask of ``count`` positions among ``candidates`` to bring back."""


class SET(_DropAndRegrow):
    name = "set"

    def regrow(
        self, step: int, param: ParamSparsity, grad: Tensor | None, candidates: Tensor, count: int
    ) -> Tensor:
        return random_choice(
            candidates, count, generator_for(param.seed, param.name, step, "regrow")
        )


class RigL(_DropAndRegrow):
    name = "rigl"
    needs_dense_gradients = True

    def regrow(
        self, step: int, param: ParamSparsity, grad: Tensor | None, candidates: Tensor, count: int
    ) -> Tensor:
        if grad is None or grad.shape != candidates.shape:
            raise ValueError(
                f"rigl regrows {param.name!r} by gradient magnitude, so its update at step {step} "
                f"needs the dense gradient of shape {tuple(candidates.shape)}, got "
                f"{None if grad is None else tuple(grad.shape)}."
            )
        return largest(grad.detach().abs().float(), candidates, count)


ALGORITHMS: dict[str, type[SparsityAlgorithm]] = {cls.name: cls for cls in (Static, GMP, SET, RigL)}

__all__ = ["ALGORITHMS", "GMP", "SET", "AlgorithmName", "RigL", "SparsityAlgorithm", "Static"]
