"""Diffractive units: angular-spectrum propagation, phase masks, and Taichi-style execution units.

Propagation over a distance d multiplies the spatial spectrum by
H = exp(i k_z d), k_z = sqrt((n k0)^2 - |k_perp|^2): unit modulus for
propagating waves, exp(-|k_z| d) decay for evanescent ones, on a periodic
grid (no padding). H depends on |k_perp| only, so H(k) = H(-k) and the
propagator is symmetric (A^T = A): its reverse pass is itself, which is
what fully forward mode needs.

Taichi's execution unit (Xu et al., Science 2024; docs/hardware.md §4.1) is
diffractive encoder -> interference (MZI) embedding -> diffractive decoder.
Here the encoder is free space (2-D, an 8 x 8 input array) read out into
``num_channels`` waveguides, the embedding is a trainable U S V^H MZI unit,
and the decoder is an on-chip slab (1-D) ending in intensity detectors.
Taichi's multi-path scheme runs many such shallow units in parallel, each on
a binary sub-task (one class against the rest), and combines their scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from core.config import doc
from nodes.photonic.clements import UnitPhases, unit_elements
from nodes.photonic.elements import OpticalElement, PhaseScreen, propagate
from nodes.photonic.mesh import MeshLayout


class DiffractionMedium:
    """Where light diffracts: wavelength, sampling pitch and refractive index."""

    @dataclass(kw_only=True)
    class Config:
        wavelength_m: float = doc("vacuum wavelength, m (C band)", default=1.55e-6)
        pixel_pitch_m: float = doc("sampling pitch of a plane, m", default=2e-6)
        refractive_index: float = doc(
            "index of the medium: 1 free space, ~2.8 a silicon slab", default=1.0
        )
        num_dims: Literal[1, 2] = doc("transverse dims: 2 free space, 1 on-chip slab", default=2)

        def __post_init__(self) -> None:
            for name in ("wavelength_m", "pixel_pitch_m", "refractive_index"):
                if not getattr(self, name) > 0:
                    raise ValueError(
                        f"{name} = {getattr(self, name)!r} is not valid; it must be > 0."
                    )

        def build(self) -> DiffractionMedium:
            return DiffractionMedium(self)

    def __init__(self, config: Config) -> None:
        self.config = config

    def propagator(self, shape: tuple[int, ...], distance_m: float) -> AngularSpectrum:
        return AngularSpectrum(self.config, shape, distance_m)


class AngularSpectrum(OpticalElement):
    """Free propagation over ``distance_m`` of a field sampled on ``shape`` (1-D or 2-D)."""

    def __init__(
        self, medium: DiffractionMedium.Config, shape: tuple[int, ...], distance_m: float
    ) -> None:
        if len(shape) != medium.num_dims:
            raise ValueError(
                f"a plane of shape {shape} does not match num_dims = {medium.num_dims}."
            )
        if distance_m < 0:
            raise ValueError(f"distance_m = {distance_m!r} is not valid; it must be >= 0.")
        self.num_mode_dims = len(shape)
        self.dims = tuple(range(-len(shape), 0))
        k0 = 2 * math.pi * medium.refractive_index / medium.wavelength_m
        freqs = [
            2 * math.pi * torch.fft.fftfreq(n, d=medium.pixel_pitch_m, dtype=torch.float64)
            for n in shape
        ]
        grids = torch.meshgrid(*freqs, indexing="ij")
        kz_sq = k0**2 - sum(g**2 for g in grids)
        kz = torch.sqrt(kz_sq.to(torch.complex128))
        self.transfer = torch.exp(1j * kz * distance_m)

    def forward(self, field: Tensor) -> Tensor:
        spectrum = torch.fft.fftn(field, dim=self.dims)
        return torch.fft.ifftn(spectrum * self.transfer.to(spectrum.dtype), dim=self.dims)

    def reverse(self, field: Tensor) -> Tensor:
        return self.forward(field)


class DiffractiveStack(nn.Module):
    """propagate -> (phase mask -> propagate) x num_masks, masks trainable or fixed."""

    def __init__(
        self,
        medium: DiffractionMedium,
        shape: tuple[int, ...],
        num_masks: int,
        distance_m: float,
        trainable: bool,
        generator: torch.Generator,
    ) -> None:
        super().__init__()
        if num_masks < 0:
            raise ValueError(f"num_masks = {num_masks} is not valid; it must be >= 0.")
        self.propagator = medium.propagator(shape, distance_m)
        masks = (
            2 * math.pi * torch.rand((num_masks, *shape), generator=generator, dtype=torch.float64)
        )
        self.masks = nn.Parameter(masks, requires_grad=trainable)

    def elements(self) -> list[OpticalElement]:
        elements: list[OpticalElement] = [self.propagator]
        for mask in self.masks:
            elements += [PhaseScreen(mask), self.propagator]
        return elements

    def forward(self, field: Tensor) -> Tensor:
        return propagate(self.elements(), field)


def region_sums(field: Tensor, num_regions: int, num_dims: int) -> Tensor:
    """Coupling into ``num_regions`` equal detectors/waveguides side by side across the plane's centre row.

    Each region integrates the field over its pixels (overlap with a flat mode).
    """
    if num_dims == 2:
        rows = field.shape[-2]
        field = field[..., rows // 2 - 1 : rows // 2 + 1, :].sum(dim=-2)
    width = field.shape[-1] // num_regions
    used = field[..., : width * num_regions]
    return used.reshape(*used.shape[:-1], num_regions, width).sum(dim=-1)


class TaichiUnit(nn.Module):
    """One execution unit: 2-D diffractive encoder -> MZI embedding -> 1-D diffractive decoder."""

    @dataclass(kw_only=True)
    class Config:
        input_side: int = doc(
            "inputs per side of the input array (Taichi: 8 x 8 couplers), count", default=8
        )
        pixels_per_input: int = doc("grid pixels per input coupler and side, count", default=3)
        num_channels: int = doc(
            "waveguides after the encoder = MZI size (Taichi: 8), count", default=8
        )
        num_outputs: int = doc("detectors after the decoder, count", default=2)
        decoder_pixels: int = doc("pixels across the decoder slab, count", default=64)
        num_encoder_masks: int = doc("phase masks in the encoder, count", default=1)
        num_decoder_masks: int = doc("phase masks in the decoder, count", default=1)
        distance_m: float = doc("spacing between planes, m", default=40e-6)
        trainable_encoder: bool = doc("train the encoder masks (else fixed random)", default=True)
        encoder_medium: DiffractionMedium.Config = doc(
            "free-space medium of the encoder", default_factory=DiffractionMedium.Config
        )
        decoder_medium: DiffractionMedium.Config = doc(
            "on-chip slab of the decoder (silicon slab index, 1-D)",
            default_factory=lambda: DiffractionMedium.Config(refractive_index=2.85, num_dims=1),
        )

        def __post_init__(self) -> None:
            for name in (
                "input_side",
                "pixels_per_input",
                "num_channels",
                "num_outputs",
                "decoder_pixels",
            ):
                if getattr(self, name) < 1:
                    raise ValueError(
                        f"{name} = {getattr(self, name)} is not valid; it must be >= 1."
                    )
            if self.decoder_pixels < self.num_channels or self.decoder_pixels < self.num_outputs:
                raise ValueError(
                    f"decoder_pixels = {self.decoder_pixels} is not valid; it must be >= num_channels "
                    f"({self.num_channels}) and num_outputs ({self.num_outputs})."
                )

        def build(self, generator: torch.Generator) -> TaichiUnit:
            return TaichiUnit(self, generator)

    def __init__(self, config: Config, generator: torch.Generator) -> None:
        super().__init__()
        self.config = config
        side = config.input_side * config.pixels_per_input
        self.encoder = DiffractiveStack(
            config.encoder_medium.build(),
            (side, side),
            config.num_encoder_masks,
            config.distance_m,
            config.trainable_encoder,
            generator,
        )
        self.decoder = DiffractiveStack(
            config.decoder_medium.build(),
            (config.decoder_pixels,),
            config.num_decoder_masks,
            config.distance_m,
            True,
            generator,
        )
        n = config.num_channels
        layout = MeshLayout(n)
        mesh = (layout.num_columns, layout.num_slots)
        # UnitPhases order: mesh(V^H) theta, phi, screen; attenuator theta, phi; mesh(U) likewise.
        shapes = [mesh, mesh, (n,), (n,), (n,), mesh, mesh, (n,)]
        self.embedding = nn.ParameterList(
            [
                nn.Parameter(2 * math.pi * torch.rand(s, generator=generator, dtype=torch.float64))
                for s in shapes
            ]
        )

    def embedding_elements(self) -> list[OpticalElement]:
        return unit_elements(UnitPhases.from_tensors(list(self.embedding)))

    def forward(self, images_BHW: Tensor) -> Tensor:
        """Detected output intensities ``(B, num_outputs)`` for input amplitudes ``(B, side, side)``."""
        c = self.config
        block = torch.ones(c.pixels_per_input, c.pixels_per_input, dtype=torch.float64)
        field = torch.kron(images_BHW.to(torch.float64), block).to(torch.complex128)
        channels = region_sums(self.encoder(field), c.num_channels, 2)
        mixed = propagate(self.embedding_elements(), channels)
        slab = torch.zeros(*mixed.shape[:-1], c.decoder_pixels, dtype=torch.complex128)
        spacing = c.decoder_pixels // c.num_channels
        slab = slab.index_copy(-1, torch.arange(c.num_channels) * spacing + spacing // 2, mixed)
        return region_sums(self.decoder(slab), c.num_outputs, 1).abs() ** 2


class MultiPathClassifier(nn.Module):
    """Taichi's multi-path scheme: many shallow units, each one class against the rest, combined.

    Path p answers "is it class p % num_classes?" with the contrast of its two
    detectors; a class's logit is the mean contrast of its paths times a
    learnable digital scale.
    """

    def __init__(
        self, unit: TaichiUnit.Config, num_classes: int, paths_per_class: int, seed: int
    ) -> None:
        super().__init__()
        if unit.num_outputs != 2:
            raise ValueError(
                f"num_outputs = {unit.num_outputs} is not valid for a binary path; it must be 2."
            )
        if num_classes < 2 or paths_per_class < 1:
            raise ValueError(
                f"num_classes = {num_classes} and paths_per_class = {paths_per_class} are not valid; "
                "need at least 2 classes and 1 path per class."
            )
        generator = torch.Generator().manual_seed(seed)
        self.num_classes = num_classes
        self.paths = nn.ModuleList(
            [unit.build(generator) for _ in range(num_classes * paths_per_class)]
        )
        self.scale = nn.Parameter(torch.tensor(10.0, dtype=torch.float64))

    def forward(self, images_BHW: Tensor) -> Tensor:
        scores = []
        for path in self.paths:
            intensity = path(images_BHW)
            scores.append((intensity[:, 1] - intensity[:, 0]) / (intensity.sum(dim=-1) + 1e-12))
        per_path = torch.stack(scores, dim=-1).reshape(len(images_BHW), -1, self.num_classes)
        return self.scale * per_path.mean(dim=1)


__all__ = [
    "AngularSpectrum",
    "DiffractionMedium",
    "DiffractiveStack",
    "MultiPathClassifier",
    "TaichiUnit",
    "region_sums",
]
