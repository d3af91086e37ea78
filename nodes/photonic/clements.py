"""Clements decomposition of unitaries, SVD programs of arbitrary matrices, and tiling.

A unitary U (N x N) becomes N(N-1)/2 MZIs in a rectangular mesh of depth N
plus an output phase screen (Clements et al., Optica 3, 1460 (2016)), in the
MZI convention of ``mesh.py``. An arbitrary matrix W = U diag(S) V^H runs as
mesh(V^H) -> attenuators (S / gain, all <= 1) -> mesh(U), times a digital
``gain`` = the largest singular value. Matrices larger than the mesh are
split into mesh_size x mesh_size tiles whose outputs are summed after
detection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from nodes.photonic.elements import OpticalElement, propagate
from nodes.photonic.mesh import (
    Attenuators,
    MeshLayout,
    MeshPhases,
    attenuator_phases,
    mesh_elements,
    mesh_gradients,
    require_mesh_size,
    transfer_matrix,
)

TWO_PI = 2.0 * math.pi


def _null_from_right(a: complex, b: complex) -> tuple[float, float]:
    """(theta, phi) such that (row [a, b]) @ T^H has a zero first entry."""
    theta = 2.0 * math.atan2(abs(b), abs(a))
    phi = (_angle(a) - _angle(b) - math.pi) % TWO_PI
    return theta, phi


def _null_from_left(a: complex, b: complex) -> tuple[float, float]:
    """(theta, phi) such that T @ (column [a, b]) has a zero second entry."""
    theta = 2.0 * math.atan2(abs(a), abs(b))
    phi = (_angle(b) - _angle(a)) % TWO_PI
    return theta, phi


def _angle(z: complex) -> float:
    return math.atan2(z.imag, z.real)


def mzi_matrix(theta: float, phi: float) -> Tensor:
    """The 2 x 2 transfer matrix of one MZI (see ``mesh.py`` for the convention)."""
    s, c = math.sin(theta / 2), math.cos(theta / 2)
    e_phi = complex(math.cos(phi), math.sin(phi))
    pre = 1j * complex(math.cos(theta / 2), math.sin(theta / 2))
    return torch.tensor(
        [[pre * e_phi * s, pre * c], [pre * e_phi * c, -pre * s]], dtype=torch.complex128
    )


def clements_decompose(u_NN: Tensor, atol: float = 1e-6) -> MeshPhases:
    """Phases of a rectangular mesh that realizes the unitary ``u_NN`` (float64 phases)."""
    num_modes = u_NN.shape[-1]
    require_mesh_size(num_modes)
    u = u_NN.to(torch.complex128).clone()
    identity = torch.eye(num_modes, dtype=torch.complex128)
    if u.shape != (num_modes, num_modes) or not torch.allclose(u @ u.mH, identity, atol=atol):
        raise ValueError(
            f"clements_decompose needs a square unitary matrix; got shape {tuple(u.shape)} "
            f"with max |U U^H - I| = {(u @ u.mH - identity).abs().max().item():.3g} (tolerance {atol})."
        )
    right_ops: list[tuple[int, float, float]] = []
    left_ops: list[tuple[int, float, float]] = []
    for i in range(num_modes - 1):
        if i % 2 == 0:
            for j in range(i + 1):
                row, m = num_modes - 1 - j, i - j
                theta, phi = _null_from_right(complex(u[row, m]), complex(u[row, m + 1]))
                u[:, m : m + 2] = u[:, m : m + 2] @ mzi_matrix(theta, phi).mH
                right_ops.append((m, theta, phi))
        else:
            for j in range(1, i + 2):
                row, col = num_modes + j - i - 2, j - 1
                theta, phi = _null_from_left(complex(u[row - 1, col]), complex(u[row, col]))
                u[row - 1 : row + 1, :] = mzi_matrix(theta, phi) @ u[row - 1 : row + 1, :]
                left_ops.append((row - 1, theta, phi))
    diagonal = [complex(u[k, k]) for k in range(num_modes)]
    # Push each inverted left MZI through the diagonal: T^H D = D' T(theta, phi').
    moved: list[tuple[int, float, float]] = []
    for m, theta, phi in reversed(left_ops):
        d1, d2 = diagonal[m], diagonal[m + 1]
        factor = -complex(math.cos(theta), -math.sin(theta))
        diagonal[m] = factor * complex(math.cos(phi), -math.sin(phi)) * d2
        diagonal[m + 1] = factor * d2
        moved.append((m, theta, (_angle(d1) - _angle(d2)) % TWO_PI))
    # Light meets the right-side MZIs first, then the moved ones, innermost (last nulled) first.
    ordered = right_ops + moved
    return _place_on_mesh(num_modes, ordered, [_angle(d) % TWO_PI for d in diagonal])


def _place_on_mesh(
    num_modes: int, ordered: list[tuple[int, float, float]], screen: list[float]
) -> MeshPhases:
    layout = MeshLayout(num_modes)
    theta = torch.zeros(layout.num_columns, layout.num_slots, dtype=torch.float64)
    phi = torch.zeros_like(theta)
    depth = [0] * num_modes
    for m, t, p in ordered:
        column = max(depth[m], depth[m + 1])
        column += column % 2 != m % 2
        assert column < layout.num_columns, "Clements ordering must fit a depth-N rectangular mesh"
        theta[column, (m - column % 2) // 2] = t
        phi[column, (m - column % 2) // 2] = p
        depth[m] = depth[m + 1] = column + 1
    return MeshPhases(theta, phi, torch.tensor(screen, dtype=torch.float64))


def clements_reconstruct(phases: MeshPhases) -> Tensor:
    """The unitary realized by ideal (lossless, exact) mesh phases."""
    return transfer_matrix(mesh_elements(phases), phases.num_modes, torch.complex128)


@dataclass
class UnitPhases:
    """Every phase of one U diag(S) V^H unit: mesh(V^H), attenuators, mesh(U)."""

    v: MeshPhases
    atten_theta_N: Tensor
    atten_phi_N: Tensor
    u: MeshPhases

    @property
    def num_modes(self) -> int:
        return self.v.num_modes

    def tensors(self) -> list[Tensor]:
        """All phase tensors; the last axis of each is a row of neighbouring heaters."""
        return [*self.v.tensors(), self.atten_theta_N, self.atten_phi_N, *self.u.tensors()]

    @staticmethod
    def from_tensors(tensors: list[Tensor]) -> UnitPhases:
        return UnitPhases(
            MeshPhases.from_tensors(tensors[0:3]),
            tensors[3],
            tensors[4],
            MeshPhases.from_tensors(tensors[5:8]),
        )


def unit_elements(
    phases: UnitPhases,
    amplitudes: list[Tensor | None] | None = None,
    couplers: list[Tensor] | None = None,
) -> list[OpticalElement]:
    """The unit as optical elements; ``amplitudes`` = per-MZI transmission (v [C,P], atten [N], u [C,P]).

    ``couplers``: per-MZI splitting-angle errors of its two couplers (v [C,P,2], atten [N,2],
    u [C,P,2]); None for ideal 50:50 couplers.
    """
    v_amp, atten_amp, u_amp = amplitudes if amplitudes is not None else (None, None, None)
    v_cpl, atten_cpl, u_cpl = couplers if couplers is not None else (None, None, None)
    return [
        *mesh_elements(phases.v, v_amp, v_cpl),
        Attenuators(phases.atten_theta_N, phases.atten_phi_N, atten_amp, atten_cpl),
        *mesh_elements(phases.u, u_amp, u_cpl),
    ]


def unit_gradients(phases: UnitPhases, grads: list[tuple[Tensor, ...]]) -> UnitPhases:
    """Re-assemble per-element gradients (``unit_elements`` order) into a ``UnitPhases``."""
    num_mesh_elements = MeshLayout(phases.num_modes).num_columns + 1
    v_grads = grads[:num_mesh_elements]
    atten_theta, atten_phi = grads[num_mesh_elements]
    u_grads = grads[num_mesh_elements + 1 :]
    return UnitPhases(
        mesh_gradients(phases.v, v_grads), atten_theta, atten_phi, mesh_gradients(phases.u, u_grads)
    )


@dataclass
class MatrixProgram:
    """A matrix of at most mesh_size x mesh_size as phases of one unit and a digital gain."""

    phases: UnitPhases
    gain: float
    num_outputs: int
    num_inputs: int


def svd_decompose(w: Tensor, mesh_size: int | None = None) -> MatrixProgram:
    """Program ``w`` (real or complex, out x in) on one unit of ``mesh_size`` modes (default: fits)."""
    num_outputs, num_inputs = w.shape
    size = max(num_outputs, num_inputs) if mesh_size is None else mesh_size
    require_mesh_size(size)
    if max(num_outputs, num_inputs) > size:
        raise ValueError(
            f"a {num_outputs} x {num_inputs} matrix does not fit a mesh of {size} modes; "
            "tile it with tile_matrix or use mesh_size >= its largest dimension."
        )
    padded = torch.zeros(size, size, dtype=torch.complex128)
    padded[:num_outputs, :num_inputs] = w.to(torch.complex128)
    u, s, vh = torch.linalg.svd(padded)
    gain = s.max().item()
    attenuation = s / gain if gain > 0 else s
    atten_theta, atten_phi = attenuator_phases(attenuation.clamp(max=1.0))
    phases = UnitPhases(clements_decompose(vh), atten_theta, atten_phi, clements_decompose(u))
    return MatrixProgram(phases, gain, num_outputs, num_inputs)


def svd_reconstruct(program: MatrixProgram) -> Tensor:
    """The (complex) matrix an ideal unit realizes for ``program``."""
    size = program.phases.num_modes
    full = program.gain * transfer_matrix(unit_elements(program.phases), size, torch.complex128)
    return full[: program.num_outputs, : program.num_inputs]


@dataclass
class TiledProgram:
    """A large matrix as a grid of mesh_size x mesh_size tile programs (row-major)."""

    tiles: list[list[MatrixProgram]]
    mesh_size: int
    num_outputs: int
    num_inputs: int

    @property
    def num_tiles(self) -> int:
        return sum(len(row) for row in self.tiles)


def tile_matrix(w: Tensor, mesh_size: int) -> TiledProgram:
    """Split ``w`` into mesh_size x mesh_size tiles (zero padded) and program each."""
    require_mesh_size(mesh_size)
    num_outputs, num_inputs = w.shape
    tiles = [
        [
            svd_decompose(_tile(w, r, c, mesh_size), mesh_size)
            for c in range(0, num_inputs, mesh_size)
        ]
        for r in range(0, num_outputs, mesh_size)
    ]
    return TiledProgram(tiles, mesh_size, num_outputs, num_inputs)


def _tile(w: Tensor, row: int, col: int, size: int) -> Tensor:
    block = torch.zeros(size, size, dtype=torch.complex128)
    part = w[row : row + size, col : col + size]
    block[: part.shape[0], : part.shape[1]] = part
    return block


def tiled_reconstruct(program: TiledProgram) -> Tensor:
    """The full matrix the ideal tiles realize, cropped to the original shape."""
    rows = [torch.cat([svd_reconstruct(t) for t in row], dim=1) for row in program.tiles]
    return torch.cat(rows, dim=0)[: program.num_outputs, : program.num_inputs]


def tiled_apply(program: TiledProgram, x_BI: Tensor) -> Tensor:
    """y = W x through the ideal tiles, each tile's output detected and summed digitally."""
    size = program.mesh_size
    num_pad = len(program.tiles[0]) * size - program.num_inputs
    x = torch.nn.functional.pad(x_BI.to(torch.complex128), (0, num_pad))
    outputs = []
    for row in program.tiles:
        acc = 0
        for c, tile in enumerate(row):
            acc = acc + tile.gain * propagate(
                unit_elements(tile.phases), x[..., c * size : (c + 1) * size]
            )
        outputs.append(acc)
    return torch.cat(outputs, dim=-1)[..., : program.num_outputs]
