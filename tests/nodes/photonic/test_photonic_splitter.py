"""Coupler splitting errors: their statistics, the coupler they make, and the circuits built from them."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from nodes.photonic.clements import svd_decompose, unit_elements, unit_gradients
from nodes.photonic.elements import beam_split
from nodes.photonic.ffm import ffm_backward, ffm_forward
from nodes.photonic.mesh import MZIMesh, mesh_elements, transfer_matrix
from nodes.photonic.nonideal import PhaseError, SplitterImbalance
from nodes.photonic.preset import load_preset


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_coupler_errors_are_normal_with_the_configured_std():
    errors = SplitterImbalance.Config(sigma_rad=0.02).build((250, 200), gen(0)).error_rad
    assert errors.shape == (250, 200, 2)
    assert errors.mean().item() == pytest.approx(0.0, abs=0.02 * 0.01)
    assert errors.std().item() == pytest.approx(0.02, rel=0.02)
    kurtosis = ((errors / errors.std()) ** 4).mean().item()
    assert kurtosis == pytest.approx(3.0, rel=0.03)


def test_an_imbalanced_coupler_is_lossless_and_splits_as_documented():
    error = torch.tensor([-0.1, 0.0, 0.02, 0.3], dtype=torch.float64)
    one, zero = torch.ones(4, dtype=torch.complex128), torch.zeros(4, dtype=torch.complex128)
    out_a, out_b = beam_split(one, zero, error)
    assert torch.allclose(out_a.abs() ** 2 + out_b.abs() ** 2, torch.ones(4, dtype=torch.float64))
    assert torch.allclose(out_b.abs() ** 2, (1 + torch.sin(2 * error)) / 2)
    ideal_a, ideal_b = beam_split(one, zero)
    assert torch.allclose(out_a[1], ideal_a[1]) and torch.allclose(out_b[1], ideal_b[1])


def test_meshes_with_imbalanced_couplers_stay_unitary_but_differ():
    mesh = MZIMesh.random(8, gen(1))
    couplers = SplitterImbalance.Config(sigma_rad=0.05).build((8, 4), gen(2)).error_rad
    with torch.no_grad():
        ideal = transfer_matrix(mesh_elements(mesh.phases), 8)
        imbalanced = transfer_matrix(mesh_elements(mesh.phases, None, couplers), 8)
    eye = torch.eye(8, dtype=torch.complex128)
    assert (imbalanced @ imbalanced.conj().T - eye).abs().max().item() < 1e-12
    assert (imbalanced - ideal).abs().max().item() > 1e-3


def test_ffm_gradients_through_imbalanced_couplers_equal_autograd():
    w = torch.randn(6, 6, dtype=torch.float64, generator=gen(3))
    program = svd_decompose(w, 6)
    couplers = [
        SplitterImbalance.Config(sigma_rad=0.05).build(shape, gen(4 + i)).error_rad
        for i, shape in enumerate(((6, 3), (6,), (6, 3)))
    ]
    x = torch.randn(5, 6, dtype=torch.complex128, generator=gen(7))
    target = torch.randn(5, 6, dtype=torch.complex128, generator=gen(8))
    phases = [t.clone().requires_grad_() for t in program.phases.tensors()]
    elements = unit_elements(type(program.phases).from_tensors(phases), None, couplers)
    field = x
    for element in elements:
        field = element.forward(field)
    loss = (field - target).abs().pow(2).sum()
    loss.backward()
    with torch.no_grad():
        plain = unit_elements(program.phases, None, couplers)
        out, stored = ffm_forward(plain, x)
        _, grads = ffm_backward(plain, stored, out - target)
    measured = unit_gradients(program.phases, grads).tensors()
    for expected, got in zip(phases, measured, strict=True):
        assert (expected.grad - got).abs().max().item() < 1e-9


def test_splitter_errors_are_seeded_and_leave_the_other_fabrication_errors_alone():
    base = dataclasses.replace(load_preset("photonic_uncalibrated"), mesh_size=8)
    without = dataclasses.replace(base, splitter_imbalance=None).build(5)
    with_a, with_b, other = (base.build(seed) for seed in (5, 5, 6))
    assert without.coupler_errors() is None
    errors = (with_a.coupler_errors(), with_b.coupler_errors(), other.coupler_errors())
    for a, b, c in zip(*errors, strict=True):
        assert torch.equal(a, b) and not torch.equal(a, c)
    for mine, theirs in zip(with_a._phase_effects, without._phase_effects, strict=True):
        offsets = [e.offset_rad for e in mine if isinstance(e, PhaseError)]
        assert torch.equal(
            offsets[0], [e.offset_rad for e in theirs if isinstance(e, PhaseError)][0]
        )


def test_calibration_cannot_undo_splitter_errors():
    w = torch.randn(6, 5, dtype=torch.float64, generator=gen(0))
    x = torch.randn(32, 5, dtype=torch.float64, generator=gen(1))
    exact = dataclasses.replace(
        load_preset(),
        mesh_size=8,
        phase_quantization=None,
        gain_error=None,
        crosstalk=None,
        phase_error=None,
        insertion_loss=None,
        detection_noise=None,
        readout=None,
    )
    device = exact.build(5)
    device.program(svd_decompose(w, 8))
    reference = x @ w.T
    error = ((device.matmul(x).real - reference).norm() / reference.norm()).item()
    assert 1e-3 < error < 0.2


def test_bad_splitter_imbalance_is_rejected():
    with pytest.raises(ValueError, match=r"splitter_imbalance.sigma_rad = -0.1"):
        SplitterImbalance.Config(sigma_rad=-0.1)
