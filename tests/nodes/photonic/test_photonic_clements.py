"""Clements decomposition, SVD programs and tiling: exact with no noise."""

from __future__ import annotations

import pytest
import torch

from nodes.photonic.clements import (
    clements_decompose,
    clements_reconstruct,
    mzi_matrix,
    svd_decompose,
    svd_reconstruct,
    tile_matrix,
    tiled_apply,
    tiled_reconstruct,
)
from nodes.photonic.mesh import MeshLayout, MZIColumn, MZIMesh, transfer_matrix

EXACT = 1e-9


@pytest.mark.parametrize("n", range(2, 17))
def test_random_unitaries_reconstruct_exactly(n):
    generator = torch.Generator().manual_seed(n)
    u = random_unitary(n, generator)
    phases = clements_decompose(u)
    assert (clements_reconstruct(phases) - u).abs().max().item() < EXACT


@pytest.mark.parametrize("n", [2, 3, 7, 8])
def test_mesh_has_n_choose_2_mzis_in_n_columns_and_unused_slots_stay_zero(n):
    layout = MeshLayout(n)
    assert layout.num_mzis == n * (n - 1) // 2
    assert layout.num_columns == n
    phases = clements_decompose(random_unitary(n, torch.Generator().manual_seed(0)))
    assert phases.theta_CP.shape == (n, n // 2)
    assert torch.all(phases.theta_CP[~layout.valid_CP] == 0)
    assert torch.all(phases.phi_CP[~layout.valid_CP] == 0)
    assert torch.all((phases.theta_CP >= 0) & (phases.theta_CP <= torch.pi + 1e-12))
    assert torch.all((phases.phi_CP >= 0) & (phases.phi_CP < 2 * torch.pi))


def test_mzi_column_matches_the_closed_form_mzi():
    theta, phi = 1.1, 2.3
    column = MZIColumn(
        0, torch.tensor([theta], dtype=torch.float64), torch.tensor([phi], dtype=torch.float64)
    )
    assert (transfer_matrix([column], 2) - mzi_matrix(theta, phi)).abs().max().item() < EXACT


@pytest.mark.parametrize("n", range(2, 17))
def test_random_real_matrices_reconstruct_exactly_via_svd(n):
    generator = torch.Generator().manual_seed(100 + n)
    w = torch.randn(n, n, dtype=torch.float64, generator=generator)
    program = svd_decompose(w)
    assert program.gain == pytest.approx(torch.linalg.matrix_norm(w, ord=2).item())
    attenuation = torch.sin(program.phases.atten_theta_N / 2)
    assert torch.all(attenuation <= 1.0 + 1e-12)
    assert (svd_reconstruct(program) - w).abs().max().item() < EXACT


def test_complex_and_rectangular_matrices_reconstruct_exactly():
    generator = torch.Generator().manual_seed(7)
    w = torch.randn(5, 5, dtype=torch.complex128, generator=generator)
    assert (svd_reconstruct(svd_decompose(w)) - w).abs().max().item() < EXACT
    tall = torch.randn(6, 3, dtype=torch.float64, generator=generator)
    program = svd_decompose(tall, mesh_size=8)
    assert program.phases.num_modes == 8
    assert (svd_reconstruct(program) - tall).abs().max().item() < EXACT


def test_zero_matrix_programs_full_attenuation():
    program = svd_decompose(torch.zeros(3, 3, dtype=torch.float64))
    assert svd_reconstruct(program).abs().max().item() < EXACT


def test_tiled_product_is_exact():
    generator = torch.Generator().manual_seed(3)
    w = torch.randn(37, 50, dtype=torch.float64, generator=generator)
    program = tile_matrix(w, mesh_size=16)
    assert program.num_tiles == 3 * 4
    assert (tiled_reconstruct(program) - w).abs().max().item() < EXACT
    x = torch.randn(5, 50, dtype=torch.float64, generator=generator)
    assert (tiled_apply(program, x) - x @ w.T).abs().max().item() < EXACT


@pytest.mark.parametrize("size", [0, -3])
def test_non_positive_mesh_sizes_are_rejected_with_the_number(size):
    with pytest.raises(ValueError, match=f"mesh_size = {size}"):
        MeshLayout(size)
    with pytest.raises(ValueError, match=f"mesh_size = {size}"):
        tile_matrix(torch.eye(4, dtype=torch.float64), size)


def test_non_unitary_and_oversized_inputs_are_rejected():
    with pytest.raises(ValueError, match="unitary"):
        clements_decompose(2 * torch.eye(3, dtype=torch.complex128))
    with pytest.raises(ValueError, match="does not fit a mesh of 4 modes"):
        svd_decompose(torch.ones(5, 3, dtype=torch.float64), mesh_size=4)


def test_mesh_phases_train_by_autograd():
    generator = torch.Generator().manual_seed(5)
    target = random_unitary(4, generator)
    mesh = MZIMesh.random(4, generator)
    optimizer = torch.optim.Adam(mesh.parameters(), lr=0.1)
    losses = []
    for _ in range(25):
        optimizer.zero_grad()
        loss = (mesh.transfer_matrix() - target).abs().pow(2).sum()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]


def random_unitary(n: int, generator: torch.Generator) -> torch.Tensor:
    """Haar-random unitary: QR of a complex Gaussian with the phases of R's diagonal removed."""
    a = torch.randn(n, n, dtype=torch.complex128, generator=generator)
    q, r = torch.linalg.qr(a)
    d = torch.diagonal(r)
    return q * (d / d.abs())
