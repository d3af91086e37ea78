"""Fully forward mode (FFM) gradients of phase parameters (Xue et al., Nature 2024; docs/hardware.md §4.2).

For a phase layer x_k = exp(i phi_k) a_k followed by reciprocal propagation
E_out = A_k x_k and an output error e = dL/dE_out*, the gradient is

    dL/dphi_k = -2 Im[(A_k^T conj(e)) * x_k].

A_k^T conj(e) is what arrives at layer k when conj(e) is launched into the
output side of the *same* hardware (reciprocity); for symmetric propagation
(A_k^T = A_k, e.g. free-space diffraction) that is simply a forward pass.
Both passes run on whatever elements are given, so on a physical device the
gradient is that of the physical device, errors included; no twin is used.

Only elements that are linear and reciprocal have such a gradient; anything
else (a detector, a digital layer) is refused with a ValueError.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from nodes.photonic.elements import OpticalElement


def check_forward_only(elements: Sequence[Any]) -> None:
    """Raise ValueError unless every element has a forward-only (reciprocal) gradient."""
    for index, element in enumerate(elements):
        if not isinstance(element, OpticalElement):
            raise ValueError(
                f"training = 'ffm' needs linear reciprocal optical elements; element {index} is a "
                f"{type(element).__name__}, which has no forward-only gradient (use 'backprop' or 'dfa')."
            )


def ffm_forward(elements: Sequence[OpticalElement], field: Tensor) -> tuple[Tensor, list[Any]]:
    """The forward pass, keeping the field each element's phase shifters saw."""
    check_forward_only(elements)
    stored = []
    for element in elements:
        field, kept = element.forward_stored(field)
        stored.append(kept)
    return field, stored


def ffm_backward(
    elements: Sequence[OpticalElement], stored: list[Any], error: Tensor
) -> tuple[Tensor, list[tuple[Tensor, ...]]]:
    """Launch conj(error) into the output side; gradients per element and the input-side error.

    ``error`` is dL/dE_out* (Wirtinger). Returns dL/dE_in* = conj(A^T conj(e))
    = A^H e, the error to hand to whatever fed the input, and for each element
    the tuple of its phase gradients (empty for elements without shifters).
    """
    check_forward_only(elements)
    reverse = error.conj()
    grads: list[tuple[Tensor, ...]] = [()] * len(elements)
    for index in range(len(elements) - 1, -1, -1):
        reverse, grads[index] = elements[index].reverse_gradient(reverse, stored[index])
    return reverse.conj(), grads
