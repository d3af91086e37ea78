"""Elements of the multi-path stages: the fused readout is exact, reverse launches transpose."""

from __future__ import annotations

import pytest
import torch

from nodes.photonic.diffraction import DiffractionMedium
from nodes.photonic.elements import propagate_reverse
from nodes.photonic.multipath_optics import Readout, SlabLaunch, region_matrix

EXACT = 1e-12


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_readout_is_propagation_then_overlap_with_the_regions():
    shape = (12, 12)
    medium = DiffractionMedium.Config(pixel_pitch_m=1.5e-6).build()
    propagator = medium.propagator(shape, 30e-6)
    regions = region_matrix(shape, 4)
    field = torch.randn(3, *shape, dtype=torch.complex128, generator=gen(1))
    direct = propagator.forward(field).flatten(-2) @ regions.to(torch.complex128)
    fused = Readout(propagator.transfer, regions).forward(field)
    assert (fused - direct).abs().max().item() < EXACT


def test_regions_are_unit_power_modes_across_the_centre_rows():
    regions = region_matrix((8, 8), 4).reshape(8, 8, 4)
    assert torch.allclose(regions.pow(2).sum(dim=(0, 1)), torch.ones(4, dtype=torch.float64))
    assert regions[3:5].count_nonzero() == regions.count_nonzero() == 16


@pytest.mark.parametrize(
    "element",
    [
        Readout(
            DiffractionMedium.Config(num_dims=1).build().propagator((16,), 20e-6).transfer,
            region_matrix((16,), 2),
        ),
        SlabLaunch(4, 16),
    ],
)
def test_reverse_launch_is_the_transpose(element):
    num_in = 16 if isinstance(element, Readout) else 4
    forward = element.forward(torch.eye(num_in, dtype=torch.complex128))  # row i: input mode i
    reverse = propagate_reverse([element], torch.eye(forward.shape[1], dtype=torch.complex128))
    assert (reverse - forward.T).abs().max().item() < EXACT
