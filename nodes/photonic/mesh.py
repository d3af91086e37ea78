"""Differentiable forward model of Clements (rectangular) MZI meshes, built column by column.

Conventions (shared by the decomposition in ``clements.py``):

- An MZI on modes (m, m+1) is an external phase shifter ``phi`` on the upper
  input arm, a 50:50 coupler, an internal shifter ``theta`` on the upper arm
  and a second coupler: T = BS diag(e^{i theta}, 1) BS diag(e^{i phi}, 1)
  = i e^{i theta/2} [[e^{i phi} sin(theta/2), cos(theta/2)],
                      [e^{i phi} cos(theta/2), -sin(theta/2)]].
- An N-mode mesh has N columns; column c holds MZIs on pairs
  (c % 2 + 2p, c % 2 + 2p + 1). Phases are stored as ``[C, P]`` tensors with
  P = N // 2 slots; when N is even the last slot of odd columns is unused
  (kept at 0). Neighbouring slots of a column are neighbouring heaters.
- A mesh ends with an output phase screen (one shifter per mode).
- Fields are ``(..., N)`` row vectors; ``forward`` computes y = M x for each.

Insertion loss is applied inside each MZI, so a path's loss compounds with
the number of MZIs it crosses (the optical depth). Phase non-idealities act
on the phases before they reach this model (see ``nonideal.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from nodes.photonic.elements import (
    OpticalElement,
    PhaseScreen,
    beam_split,
    phase_gradient,
    propagate,
)


def require_mesh_size(num_modes: int) -> None:
    if num_modes < 1:
        raise ValueError(
            f"mesh_size = {num_modes} is not valid; it must be a positive number of modes."
        )


class MeshLayout:
    """Where the MZIs of an N-mode rectangular mesh sit."""

    def __init__(self, num_modes: int) -> None:
        require_mesh_size(num_modes)
        self.num_modes = num_modes
        self.num_columns = num_modes if num_modes > 1 else 0
        self.num_slots = num_modes // 2
        self.pairs_per_column = [(num_modes - c % 2) // 2 for c in range(self.num_columns)]
        valid = torch.zeros(self.num_columns, self.num_slots, dtype=torch.bool)
        for c, num_pairs in enumerate(self.pairs_per_column):
            valid[c, :num_pairs] = True
        self.valid_CP = valid

    @property
    def num_mzis(self) -> int:
        return sum(self.pairs_per_column)


def _coupler(couplers: Tensor | None, index: int) -> Tensor | None:
    """Splitting-angle errors of the first (0) or second (1) coupler of each MZI, or None."""
    return None if couplers is None else couplers[..., index]


def mzi_forward(
    a: Tensor, b: Tensor, theta: Tensor, phi: Tensor, couplers: Tensor | None = None
) -> tuple[Tensor, ...]:
    """Outputs of MZIs with inputs (a, b), plus the fields just after the phi and theta shifters.

    ``couplers``: ``[..., 2]`` splitting-angle errors of each MZI's two couplers (None: 50:50).
    """
    a1 = a * torch.polar(torch.ones_like(phi), phi)
    a2, b2 = beam_split(a1, b, _coupler(couplers, 0))
    a3 = a2 * torch.polar(torch.ones_like(theta), theta)
    out_a, out_b = beam_split(a3, b2, _coupler(couplers, 1))
    return out_a, out_b, a1, a3


def mzi_reverse(
    ra: Tensor, rb: Tensor, theta: Tensor, phi: Tensor, couplers: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Reverse fields at the MZI inputs, plus those reaching the phi and theta shifters."""
    r3a, r3b = beam_split(ra, rb, _coupler(couplers, 1))
    r1a, r1b = beam_split(
        r3a * torch.polar(torch.ones_like(theta), theta), r3b, _coupler(couplers, 0)
    )
    return r1a * torch.polar(torch.ones_like(phi), phi), r1b, r1a, r3a


class MZIColumn(OpticalElement):
    """One column of MZIs on disjoint neighbouring pairs, starting at ``first_mode``."""

    def __init__(
        self,
        first_mode: int,
        theta_P: Tensor,
        phi_P: Tensor,
        amplitude_P: Tensor | None = None,
        couplers_P2: Tensor | None = None,
    ) -> None:
        self.first_mode = first_mode
        self.end_mode = first_mode + 2 * theta_P.shape[-1]
        self.theta_P = theta_P
        self.phi_P = phi_P
        self.amplitude_P = amplitude_P
        self.couplers_P2 = couplers_P2

    def _split(self, field: Tensor) -> tuple[Tensor, Tensor]:
        return (
            field[..., self.first_mode : self.end_mode : 2],
            field[..., self.first_mode + 1 : self.end_mode : 2],
        )

    def _join(self, field: Tensor, a: Tensor, b: Tensor) -> Tensor:
        pairs = torch.stack([a, b], dim=-1).flatten(-2)
        return torch.cat(
            [field[..., : self.first_mode], pairs, field[..., self.end_mode :]], dim=-1
        )

    def _lossy(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        if self.amplitude_P is None:
            return a, b
        return a * self.amplitude_P, b * self.amplitude_P

    def forward_stored(self, field: Tensor) -> tuple[Tensor, Any]:
        out_a, out_b, a1, a3 = mzi_forward(
            *self._split(field), self.theta_P, self.phi_P, self.couplers_P2
        )
        return self._join(field, *self._lossy(out_a, out_b)), (a1, a3)

    def forward(self, field: Tensor) -> Tensor:
        return self.forward_stored(field)[0]

    def reverse_gradient(self, field: Tensor, stored: Any) -> tuple[Tensor, tuple[Tensor, ...]]:
        a1, a3 = stored
        r0a, r0b, r1a, r3a = mzi_reverse(
            *self._lossy(*self._split(field)), self.theta_P, self.phi_P, self.couplers_P2
        )
        grads = (self._sum_batch(phase_gradient(a3, r3a)), self._sum_batch(phase_gradient(a1, r1a)))
        return self._join(field, r0a, r0b), grads

    def reverse(self, field: Tensor) -> Tensor:
        r0a, r0b, _, _ = mzi_reverse(
            *self._lossy(*self._split(field)), self.theta_P, self.phi_P, self.couplers_P2
        )
        return self._join(field, r0a, r0b)


class Attenuators(OpticalElement):
    """One MZI per mode used as a variable attenuator: light enters and leaves the upper port.

    The lower input is dark and the lower output is dumped, so the mode sees
    i e^{i theta/2} e^{i phi} sin(theta/2): |s| <= 1 set by theta, its phase by phi.
    """

    def __init__(
        self,
        theta_N: Tensor,
        phi_N: Tensor,
        amplitude_N: Tensor | None = None,
        couplers_N2: Tensor | None = None,
    ) -> None:
        self.theta_N = theta_N
        self.phi_N = phi_N
        self.amplitude_N = amplitude_N
        self.couplers_N2 = couplers_N2

    def _lossy(self, field: Tensor) -> Tensor:
        return field if self.amplitude_N is None else field * self.amplitude_N

    def forward_stored(self, field: Tensor) -> tuple[Tensor, Any]:
        out_a, _dumped, a1, a3 = mzi_forward(
            field, torch.zeros_like(field), self.theta_N, self.phi_N, self.couplers_N2
        )
        return self._lossy(out_a), (a1, a3)

    def forward(self, field: Tensor) -> Tensor:
        return self.forward_stored(field)[0]

    def reverse_gradient(self, field: Tensor, stored: Any) -> tuple[Tensor, tuple[Tensor, ...]]:
        a1, a3 = stored
        ra = self._lossy(field)
        r0a, _dark, r1a, r3a = mzi_reverse(
            ra, torch.zeros_like(ra), self.theta_N, self.phi_N, self.couplers_N2
        )
        grads = (self._sum_batch(phase_gradient(a3, r3a)), self._sum_batch(phase_gradient(a1, r1a)))
        return r0a, grads

    def reverse(self, field: Tensor) -> Tensor:
        ra = self._lossy(field)
        return mzi_reverse(ra, torch.zeros_like(ra), self.theta_N, self.phi_N, self.couplers_N2)[0]


def attenuator_phases(s_N: Tensor) -> tuple[Tensor, Tensor]:
    """(theta, phi) that make each attenuator transmit the real amplitude s in [0, 1]."""
    theta = 2.0 * torch.asin(s_N)
    phi = torch.remainder(-0.5 * torch.pi - 0.5 * theta, 2.0 * torch.pi)
    return theta, phi


@dataclass
class MeshPhases:
    """All phases of one Clements mesh: MZIs in ``[C, P]`` layout and the output screen."""

    theta_CP: Tensor
    phi_CP: Tensor
    screen_N: Tensor

    @property
    def num_modes(self) -> int:
        return self.screen_N.shape[-1]

    def tensors(self) -> list[Tensor]:
        return [self.theta_CP, self.phi_CP, self.screen_N]

    @staticmethod
    def from_tensors(tensors: list[Tensor]) -> MeshPhases:
        return MeshPhases(*tensors)


def mesh_elements(
    phases: MeshPhases, amplitude_CP: Tensor | None = None, couplers_CP2: Tensor | None = None
) -> list[OpticalElement]:
    """The mesh as a list of optical elements: its MZI columns, then the output phase screen."""
    layout = MeshLayout(phases.num_modes)
    elements: list[OpticalElement] = []
    for c, num_pairs in enumerate(layout.pairs_per_column):
        elements.append(
            MZIColumn(
                c % 2,
                phases.theta_CP[c, :num_pairs],
                phases.phi_CP[c, :num_pairs],
                None if amplitude_CP is None else amplitude_CP[c, :num_pairs],
                None if couplers_CP2 is None else couplers_CP2[c, :num_pairs],
            )
        )
    elements.append(PhaseScreen(phases.screen_N))
    return elements


def mesh_gradients(phases: MeshPhases, grads: list[tuple[Tensor, ...]]) -> MeshPhases:
    """Re-assemble per-element gradients (from ``mesh_elements`` order) into the ``[C, P]`` layout."""
    grad_theta = torch.zeros_like(phases.theta_CP)
    grad_phi = torch.zeros_like(phases.phi_CP)
    for c, (g_theta, g_phi) in enumerate(grads[:-1]):
        grad_theta[c, : g_theta.shape[-1]] = g_theta
        grad_phi[c, : g_phi.shape[-1]] = g_phi
    (grad_screen,) = grads[-1]
    return MeshPhases(grad_theta, grad_phi, grad_screen)


def transfer_matrix(
    elements: list[OpticalElement], num_modes: int, dtype=torch.complex128
) -> Tensor:
    """The N x N matrix of a circuit, from launching each unit vector."""
    return propagate(elements, torch.eye(num_modes, dtype=dtype)).transpose(0, 1)


class MZIMesh(torch.nn.Module):
    """A mesh whose phases are trainable parameters (an ideal, lossless twin by default)."""

    def __init__(self, phases: MeshPhases) -> None:
        super().__init__()
        self.theta_CP = torch.nn.Parameter(phases.theta_CP.clone())
        self.phi_CP = torch.nn.Parameter(phases.phi_CP.clone())
        self.screen_N = torch.nn.Parameter(phases.screen_N.clone())

    @staticmethod
    def random(num_modes: int, generator: torch.Generator, dtype=torch.float64) -> MZIMesh:
        layout = MeshLayout(num_modes)
        shape = (layout.num_columns, layout.num_slots)

        def uniform(*size: int) -> Tensor:
            return torch.rand(size, generator=generator, dtype=dtype) * 2 * torch.pi

        theta = uniform(*shape) * layout.valid_CP
        phi = uniform(*shape) * layout.valid_CP
        return MZIMesh(MeshPhases(theta, phi, uniform(num_modes)))

    @property
    def phases(self) -> MeshPhases:
        return MeshPhases(self.theta_CP, self.phi_CP, self.screen_N)

    def forward(self, field: Tensor) -> Tensor:
        return propagate(mesh_elements(self.phases), field)

    def transfer_matrix(self) -> Tensor:
        dtype = torch.complex128 if self.theta_CP.dtype == torch.float64 else torch.complex64
        return transfer_matrix(mesh_elements(self.phases), self.phases.num_modes, dtype)
