"""Per-tensor optimizers applied by MemoryX as each layer's reduced gradient arrives.

Each update reproduces the single-tensor path of ``torch.optim`` (``foreach=False``)
operation by operation, so a run through MemoryX is bitwise equal to the same run
with ``torch.optim.SGD`` / ``Adam`` / ``AdamW`` on one machine. The state held
here is tensors only; the update count (Adam's bias correction, SGD's first-step
momentum) is owned by the parameter store and passed in as ``step``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from core.config import doc


def _check_step(step: int) -> None:
    if step < 1:
        raise ValueError(f"step must be >= 1 (1-based update count), got {step}.")


class Optimizer(ABC):
    """Updates one fp32 parameter tensor in place from its gradient and state."""

    name: ClassVar[str]

    @dataclass(kw_only=True)
    class Config:
        # Defaults follow torch.optim, except momentum (torch: 0) and AdamW's
        # weight_decay (torch: 1e-2): one shared config serves all three rules.
        name: Literal["sgd", "adam", "adamw"] = doc("update rule", default="adamw")
        lr: float = doc("learning rate, parameter units per gradient unit", default=1e-3)
        momentum: float = doc("SGD momentum factor, dimensionless (sgd only)", default=0.9)
        dampening: float = doc(
            "SGD dampening of the momentum, dimensionless (sgd only)", default=0.0
        )
        nesterov: bool = doc("SGD Nesterov momentum (sgd only)", default=False)
        weight_decay: float = doc(
            "weight decay coefficient, dimensionless "
            "(adamw: decoupled, param *= 1 - lr * wd; sgd/adam: L2, wd * param added to the grad)",
            default=0.0,
        )
        beta1: float = doc("first-moment decay, dimensionless (adam/adamw)", default=0.9)
        beta2: float = doc("second-moment decay, dimensionless (adam/adamw)", default=0.999)
        eps: float = doc("denominator term, gradient units (adam/adamw)", default=1e-8)
        nonfinite: Literal["error", "skip"] = doc(
            "what MemoryX does with a NaN/Inf gradient or update, which it never applies: "
            "error stops the run naming the layer and step; skip rolls the whole step back in "
            "every layer and counts it in num_skipped_steps (as torch.amp's GradScaler does)",
            default="error",
        )

        def __post_init__(self) -> None:
            # Every setting below that is out of range can only produce NaN/Inf weights.
            for field_name in (
                "lr",
                "momentum",
                "dampening",
                "weight_decay",
                "beta1",
                "beta2",
                "eps",
            ):
                value = getattr(self, field_name)
                if not math.isfinite(value):
                    raise ValueError(
                        f"{field_name} = {value} is not valid; it must be a finite number "
                        "(a NaN or infinite setting makes every weight NaN)."
                    )
            if not self.lr > 0:
                raise ValueError(f"lr must be > 0, got {self.lr}.")
            if not 0 <= self.momentum < 1:
                raise ValueError(f"momentum must be in [0, 1), got {self.momentum}.")
            if not 0 <= self.dampening <= 1:
                raise ValueError(f"dampening must be in [0, 1], got {self.dampening}.")
            if self.nesterov and (self.momentum == 0 or self.dampening != 0):
                raise ValueError(
                    "nesterov requires momentum > 0 and dampening == 0, got "
                    f"momentum={self.momentum} and dampening={self.dampening}."
                )
            if not self.weight_decay >= 0:
                raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}.")
            for field_name in ("beta1", "beta2"):
                value = getattr(self, field_name)
                if not 0 <= value < 1:
                    raise ValueError(f"{field_name} must be in [0, 1), got {value}.")
            if not self.eps > 0:
                raise ValueError(f"eps must be > 0, got {self.eps}.")

        def build(self) -> Optimizer:
            return OPTIMIZERS[self.name](self)

    def __init__(self, config: Optimizer.Config) -> None:
        if config.name != self.name:
            raise ValueError(
                f"name = {config.name!r} does not match {type(self).__name__}; "
                f"use Optimizer.Config(name={self.name!r}) or config.build()."
            )
        self.config = config

    @abstractmethod
    def init_state(self, param: Tensor) -> dict[str, Tensor]:
        """Fresh state for ``param``: named tensors of its shape (empty when stateless)."""

    @abstractmethod
    def _update(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], step: int) -> None:
        """The update rule proper, with ``grad`` left unmodified."""

    def update(
        self,
        param: Tensor,
        grad: Tensor,
        state: dict[str, Tensor],
        step: int,
        mask: Tensor | None = None,
    ) -> None:
        """In-place update of fp32 ``param`` with ``grad``.

        ``step`` is the 1-based count of updates applied to this param, this one
        included (Adam bias correction, SGD momentum initialisation). ``mask``
        (bool, shape of ``param``) marks pruned entries with True: after the
        update they are set to exactly zero in ``param`` and in every state
        tensor, so the state cannot revive them on a later step.
        """
        _check_step(step)
        if mask is not None and (mask.dtype != torch.bool or mask.shape != param.shape):
            raise ValueError(
                f"mask must be a bool tensor of shape {tuple(param.shape)}, "
                f"got {mask.dtype} of shape {tuple(mask.shape)}."
            )
        self._update(param, grad, state, step)
        if mask is not None:
            param.masked_fill_(mask, 0.0)
            for tensor in state.values():
                tensor.masked_fill_(mask, 0.0)

    def update_kept(
        self,
        param: Tensor,
        grad: Tensor,
        state: dict[str, Tensor],
        step: int,
        kept: Tensor,
    ) -> None:
        """``update`` with a mask, reading and writing only the entries the mask keeps.

        ``kept`` holds the kept entries' flat positions (int64, ascending; see
        ``core.mask_positions``). The pruned entries must already be
        zero in contiguous ``param`` and in every state tensor, as they are in
        every version of the parameter store: they are left as they are, which
        is what ``update(mask=...)`` would set them to. The update rule is the
        same elementwise one, so the kept entries come out bitwise equal to
        ``update(mask=...)``'s; a layer at sparsity 0.9 costs a tenth of the
        arithmetic, plus a gather and a scatter of its kept entries.
        """
        _check_step(step)
        flat_param = param.view(-1)
        kept_param = flat_param.index_select(0, kept)
        kept_state = {key: t.view(-1).index_select(0, kept) for key, t in state.items()}
        self._update(kept_param, grad.reshape(-1).index_select(0, kept), kept_state, step)
        flat_param.index_copy_(0, kept, kept_param)
        for key, tensor in state.items():
            tensor.view(-1).index_copy_(0, kept, kept_state[key])


class SGD(Optimizer):
    """``torch.optim.SGD``: optional L2 decay, momentum with dampening, Nesterov."""

    name = "sgd"

    def init_state(self, param: Tensor) -> dict[str, Tensor]:
        if self.config.momentum == 0:
            return {}
        return {"momentum_buffer": torch.zeros_like(param)}

    def _update(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], step: int) -> None:
        cfg = self.config
        if cfg.weight_decay != 0:
            grad = grad.add(param, alpha=cfg.weight_decay)
        if cfg.momentum != 0:
            buf = state["momentum_buffer"]
            # torch starts the buffer as a copy of the first gradient, undampened.
            if step == 1:
                buf.copy_(grad)
            else:
                buf.mul_(cfg.momentum).add_(grad, alpha=1 - cfg.dampening)
            grad = grad.add(buf, alpha=cfg.momentum) if cfg.nesterov else buf
        param.add_(grad, alpha=-cfg.lr)


class Adam(Optimizer):
    """``torch.optim.Adam`` (amsgrad off) with weight decay as an L2 gradient term."""

    name = "adam"

    def init_state(self, param: Tensor) -> dict[str, Tensor]:
        return {"exp_avg": torch.zeros_like(param), "exp_avg_sq": torch.zeros_like(param)}

    def _apply_weight_decay(self, param: Tensor, grad: Tensor) -> Tensor:
        """The gradient to use after weight decay; may decay ``param`` in place instead."""
        return grad.add(param, alpha=self.config.weight_decay)

    def _update(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], step: int) -> None:
        cfg = self.config
        if cfg.weight_decay != 0:
            grad = self._apply_weight_decay(param, grad)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(grad, 1 - cfg.beta1)
        exp_avg_sq.mul_(cfg.beta2).addcmul_(grad, grad, value=1 - cfg.beta2)
        # torch keeps its step counter as a float tensor and reads it back as float.
        step_f = float(step)
        bias_correction1 = 1 - cfg.beta1**step_f
        bias_correction2 = 1 - cfg.beta2**step_f
        step_size = cfg.lr / bias_correction1
        bias_correction2_sqrt = bias_correction2**0.5
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(cfg.eps)
        param.addcdiv_(exp_avg, denom, value=-step_size)


class AdamW(Adam):
    """``torch.optim.AdamW``: Adam with weight decay applied to the parameter first."""

    name = "adamw"

    def _apply_weight_decay(self, param: Tensor, grad: Tensor) -> Tensor:
        param.mul_(1 - self.config.lr * self.config.weight_decay)
        return grad


OPTIMIZERS: dict[str, type[Optimizer]] = {cls.name: cls for cls in (SGD, Adam, AdamW)}

__all__ = ["OPTIMIZERS", "SGD", "Adam", "AdamW", "Optimizer"]
