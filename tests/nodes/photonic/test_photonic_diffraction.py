"""Angular-spectrum propagation and Taichi-style diffractive units."""

from __future__ import annotations

import pytest
import torch

from nodes.photonic.diffraction import DiffractionMedium, MultiPathClassifier, TaichiUnit
from nodes.photonic.mesh import transfer_matrix

EXACT = 1e-12


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def medium(num_dims: int = 2, pitch: float = 1.2e-6) -> DiffractionMedium:
    # pitch >= wavelength / sqrt(2) (1.1 um at 1550 nm): every sampled wave propagates.
    return DiffractionMedium.Config(pixel_pitch_m=pitch, num_dims=num_dims).build()


def field(shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(3, *shape, dtype=torch.complex128, generator=gen(seed))


@pytest.mark.parametrize(("num_dims", "shape"), [(2, (16, 20)), (1, (64,))])
def test_lossless_propagation_conserves_energy(num_dims, shape):
    u = field(shape)
    out = medium(num_dims).propagator(shape, 50e-6).forward(u)
    dims = tuple(range(1, u.dim()))
    energy_in, energy_out = u.abs().pow(2).sum(dims), out.abs().pow(2).sum(dims)
    assert torch.allclose(energy_out, energy_in, rtol=EXACT)
    assert not torch.allclose(out, u)


def test_evanescent_waves_decay():
    shape = (32, 32)
    u = field(shape)
    out = medium(pitch=0.4e-6).propagator(shape, 5e-6).forward(u)
    assert (out.abs().pow(2).sum() < 0.9 * u.abs().pow(2).sum()).item()


def test_distance_zero_is_identity_and_distances_compose():
    shape = (16, 16)
    m = medium(pitch=0.5e-6)  # evanescent components too: composition must hold for them as well
    u = field(shape)
    assert (m.propagator(shape, 0.0).forward(u) - u).abs().max().item() < EXACT
    two_steps = m.propagator(shape, 7e-6).forward(m.propagator(shape, 11e-6).forward(u))
    one_step = m.propagator(shape, 18e-6).forward(u)
    assert (two_steps - one_step).abs().max().item() < 1e-10


def test_propagation_is_symmetric_so_its_reverse_is_itself():
    propagator = medium(num_dims=1).propagator((24,), 30e-6)
    a = transfer_matrix([propagator], 24)
    assert (a - a.T).abs().max().item() < EXACT
    u = field((24,))
    assert torch.equal(propagator.reverse(u), propagator.forward(u))


def test_negative_distance_and_bad_media_are_rejected():
    with pytest.raises(ValueError, match="distance_m = -1e-06"):
        medium().propagator((4, 4), -1e-6)
    with pytest.raises(ValueError, match="wavelength_m = 0"):
        DiffractionMedium.Config(wavelength_m=0)


def small_unit(**overrides) -> TaichiUnit.Config:
    settings = dict(input_side=4, pixels_per_input=2, num_channels=4, decoder_pixels=16)
    return TaichiUnit.Config(**(settings | overrides))


def test_taichi_unit_detects_non_negative_intensities():
    unit = small_unit(num_outputs=3).build(gen(0))
    out = unit(torch.rand(5, 4, 4, generator=gen(1), dtype=torch.float64))
    assert out.shape == (5, 3)
    assert torch.all(out >= 0)


def test_fixed_encoder_masks_do_not_train():
    unit = small_unit(trainable_encoder=False).build(gen(0))
    assert not unit.encoder.masks.requires_grad
    assert unit.decoder.masks.requires_grad


def test_multi_path_classifier_learns_a_toy_task():
    # Class = which half (left/right) of a 4 x 4 image is brighter.
    images = torch.rand(48, 4, 4, generator=gen(2), dtype=torch.float64)
    labels = (images[:, :, 2:].sum((1, 2)) > images[:, :, :2].sum((1, 2))).long()
    model = MultiPathClassifier(small_unit(), num_classes=2, paths_per_class=2, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert len(model.paths) == 4


def test_multi_path_needs_binary_paths():
    with pytest.raises(ValueError, match="num_outputs = 3"):
        MultiPathClassifier(small_unit(num_outputs=3), num_classes=2, paths_per_class=1, seed=0)
