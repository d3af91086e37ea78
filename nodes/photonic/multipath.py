"""Taichi's multi-path diffractive model as streamed stages (the zoo's ``taichi-digits``).

Many shallow paths, each a Taichi execution unit (docs/hardware.md §4.1; ``diffraction.TaichiUnit``)
answering one binary sub-task: path p asks "is it class p % K?" with the contrast of its two
detectors, and a class's logit is the mean contrast of its paths times a learnable digital scale
(as ``MultiPathClassifier``). All paths run side by side on a path axis P, and the model splits
into the stages the emulator streams, one after the other:

1. ``EncoderStage``: the image drives the input couplers (amplitudes, the brightest at the
   modulators' full scale as in ``PhotonicCore.encode``), free-space diffraction through each
   path's phase masks, coupling into ``num_channels`` waveguides. A fixed encoder (random, as a
   fabricated mask) keeps its masks as plain tensors of the model's structure, not parameters:
   they neither stream nor train, and the stage folds into the next streamed layer.
2. ``EmbeddingStage``: each path's U S V^H MZI unit of ``num_channels`` modes (one tile per path,
   phases named as ``MeshLinear``'s, in ``UnitPhases`` order).
3. ``DecoderStage``: the channels enter an on-chip slab, diffract through its masks onto two
   intensity detectors; contrast and combination are digital.

Parameters are phases in rad, stored float32 (what the wire carries); the optics runs in
complex128. Between stages the light goes on without detection; the emulator passes the field
as a real view ``[B, P, C, 2]`` (float32, kept on the node like any activation).

Two exact shortcuts: the encoder's first propagation acts on the image before the paths differ,
and the last propagation plus the overlap with the waveguide/detector modes is one precomputed
linear map (``Readout``), which saves an inverse FFT per path.

**Optics.** ``use_optics`` picks the hardware a stage runs on; the default is the ideal twin.
The photonic backend sets ``PhysicalOptics`` on the physical node (evaluation under
``backprop``; forward and measured backward under ``ffm``). Its non-idealities, all from the
backend's device config and drawn per node from the backend seed:

- every mask pixel and every embedding phase shifter passes the device's phase effects
  (DAC quantization, heater gain error, thermal crosstalk between neighbours along the last
  axis: a mask row or a mesh column, fabrication phase offset). Masks are treated as
  programmable phase pixels, a fixed encoder included;
- the embedding MZIs have the device's per-MZI insertion loss (cores of ``num_channels`` modes
  built from the device config; path p on core p % num_cores);
- each detector's photocurrent carries the device's detection noise (thermal and shot, at the
  power it receives: a full-scale coupler launches ``detection_noise.full_scale_power_w``),
  then the device's ADC digitizes the pair, its receiver gain setting the brighter detector
  at full scale (an automatic gain: the contrast is a ratio, so no power calibration is needed).

Ideal everywhere: free-space and slab propagation (exact pitch, distance and index; no
scattering, absorption or misalignment), the input modulators and couplers, the coupling into
waveguides and detectors (perfect flat-mode overlap), the slab launch, and the digital
combination.

**FFM.** Every stage is a chain of linear reciprocal ``OpticalElement``s, so fully forward mode
measures the mask and MZI phase gradients on the physical optics (``ffm.py``). The error the
detectors launch back is dL/dI * E: it needs the detector field E, which is the emulated
physical field here (a coherent receiver would measure it; intensity detectors alone do not).
The digital scale's gradient is computed digitally from the detected intensities.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from core.config import doc
from core.cost.workload import OpticalPass
from nodes.photonic.cost import num_unit_shifters
from nodes.photonic.diffraction import TaichiUnit
from nodes.photonic.elements import OpticalElement, PhaseScreen, propagate
from nodes.photonic.ffm import ffm_backward, ffm_forward
from nodes.photonic.layer import PHASE_NAMES, assemble_gradients
from nodes.photonic.mesh import MeshLayout
from nodes.photonic.multipath_optics import (
    Propagation,
    Readout,
    SlabLaunch,
    current_optics,
    region_matrix,
)

# ---- The stages ----------------------------------------------------------------------------


class OpticalStage(nn.Module, ABC):
    """A streamed stage: a chain of linear reciprocal optical elements built from its phases.

    Subclasses say how light enters (``launch``), which elements it crosses (``elements``),
    how the per-element phase gradients of fully forward mode map onto their phase tensors
    (``assemble``) and what leaves the stage (``finish``).
    """

    @abstractmethod
    def trainable_phases(self) -> list[Tensor]:
        """The phase parameters (rad) the stage trains, in the order ``assemble`` returns."""

    @abstractmethod
    def launch(self, x: Tensor) -> Tensor:
        """The complex field entering the stage for its input ``x``."""

    @abstractmethod
    def elements(self, optics, phases: list[Tensor], device: torch.device) -> list[OpticalElement]:
        """The circuit for ``phases`` (``trainable_phases`` in float64) on fields on ``device``."""

    @abstractmethod
    def assemble(self, grads: list[tuple[Tensor, ...]]) -> list[Tensor]:
        """Per-element phase gradients (``elements`` order) as gradients of ``trainable_phases``."""

    def finish(self, field: Tensor, optics) -> Tensor:
        return torch.view_as_real(field).float()

    def forward(self, x: Tensor) -> Tensor:
        optics = current_optics()
        field = self.launch(x)
        phases = [p.to(torch.float64) for p in self.trainable_phases()]
        if optics.ffm and torch.is_grad_enabled() and phases:
            real = _FfmStage.apply(self, optics, torch.view_as_real(field), *phases)
            out = torch.view_as_complex(real)
        else:
            out = propagate(self.elements(optics, phases, field.device), field)
        return self.finish(out, optics)


def random_phases(shape: tuple[int, ...], generator: torch.Generator | None) -> Tensor:
    """Uniform phases in [0, 2 pi) rad, float32 (None: torch's global generator)."""
    return 2 * math.pi * torch.rand(shape, generator=generator)


def _field(x: Tensor) -> Tensor:
    """A field passed between stages as a float real view ``[..., 2]``, back to complex128."""
    return torch.view_as_complex(x.to(torch.float64).contiguous())


class EncoderStage(OpticalStage):
    """Image -> input couplers -> free space through each path's masks -> ``[B, P, C]`` channels."""

    role = "encoder"

    def __init__(self, unit: TaichiUnit.Config, num_paths: int, generator) -> None:
        super().__init__()
        self.unit = unit
        self.num_paths = num_paths
        side = unit.input_side * unit.pixels_per_input
        plane = (side, side)
        medium = unit.encoder_medium.build()
        h = medium.propagator(plane, unit.distance_m).transfer
        self.propagation = Propagation(h)
        self.readout = Readout(h, region_matrix(plane, unit.num_channels))
        masks = random_phases((num_paths, unit.num_encoder_masks, *plane), generator)
        if unit.trainable_encoder:
            self.masks = nn.Parameter(masks)
        else:
            # A fabricated mask is structure, not weights: a plain tensor, never streamed.
            self.masks = masks.to(torch.float64)

    def trainable_phases(self) -> list[Tensor]:
        return [self.masks] if self.unit.trainable_encoder else []

    def launch(self, x: Tensor) -> Tensor:
        side, ppi = self.unit.input_side, self.unit.pixels_per_input
        if x.shape[-1] != side * side:
            raise ValueError(
                f"input_side = {side} needs {side * side} inputs per sample (a flat "
                f"{side} x {side} image); got {x.shape[-1]}."
            )
        image = x.to(torch.float64).reshape(-1, side, side)
        # The brightest coupler at the modulators' full scale, as PhotonicCore.encode.
        peak = image.abs().amax(dim=(-2, -1), keepdim=True)
        amplitude = image / peak.clamp(min=torch.finfo(torch.float64).tiny)
        # Each coupler lights ppi x ppi pixels; the 1/ppi keeps its power.
        pixels = amplitude.repeat_interleave(ppi, -1).repeat_interleave(ppi, -2) / ppi
        return pixels.unsqueeze(1).to(torch.complex128)  # [B, 1, S, S]: paths branch at mask 1

    def elements(self, optics, phases: list[Tensor], device: torch.device) -> list[OpticalElement]:
        commanded = phases[0] if phases else self.masks.to(device, torch.float64)
        masks = optics.mask_phases(self.role, commanded)
        elements: list[OpticalElement] = []
        for m in range(masks.shape[1]):
            elements += [self.propagation, PhaseScreen(masks[:, m])]
        return [*elements, self.readout]

    def assemble(self, grads: list[tuple[Tensor, ...]]) -> list[Tensor]:
        return [torch.stack([g for (g,) in grads[1:-1:2]], dim=1)]

    def finish(self, field: Tensor, optics) -> Tensor:
        # Without masks every path sees the same channels.
        b, _, c = field.shape
        return super().finish(field.expand(b, self.num_paths, c), optics)

    def optical_pass(self) -> OpticalPass:
        """Couplers in, free space through the masks, into the channels (for the cost model).

        Dense-equivalent operations count every pixel of a plane as summing every pixel of
        the plane before (as ``TaichiReference``). A fabricated encoder is set by no one;
        a trainable one is set when its layer streams in. Masks hold their phases unpowered.
        """
        u = self.unit
        num_inputs = u.input_side**2
        pixels = (u.input_side * u.pixels_per_input) ** 2
        dense = (
            num_inputs * pixels + (u.num_encoder_masks - 1) * pixels**2 + pixels * u.num_channels
        )
        return OpticalPass(
            num_paths=self.num_paths,
            num_inputs=num_inputs,
            num_outputs=0,
            num_held_shifters=0,
            num_programmed=pixels * u.num_encoder_masks if u.trainable_encoder else 0,
            dense_ops=2.0 * dense,
        )

    def extra_repr(self) -> str:
        trained = "trainable" if self.unit.trainable_encoder else "fixed"
        return f"paths={self.num_paths}, masks={self.unit.num_encoder_masks} ({trained})"


class EmbeddingStage(OpticalStage):
    """Each path's U S V^H MZI unit on its ``num_channels`` waveguides (one tile per path)."""

    role = "embedding"

    def __init__(self, unit: TaichiUnit.Config, num_paths: int, generator) -> None:
        super().__init__()
        n = unit.num_channels
        self.num_channels, self.num_paths = n, num_paths
        layout = MeshLayout(n)
        mesh = (num_paths, layout.num_columns, layout.num_slots)
        modes = (num_paths, n)
        shapes = (mesh, mesh, modes, modes, modes, mesh, mesh, modes)
        for name, shape in zip(PHASE_NAMES, shapes, strict=True):
            self.register_parameter(name, nn.Parameter(random_phases(shape, generator)))

    def trainable_phases(self) -> list[Tensor]:
        return [getattr(self, name) for name in PHASE_NAMES]

    def launch(self, x: Tensor) -> Tensor:
        return _field(x)

    def elements(self, optics, phases: list[Tensor], device: torch.device) -> list[OpticalElement]:
        return optics.embedding_elements(phases)

    def assemble(self, grads: list[tuple[Tensor, ...]]) -> list[Tensor]:
        return assemble_gradients([getattr(self, n).shape for n in PHASE_NAMES], grads)

    def optical_pass(self) -> OpticalPass:
        """Each path's MZI unit: its heaters burn while light passes (for the cost model)."""
        n = self.num_channels
        shifters = num_unit_shifters(n)
        return OpticalPass(
            num_paths=self.num_paths,
            num_inputs=0,
            num_outputs=0,
            num_held_shifters=shifters,
            num_programmed=shifters,
            dense_ops=2.0 * n * n,
        )


class DecoderStage(OpticalStage):
    """Channels -> slab -> masks -> two detectors per path; digital contrast and combination."""

    role = "decoder"

    def __init__(
        self, unit: TaichiUnit.Config, num_classes: int, num_paths: int, scale: float, generator
    ) -> None:
        super().__init__()
        self.unit = unit
        self.num_classes = num_classes
        plane = (unit.decoder_pixels,)
        h = unit.decoder_medium.build().propagator(plane, unit.distance_m).transfer
        self.slab = SlabLaunch(unit.num_channels, unit.decoder_pixels)
        self.propagation = Propagation(h)
        self.readout = Readout(h, region_matrix(plane, 2))
        self.masks = nn.Parameter(
            random_phases((num_paths, unit.num_decoder_masks, *plane), generator)
        )
        self.scale = nn.Parameter(torch.tensor(scale))

    def trainable_phases(self) -> list[Tensor]:
        return [self.masks]

    def launch(self, x: Tensor) -> Tensor:
        return _field(x)

    def elements(self, optics, phases: list[Tensor], device: torch.device) -> list[OpticalElement]:
        masks = optics.mask_phases(self.role, phases[0])
        elements: list[OpticalElement] = [self.slab]
        for m in range(masks.shape[1]):
            elements += [self.propagation, PhaseScreen(masks[:, m])]
        return [*elements, self.readout]

    def assemble(self, grads: list[tuple[Tensor, ...]]) -> list[Tensor]:
        return [torch.stack([g for (g,) in grads[2:-1:2]], dim=1)]

    def optical_pass(self) -> OpticalPass:
        """Channels into the slab, through its masks, onto two detectors (for the cost model)."""
        u = self.unit
        pixels = u.decoder_pixels
        dense = u.num_channels * pixels + (u.num_decoder_masks - 1) * pixels**2 + pixels * 2
        return OpticalPass(
            num_paths=self.masks.shape[0],
            num_inputs=0,
            num_outputs=2,
            num_held_shifters=0,
            num_programmed=pixels * u.num_decoder_masks,
            dense_ops=2.0 * dense,
        )

    def finish(self, field: Tensor, optics) -> Tensor:
        power = optics.detect(field.real.square() + field.imag.square())
        # [B, P]: "is it class p % K?". Noisy readings of a dark pair may sum to <= 0: undecided.
        total = power.sum(dim=-1)
        lit = total > 0
        ratio = (power[..., 1] - power[..., 0]) / torch.where(lit, total, 1.0)
        contrast = torch.where(lit, ratio, 0.0).clamp(-1.0, 1.0)  # a noisy ratio may leave [-1, 1]
        per_class = contrast.reshape(len(contrast), -1, self.num_classes).mean(dim=1)
        return (self.scale * per_class).float()


class _FfmStage(torch.autograd.Function):
    """A stage on the physical optics, its phase gradients measured in fully forward mode.

    Gradients are w.r.t. the phases the light sees; the controller applies them to the
    commanded phases (as ``layer._FfmMatmul``).
    """

    @staticmethod
    def forward(ctx, stage: OpticalStage, optics, field_real: Tensor, *phases: Tensor) -> Tensor:
        elements = stage.elements(optics, list(phases), field_real.device)
        out, stored = ffm_forward(elements, torch.view_as_complex(field_real))
        ctx.stage, ctx.elements, ctx.stored = stage, elements, stored
        ctx.input_shape = field_real.shape
        return torch.view_as_real(out)

    @staticmethod
    def backward(ctx, grad_real: Tensor):
        # Real-view gradient (dL/da, dL/db) of E = a + ib is 2 dL/dE*, the Wirtinger error.
        error = 0.5 * torch.view_as_complex(grad_real.to(torch.float64).contiguous())
        input_error, grads = ffm_backward(ctx.elements, ctx.stored, error)
        grad_field = None
        if ctx.needs_input_grad[2]:
            grad_field = torch.view_as_real(2.0 * input_error).sum_to_size(ctx.input_shape)
        return None, None, grad_field, *ctx.stage.assemble(grads)


# ---- The model -----------------------------------------------------------------------------


class TaichiMultiPath:
    """Builds the streamed stages of Taichi's multi-path classifier."""

    @dataclass(kw_only=True)
    class Config:
        num_classes: int = doc("classes, one binary sub-task each, count", default=10)
        paths_per_class: int = doc("paths answering each class's sub-task, count", default=2)
        unit: TaichiUnit.Config = doc(
            "one path's execution unit (encoder, MZI embedding, decoder; 2 detectors)",
            default_factory=TaichiUnit.Config,
        )
        initial_scale: float = doc(
            "initial digital scale from mean contrast to logit, logits", default=10.0
        )

        def __post_init__(self) -> None:
            if self.num_classes < 2:
                raise ValueError(f"num_classes = {self.num_classes} is not valid; it must be >= 2.")
            if self.paths_per_class < 1:
                raise ValueError(
                    f"paths_per_class = {self.paths_per_class} is not valid; it must be >= 1."
                )
            if self.unit.num_outputs != 2:
                raise ValueError(
                    f"unit.num_outputs = {self.unit.num_outputs} is not valid for a binary path; "
                    "it must be 2."
                )
            if self.unit.num_encoder_masks < 1 and self.unit.trainable_encoder:
                raise ValueError(
                    f"unit.num_encoder_masks = {self.unit.num_encoder_masks} is not valid for a "
                    "trainable encoder: it has no phases to train; set unit.trainable_encoder = "
                    "false or give it masks."
                )
            if self.unit.num_decoder_masks < 1:
                raise ValueError(
                    f"unit.num_decoder_masks = {self.unit.num_decoder_masks} is not valid; the "
                    "decoder needs at least 1 mask (its phases are the stage's weights)."
                )

        @property
        def num_paths(self) -> int:
            return self.num_classes * self.paths_per_class

        def build(self, generator: torch.Generator | None = None) -> nn.Sequential:
            """Encoder, embedding and decoder stages; ``generator`` None draws from torch's global RNG."""
            return nn.Sequential(
                EncoderStage(self.unit, self.num_paths, generator),
                EmbeddingStage(self.unit, self.num_paths, generator),
                DecoderStage(
                    self.unit, self.num_classes, self.num_paths, self.initial_scale, generator
                ),
            )


__all__ = [
    "DecoderStage",
    "EmbeddingStage",
    "EncoderStage",
    "OpticalStage",
    "TaichiMultiPath",
]
