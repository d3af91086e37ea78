"""Fully forward mode gradients: equal to autograd of the system they run on."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from nodes.photonic.clements import UnitPhases, svd_decompose, unit_elements, unit_gradients
from nodes.photonic.diffraction import DiffractionMedium, DiffractiveStack
from nodes.photonic.elements import propagate, propagate_reverse
from nodes.photonic.ffm import ffm_backward, ffm_forward
from nodes.photonic.mesh import transfer_matrix
from nodes.photonic.preset import load_preset

EXACT = 1e-9


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def loss_and_error(out: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L = sum |E - t|^2 and e = dL/dE* = E - t."""
    return (out - target).abs().pow(2).sum(), (out - target).detach()


def autograd_phase_grads(phases: UnitPhases, circuit, x, target):
    leaves = [t.detach().clone().requires_grad_() for t in phases.tensors()]
    x_leaf = x.clone().requires_grad_()
    loss, _ = loss_and_error(propagate(circuit(UnitPhases.from_tensors(leaves)), x_leaf), target)
    loss.backward()
    # torch's complex gradient of a real loss is 2 dL/dz*.
    return [leaf.grad for leaf in leaves], x_leaf.grad / 2


def ffm_phase_grads(phases: UnitPhases, circuit, x, target):
    elements = circuit(phases)
    out, stored = ffm_forward(elements, x)
    _, error = loss_and_error(out, target)
    input_error, grads = ffm_backward(elements, stored, error)
    return unit_gradients(phases, grads).tensors(), input_error


def random_case(n: int = 6, seed: int = 0):
    g = gen(seed)
    program = svd_decompose(torch.randn(n, n, dtype=torch.float64, generator=g))
    x = torch.randn(16, n, dtype=torch.complex128, generator=g)
    target = torch.randn(16, n, dtype=torch.complex128, generator=g)
    return program, x, target


def test_noise_free_ffm_equals_autograd():
    program, x, target = random_case()
    expected, expected_input = autograd_phase_grads(program.phases, unit_elements, x, target)
    measured, measured_input = ffm_phase_grads(program.phases, unit_elements, x, target)
    for a, b in zip(expected, measured, strict=True):
        assert (a - b).abs().max().item() < EXACT
    assert (expected_input - measured_input).abs().max().item() < EXACT


def test_ffm_on_a_physical_device_gives_the_physical_gradient_not_the_twins():
    program, x, target = random_case(seed=1)
    config = dataclasses.replace(load_preset(), mesh_size=6, phase_quantization=None)
    device = config.build(seed=9)
    device.program(program)
    # Gradients w.r.t. the phases the light sees (offsets, gain errors and crosstalk applied).
    actual = device.actual_phases()
    physical_truth, _ = autograd_phase_grads(actual, device.circuit, x, target)
    measured, _ = ffm_phase_grads(actual, device.circuit, x, target)
    twin, _ = autograd_phase_grads(program.phases, unit_elements, x, target)
    flat = torch.cat([g.flatten() for g in measured])
    assert (flat - torch.cat([g.flatten() for g in physical_truth])).abs().max().item() < EXACT
    # The twin's gradient is a different vector: that is why training in situ matters.
    twin_flat = torch.cat([g.flatten() for g in twin])
    assert ((flat - twin_flat).norm() / twin_flat.norm()).item() > 0.1


def test_ffm_equals_autograd_of_the_device_wrt_commanded_phases_when_offsets_are_additive():
    # With only offsets and loss spread, d(actual)/d(commanded) = 1: the in-situ gradient is
    # exactly the gradient of the physical device's loss in the phases a user commands.
    program, x, target = random_case(seed=2)
    config = dataclasses.replace(
        load_preset(), mesh_size=6, phase_quantization=None, gain_error=None, crosstalk=None
    )
    device = config.build(seed=4)
    device.program(program)
    truth, _ = autograd_phase_grads(device.commanded, device.elements, x, target)
    measured, _ = ffm_phase_grads(device.commanded, device.elements, x, target)
    for a, b in zip(truth, measured, strict=True):
        assert (a - b).abs().max().item() < EXACT


def test_ffm_through_diffractive_phase_masks_equals_autograd():
    medium = DiffractionMedium.Config(pixel_pitch_m=1.5e-6).build()
    stack = DiffractiveStack(
        medium, (12, 12), num_masks=2, distance_m=30e-6, trainable=True, generator=gen(0)
    )
    x = torch.randn(4, 12, 12, dtype=torch.complex128, generator=gen(1))
    target = torch.randn(4, 12, 12, dtype=torch.complex128, generator=gen(2))
    loss, _ = loss_and_error(stack(x), target)
    loss.backward()
    elements = stack.elements()
    with torch.no_grad():
        out, stored = ffm_forward(elements, x)
        _, grads = ffm_backward(elements, stored, out - target)
    measured = torch.stack([g[0] for g in grads if g])
    assert (measured - stack.masks.grad).abs().max().item() < EXACT


def test_layers_without_a_forward_only_gradient_are_rejected():
    program, x, _ = random_case()
    elements = [*unit_elements(program.phases), torch.nn.ReLU()]
    with pytest.raises(
        ValueError, match="element .* is a ReLU, which has no forward-only gradient"
    ):
        ffm_forward(elements, x)


def test_reverse_launch_is_the_transpose_of_the_lossy_physical_circuit():
    program, _, _ = random_case(n=5, seed=3)
    device = dataclasses.replace(load_preset(), mesh_size=5).build(seed=1)
    device.program(program)
    elements = device.elements()
    forward = transfer_matrix(elements, 5)
    reverse = propagate_reverse(elements, torch.eye(5, dtype=torch.complex128)).T
    assert (reverse - forward.T).abs().max().item() < EXACT
    assert (forward - forward.T).abs().max().item() > 0.1  # a mesh is not symmetric in general
