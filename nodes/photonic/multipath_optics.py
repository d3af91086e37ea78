"""The optics of the multi-path stages (``multipath.py``): elements and the hardware they run on.

Elements move light between planes and waveguides on a leading path axis: angular-spectrum
propagation, the last propagation fused with the overlap into waveguide or detector modes
(``Readout``), and waveguides ending in a slab (``SlabLaunch``). ``IdealOptics`` is the
digital twin; ``PhysicalOptics`` is a node's hardware, whose non-idealities (and what stays
ideal) ``multipath.py``'s docstring lists. ``use_optics`` picks one for the stages of a block.
"""

from __future__ import annotations

import contextvars
import copy
import dataclasses
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from nodes.photonic.calibration import PhaseController, build_controllers
from nodes.photonic.device import PhotonicCore
from nodes.photonic.elements import OpticalElement
from nodes.photonic.layer import Tiles, tile_elements
from nodes.photonic.nonideal import PhaseEffect

# ---- Optical elements of the stages ------------------------------------------------------


class Propagation(OpticalElement):
    """Free propagation by the angular-spectrum transfer ``h``; symmetric, so its own reverse."""

    def __init__(self, h: Tensor) -> None:
        self.h = h
        self.num_mode_dims = h.dim()
        self.dims = tuple(range(-h.dim(), 0))

    def forward(self, field: Tensor) -> Tensor:
        spectrum = torch.fft.fftn(field, dim=self.dims)
        return torch.fft.ifftn(spectrum * self.h.to(field.device), dim=self.dims)

    def reverse(self, field: Tensor) -> Tensor:
        return self.forward(field)


class Readout(OpticalElement):
    """Last propagation, then overlap with flat modes: fields ``[..., *plane]`` -> ``[..., R]``.

    One linear map of the spectrum: out = fftn(field) @ k, where k[f, r] is h[f] times the
    overlap of plane wave f with region r. The DFT matrix is symmetric, so the transpose
    (light launched from the waveguides or detectors back into the plane) is fftn(e @ k^T).
    """

    def __init__(self, h: Tensor, regions: Tensor) -> None:
        self.shape = tuple(h.shape)
        self.num_mode_dims = h.dim()
        self.dims = tuple(range(-h.dim(), 0))
        n = h.numel()
        # Row f of `waves` is the plane wave whose spectrum is the unit vector f.
        waves = torch.fft.ifftn(
            torch.eye(n, dtype=torch.complex128).reshape(n, *self.shape), dim=self.dims
        ).reshape(n, n)
        self.kernel = h.reshape(n, 1) * (waves @ regions.to(torch.complex128))

    def forward(self, field: Tensor) -> Tensor:
        spectrum = torch.fft.fftn(field, dim=self.dims).flatten(-self.num_mode_dims)
        return spectrum @ self.kernel.to(field.device)

    def reverse(self, field: Tensor) -> Tensor:
        spread = (field @ self.kernel.T.to(field.device)).unflatten(-1, self.shape)
        return torch.fft.fftn(spread, dim=self.dims)


class SlabLaunch(OpticalElement):
    """Waveguides ``[..., C]`` ending on evenly spaced pixels of a slab ``[..., D]``."""

    def __init__(self, num_channels: int, num_pixels: int) -> None:
        spacing = num_pixels // num_channels
        self.positions = torch.arange(num_channels) * spacing + spacing // 2
        self.num_pixels = num_pixels

    def forward(self, field: Tensor) -> Tensor:
        slab = field.new_zeros(*field.shape[:-1], self.num_pixels)
        return slab.index_copy(-1, self.positions.to(field.device), field)

    def reverse(self, field: Tensor) -> Tensor:
        return field.index_select(-1, self.positions.to(field.device))


def region_matrix(shape: tuple[int, ...], num_regions: int) -> Tensor:
    """Overlap of every plane pixel with ``num_regions`` flat modes, ``[prod(shape), R]``.

    The regions are those of ``diffraction.region_sums`` (side by side across the centre two
    rows of a 2-D plane); each mode has unit power, so |overlap|^2 is the power coupled in.
    """
    width = shape[-1] // num_regions
    regions = torch.zeros(*shape, num_regions, dtype=torch.float64)
    for r in range(num_regions):
        columns = slice(r * width, (r + 1) * width)
        if len(shape) == 2:
            regions[shape[0] // 2 - 1 : shape[0] // 2 + 1, columns, r] = 1.0
        else:
            regions[columns, r] = 1.0
    regions = regions.reshape(-1, num_regions)
    return regions / regions.sum(dim=0).sqrt()


# ---- Which hardware the stages run on ----------------------------------------------------


class IdealOptics:
    """The digital twin: the light sees the commanded phases; lossless and noise-free."""

    ffm = False

    def mask_phases(self, role: str, phases: Tensor) -> Tensor:
        return phases

    def embedding_elements(self, phases: list[Tensor]) -> list[OpticalElement]:
        return tile_elements(phases, None)

    def detect(self, power: Tensor) -> Tensor:
        return power


_IDEAL = IdealOptics()
_OPTICS: contextvars.ContextVar[Any] = contextvars.ContextVar("taichi_optics", default=None)


@contextmanager
def use_optics(optics: IdealOptics | PhysicalOptics | None) -> Iterator[None]:
    """Run the multi-path stages inside the block on ``optics`` (None: the ideal twin)."""
    token = _OPTICS.set(optics)
    try:
        yield
    finally:
        _OPTICS.reset(token)


def current_optics() -> IdealOptics | PhysicalOptics:
    return _OPTICS.get() or _IDEAL


class PhysicalOptics:
    """A node's physical diffractive and MZI hardware; what it models: see the module docstring.

    Hidden errors are drawn once per (layer, mask role, shape), and per core, from ``seed``:
    every pass of a node sees the same device. ``at(layer, ffm=...)`` is the view a stage of
    ``layer`` runs on; views share the drawn errors.
    """

    def __init__(self, device: PhotonicCore.Config, seed: int, num_cores: int) -> None:
        self.device = device
        self.seed = seed
        self.num_cores = num_cores
        self.layer = 0
        self.ffm = False
        self._mask_effects: dict[tuple, list[PhaseEffect]] = {}
        self._mask_controllers: dict[tuple, PhaseController] = {}
        self._tiles: dict[int, Tiles] = {}
        generator = torch.Generator().manual_seed(seed + 1)  # fresh noise on every read
        self._noise = (
            None if device.detection_noise is None else device.detection_noise.build(generator)
        )
        self._adc = None if device.readout is None else device.readout.build(generator)

    def at(self, layer: int, *, ffm: bool) -> PhysicalOptics:
        view = copy.copy(self)  # shallow: the drawn errors, cores and noise stream are shared
        view.layer, view.ffm = layer, ffm
        return view

    def mask_phases(self, role: str, phases: Tensor) -> Tensor:
        key = (self.layer, role, tuple(phases.shape))
        if key not in self._mask_effects:
            # A stable seed per mask: str hashes change between processes, crc32 does not.
            mask_seed = self.seed + 1_000_003 * (self.layer + 1) + zlib.crc32(role.encode())
            generator = torch.Generator().manual_seed(mask_seed)
            d = self.device
            # The physical order of PhotonicCore: DAC, heater gain, crosstalk, fabrication offset.
            configs = (d.phase_quantization, d.gain_error, d.crosstalk, d.phase_error)
            effects = [c.build(tuple(phases.shape), generator) for c in configs if c is not None]
            (controller,) = build_controllers(d.calibration, [effects], mask_seed)
            self._mask_effects[key] = effects
            self._mask_controllers[key] = controller
        phases = self._mask_controllers[key].command(phases)
        for effect in self._mask_effects[key]:
            phases = effect.apply(phases)
        return phases

    def tiles(self, num_modes: int) -> Tiles:
        """The node's ``num_cores`` physical MZI units of ``num_modes`` modes."""
        if num_modes not in self._tiles:
            device = dataclasses.replace(self.device, mesh_size=num_modes)
            self._tiles[num_modes] = Tiles(
                [device.build(self.seed + k) for k in range(self.num_cores)]
            )
        return self._tiles[num_modes]

    def embedding_elements(self, phases: list[Tensor]) -> list[OpticalElement]:
        return self.tiles(phases[2].shape[-1]).elements(phases)

    def detect(self, power: Tensor) -> Tensor:
        """Photocurrent noise at the detected power, then each path's receiver and ADC.

        ``power`` is ``[..., 2]`` in units of one full-scale channel (what the brightest input
        coupler launches). The receiver's gain puts the brighter detector of the pair at the
        ADC's full scale (an automatic gain: the contrast needs only the ratio), so the ADC's
        bits resolve the pair's ratio whatever the absolute power.
        """
        if self._noise is not None:
            power = self._noise.apply(power)
        if self._adc is not None:
            peak = power.abs().amax(dim=-1, keepdim=True).detach()
            full_scale = self._adc.full_scale
            scale = full_scale / peak.clamp(min=torch.finfo(torch.float64).tiny)
            power = self._adc.apply(power * scale) / scale
        return power


__all__ = [
    "IdealOptics",
    "PhysicalOptics",
    "Propagation",
    "Readout",
    "SlabLaunch",
    "current_optics",
    "region_matrix",
    "use_optics",
]
