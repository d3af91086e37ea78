"""Linear, reciprocal optical elements: the pieces every photonic circuit here is built from.

A circuit is a list of elements applied in order to a complex field whose
last dimension(s) are the optical modes (waveguides, or pixels of a plane);
leading dimensions are the batch. Each element can also run *in reverse*:
light launched from its output side. By reciprocity the reverse transfer is
the transpose of the forward one (not its adjoint), which is what lets
fully-forward-mode training measure gradients on the hardware itself.

Elements that carry phase shifters also keep the field that reached their
shifters in the forward pass and, in the reverse pass, interfere it with the
reverse field to give the gradient of each shifter's phase (docs/hardware.md
§4.2): dL/dphi = -2 Im[x_k * (A_k^T conj(e))].
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor

INV_SQRT2 = 1.0 / math.sqrt(2.0)


class OpticalElement(ABC):
    """A linear reciprocal element of a photonic circuit."""

    #: Number of trailing field dimensions that are modes (1: waveguides, 2: a plane).
    num_mode_dims: int = 1

    @abstractmethod
    def forward(self, field: Tensor) -> Tensor:
        """Field after the element for ``field`` launched at its input."""

    @abstractmethod
    def reverse(self, field: Tensor) -> Tensor:
        """Field leaving the input side for ``field`` launched into the output side (transpose)."""

    def forward_stored(self, field: Tensor) -> tuple[Tensor, Any]:
        """Forward pass that also keeps what the phase shifters saw (nothing by default)."""
        return self.forward(field), None

    def reverse_gradient(self, field: Tensor, stored: Any) -> tuple[Tensor, tuple[Tensor, ...]]:
        """Reverse pass plus the measured gradient of each phase tensor (none by default)."""
        return self.reverse(field), ()

    def _sum_batch(self, values: Tensor) -> Tensor:
        """Sum over every leading (batch) dimension, keeping the mode dimensions."""
        num_batch_dims = values.dim() - self.num_mode_dims
        return values.sum(dim=tuple(range(num_batch_dims))) if num_batch_dims else values


def beam_split(a: Tensor, b: Tensor, error_rad: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Symmetric coupler [[t, i r], [i r, t]]: its own transpose, so reverse = forward.

    Ideal: t = r = 1/sqrt(2) (50:50). ``error_rad`` is a fabricated coupler's deviation of
    the splitting angle from pi/4: t = cos(pi/4 + error), r = sin(pi/4 + error), a power
    split of (1 - sin(2 error)) / 2 : (1 + sin(2 error)) / 2.
    """
    if error_rad is None:
        return (a + 1j * b) * INV_SQRT2, (1j * a + b) * INV_SQRT2
    t = torch.cos(math.pi / 4 + error_rad)
    r = torch.sin(math.pi / 4 + error_rad)
    return t * a + 1j * r * b, 1j * r * a + t * b


def phase_gradient(stored_after_phase: Tensor, reverse_at_phase: Tensor) -> Tensor:
    """dL/dphi = -2 Im[x * r] per shifter, where r = A^T conj(e) is the reverse field there."""
    return -2.0 * (stored_after_phase * reverse_at_phase).imag


class PhaseScreen(OpticalElement):
    """One phase shifter per mode: a diagonal exp(i phi); also a diffractive phase mask."""

    def __init__(self, phase: Tensor) -> None:
        self.phase = phase
        self.num_mode_dims = phase.dim()
        self._factor = torch.polar(torch.ones_like(phase), phase)

    def forward(self, field: Tensor) -> Tensor:
        return field * self._factor

    def reverse(self, field: Tensor) -> Tensor:
        return field * self._factor

    def forward_stored(self, field: Tensor) -> tuple[Tensor, Any]:
        out = self.forward(field)
        return out, out

    def reverse_gradient(self, field: Tensor, stored: Any) -> tuple[Tensor, tuple[Tensor, ...]]:
        grad = self._sum_batch(phase_gradient(stored, field))
        return self.reverse(field), (grad,)


def propagate(elements: list[OpticalElement], field: Tensor) -> Tensor:
    """Launch ``field`` through ``elements`` in order."""
    for element in elements:
        field = element.forward(field)
    return field


def propagate_reverse(elements: list[OpticalElement], field: Tensor) -> Tensor:
    """Launch ``field`` into the output side of ``elements`` (the transpose of ``propagate``)."""
    for element in reversed(elements):
        field = element.reverse(field)
    return field
