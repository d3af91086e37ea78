"""Checks of gradients and weights before MemoryX applies or keeps them: their layout,
and whether they hold a NaN or an infinity."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor


def nonfinite_names(tensors: Mapping[str, Tensor]) -> list[str]:
    """Names of the tensors holding a NaN or Inf."""
    return [name for name, t in tensors.items() if not all_finite(t)]


def all_finite(tensor: Tensor) -> bool:
    """True if no value of ``tensor`` is NaN or infinite.

    A NaN or an infinity makes the sum NaN or infinite, so a finite sum means every value
    is finite; only a sum that is not finite (finite values may also overflow it) needs the
    value-by-value check. The sum reads the tensor once; ``torch.isfinite(t).all()`` writes
    and reads a bool tensor and is some 50x slower here, on every weight and gradient of
    every step.
    """
    if not tensor.is_floating_point() or bool(torch.isfinite(tensor.sum())):
        return True
    return bool(torch.isfinite(tensor).all())


def check_grads(
    layer: int, layout: list[tuple[str, tuple[int, ...]]], grads: Mapping[str, Tensor]
) -> None:
    """ValueError unless ``grads`` are float32 tensors of exactly ``layout``."""
    names = [name for name, _ in layout]
    missing = [name for name in names if name not in grads]
    unknown = [name for name in grads if name not in names]
    if missing or unknown:
        raise ValueError(
            f"gradients of layer {layer} must cover exactly {names}; "
            f"missing {missing}, unknown {unknown}."
        )
    for name, shape in layout:
        grad = grads[name]
        if tuple(grad.shape) != shape or grad.dtype != torch.float32:
            raise ValueError(
                f"gradient of layer {layer} param {name!r} must be float32 of shape "
                f"{shape}, got {grad.dtype} of shape {tuple(grad.shape)}."
            )


def nonfinite_gradient(grads: Mapping[str, Tensor]) -> str | None:
    """None, or why a gradient must not be applied: some tensor holds NaN or Inf."""
    bad = nonfinite_names(grads)
    if bad:
        return f"the gradient of {', '.join(map(repr, bad))} holds NaN or Inf values"
    return None


__all__ = ["all_finite", "check_grads", "nonfinite_gradient", "nonfinite_names"]
