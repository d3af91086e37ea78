"""Taichi's multi-path model as streamed stages: same function as MultiPathClassifier, physical
optics, and fully forward mode gradients."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from nodes.photonic.diffraction import MultiPathClassifier, TaichiUnit
from nodes.photonic.layer import PHASE_NAMES
from nodes.photonic.multipath import TaichiMultiPath
from nodes.photonic.multipath_optics import PhysicalOptics, use_optics
from nodes.photonic.preset import load_preset

EXACT = 1e-12


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def small_unit(**overrides) -> TaichiUnit.Config:
    settings = dict(input_side=4, pixels_per_input=2, num_channels=4, decoder_pixels=16)
    return TaichiUnit.Config(**(settings | overrides))


def small_model(**unit_overrides) -> torch.nn.Sequential:
    config = TaichiMultiPath.Config(
        num_classes=3, paths_per_class=2, unit=small_unit(**unit_overrides)
    )
    return config.build(gen(0)).double()  # float64 phases: comparisons at 1e-12


def test_stages_compute_multipath_classifiers_function():
    # The streamed stages are MultiPathClassifier re-cut: same phases, same logits (detected
    # powers differ by a constant factor, which the contrast divides out).
    unit = small_unit(num_encoder_masks=2)
    reference = MultiPathClassifier(unit, num_classes=3, paths_per_class=2, seed=0)
    model = TaichiMultiPath.Config(num_classes=3, paths_per_class=2, unit=unit).build().double()
    encoder, embedding, decoder = model
    with torch.no_grad():
        for p, path in enumerate(reference.paths):
            encoder.masks[p] = path.encoder.masks
            decoder.masks[p] = path.decoder.masks
            for name, value in zip(PHASE_NAMES, path.embedding, strict=True):
                getattr(embedding, name)[p] = value
        decoder.scale.copy_(reference.scale)
    images = torch.rand(5, 4, 4, generator=gen(2), dtype=torch.float64)
    expected = reference(images)
    got = model(images.reshape(5, 16))
    assert (got - expected).abs().max().item() < 1e-5  # logits leave the model as float32
    assert expected.std().item() > 0.1


def test_fixed_encoder_masks_are_structure_not_parameters():
    model = small_model(trainable_encoder=False)
    assert not list(model[0].parameters())
    assert all("0." not in name for name in model.state_dict())
    assert model[0].masks.shape == (6, 1, 8, 8)


def test_parameters_are_float32_phases_for_the_wire():
    model = TaichiMultiPath.Config(num_classes=3, unit=small_unit()).build(gen(0))
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    masks = model[0].masks
    assert masks.min().item() >= 0 and masks.max().item() < 2 * torch.pi


def test_physical_optics_with_an_ideal_device_is_the_twin():
    model = small_model()
    x = torch.rand(4, 16, generator=gen(3), dtype=torch.float64)
    twin = PhysicalOptics(load_preset().twin(), seed=0, num_cores=1)
    with torch.no_grad():
        expected = model(x)
        with use_optics(twin.at(0, ffm=False)):
            same = model(x)
        with use_optics(PhysicalOptics(load_preset(), seed=0, num_cores=1).at(0, ffm=False)):
            physical = model(x)
    assert (same - expected).abs().max().item() < 1e-5
    assert (physical - expected).abs().max().item() > 0.1


def test_hidden_errors_stay_fixed_and_depend_on_the_seed():
    model = small_model()
    x = torch.rand(4, 16, generator=gen(3), dtype=torch.float64)
    noiseless = dataclasses.replace(load_preset(), detection_noise=None)

    def run(optics: PhysicalOptics, layer: int = 0) -> torch.Tensor:
        with torch.no_grad(), use_optics(optics.at(layer, ffm=False)):
            return model(x)

    node = PhysicalOptics(noiseless, seed=1, num_cores=2)
    assert torch.equal(run(node), run(node))
    assert not torch.equal(run(node), run(PhysicalOptics(noiseless, seed=2, num_cores=2)))
    assert not torch.equal(run(node), run(node, layer=1))  # each layer's masks have their own


def test_ffm_gradients_equal_autograd_of_the_physical_optics():
    # Additive phase offsets and MZI loss: d(actual)/d(commanded) = 1, and without detector
    # noise or ADC the in-situ gradient is exactly that of the physical model.
    model = small_model(num_encoder_masks=2, num_decoder_masks=2)
    device = dataclasses.replace(
        load_preset(),
        phase_quantization=None,
        gain_error=None,
        crosstalk=None,
        detection_noise=None,
        readout=None,
    )
    optics = PhysicalOptics(device, seed=3, num_cores=2)
    x = torch.rand(5, 16, generator=gen(4), dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0, 1])

    def gradients(ffm: bool) -> dict[str, torch.Tensor]:
        model.zero_grad()
        with use_optics(optics.at(0, ffm=ffm)):
            torch.nn.functional.cross_entropy(model(x), labels).backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    autograd, measured = gradients(ffm=False), gradients(ffm=True)
    assert len(autograd) == 1 + len(PHASE_NAMES) + 2
    for name, grad in autograd.items():
        assert (measured[name] - grad).abs().max().item() < 1e-10, name
        assert grad.abs().max().item() > 1e-4, name


def test_wrong_input_size_and_bad_configs_are_named():
    with pytest.raises(ValueError, match="input_side = 4 needs 16 inputs per sample"):
        small_model()(torch.rand(2, 64))
    with pytest.raises(ValueError, match="unit.num_outputs = 3 is not valid"):
        TaichiMultiPath.Config(unit=small_unit(num_outputs=3))
    with pytest.raises(ValueError, match="paths_per_class = 0 is not valid"):
        TaichiMultiPath.Config(paths_per_class=0)
    with pytest.raises(ValueError, match="unit.num_encoder_masks = 0 is not valid"):
        TaichiMultiPath.Config(unit=small_unit(num_encoder_masks=0))
    with pytest.raises(ValueError, match="unit.num_decoder_masks = 0 is not valid"):
        TaichiMultiPath.Config(unit=small_unit(num_decoder_masks=0))


def test_a_fixed_encoder_without_masks_feeds_every_path_the_same_channels():
    model = small_model(num_encoder_masks=0, trainable_encoder=False)
    channels = model[0](torch.rand(3, 16, generator=gen(5)))
    assert channels.shape == (3, 6, 4, 2)
    assert torch.equal(channels[:, 0], channels[:, 5])
    assert model(torch.rand(3, 16, generator=gen(5))).shape == (3, 3)
