"""A physical photonic matrix unit and its digital twin.

``PhotonicCore`` is one programmable U diag(S) V^H unit of ``mesh_size``
modes. Built with fabrication errors (phase offsets, heater gain errors,
crosstalk, insertion-loss spread) drawn from a seed, it is a *physical*
device: those errors are hidden state that a user of the device cannot read.
Built from ``Config.twin()`` it is the ideal model a computer designs with.

Both read their outputs the same way: inputs are scaled to the modulators'
full scale (max |x| = 1) and back, and the readout divides by the nominal
path transmission (what a one-off power calibration measures), so a twin and
a physical device agree exactly where the physical errors are zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from core.config import doc
from nodes.photonic.calibration import PhaseCalibration, PhaseController, build_controllers
from nodes.photonic.clements import MatrixProgram, TiledProgram, UnitPhases, unit_elements
from nodes.photonic.cost import PhotonicCost, Reconfiguration
from nodes.photonic.elements import OpticalElement, propagate
from nodes.photonic.mesh import MeshLayout, require_mesh_size
from nodes.photonic.nonideal import (
    DetectionNoise,
    InsertionLoss,
    OutputEffect,
    PhaseEffect,
    PhaseError,
    PhaseQuantization,
    Readout,
    ShifterGainError,
    SplitterImbalance,
    ThermalCrosstalk,
)


class PhotonicCore:
    """One MZI matrix unit; physical (with hidden per-device errors) or the ideal twin."""

    @dataclass(kw_only=True)
    class Config:
        mesh_size: int = doc(
            "modes per mesh (tile size), count; 64 as PACE's 64 x 64 core (docs/hardware.md §4.5)",
            default=64,
        )
        phase_quantization: PhaseQuantization.Config | None = doc(
            "heater DAC quantization; null for exact phases", default=None
        )
        phase_error: PhaseError.Config | None = doc(
            "fabrication phase offsets; null for none", default=None
        )
        gain_error: ShifterGainError.Config | None = doc(
            "heater gain errors; null for none", default=None
        )
        crosstalk: ThermalCrosstalk.Config | None = doc(
            "thermal crosstalk; null for none", default=None
        )
        insertion_loss: InsertionLoss.Config | None = doc(
            "per-MZI loss; null for lossless", default=None
        )
        splitter_imbalance: SplitterImbalance.Config | None = doc(
            "coupler splitting errors; null for ideal 50:50 couplers", default=None
        )
        detection_noise: DetectionNoise.Config | None = doc(
            "detector noise; null for none", default=None
        )
        readout: Readout.Config | None = doc(
            "ADC quantization; null for exact readout", default=None
        )
        calibration: PhaseCalibration.Config | None = doc(
            "the phase calibration done before use (measured offsets, gains, crosstalk "
            "corrected); null for an uncalibrated device",
            default=None,
        )
        cost: PhotonicCost.Config = doc(
            "time and energy figures of the engine", default_factory=PhotonicCost.Config
        )

        def __post_init__(self) -> None:
            require_mesh_size(self.mesh_size)

        def build(self, seed: int) -> PhotonicCore:
            return PhotonicCore(self, seed)

        def twin(self) -> PhotonicCore.Config:
            """The ideal model of this device: same size and cost figures, no errors."""
            return PhotonicCore.Config(mesh_size=self.mesh_size, cost=self.cost)

    def __init__(self, config: Config, seed: int) -> None:
        self.config = config
        self.num_modes = config.mesh_size
        self.cost = config.cost.build()
        fabrication = torch.Generator().manual_seed(seed)
        shapes = [tuple(t.shape) for t in _zero_phases(self.num_modes).tensors()]
        phase_configs = [
            config.phase_quantization,
            config.gain_error,
            config.crosstalk,
            config.phase_error,
        ]
        self._phase_effects: list[list[PhaseEffect]] = [
            [c.build(shape, fabrication) for c in phase_configs if c is not None]
            for shape in shapes
        ]
        # What the deployment's calibration measured, and the controller built from it.
        self._controllers: list[PhaseController] = build_controllers(
            config.calibration, self._phase_effects, seed
        )
        layout = MeshLayout(self.num_modes)
        mesh_shape = (layout.num_columns, layout.num_slots)
        self._loss = (
            None
            if config.insertion_loss is None
            else [
                config.insertion_loss.build(shape, fabrication)
                for shape in (mesh_shape, (self.num_modes,), mesh_shape)
            ]
        )
        # Couplers draw from a stream of their own, so adding them keeps every other error.
        coupler_generator = torch.Generator().manual_seed(seed + 5_000_011)
        self._couplers = (
            None
            if config.splitter_imbalance is None
            else [
                config.splitter_imbalance.build(shape, coupler_generator).error_rad
                for shape in (mesh_shape, (self.num_modes,), mesh_shape)
            ]
        )
        readout_generator = torch.Generator().manual_seed(seed + 1)
        self._noise: OutputEffect | None = (
            None
            if config.detection_noise is None
            else config.detection_noise.build(readout_generator)
        )
        self._readout: OutputEffect | None = (
            None if config.readout is None else config.readout.build(readout_generator)
        )
        # A mesh holds N(N-1)/2 MZIs of 2 ports over N modes: a path crosses N - 1 on average,
        # plus its attenuator; the calibration divides by that mean transmission.
        depth = 2 * (self.num_modes - 1) + 1
        self.nominal_transmission = (
            1.0 if self._loss is None else self._loss[0].nominal_amplitude(depth)
        )
        self.commanded = _zero_phases(self.num_modes)
        self.gain = 1.0
        self.num_outputs = self.num_inputs = self.num_modes

    def program(self, matrix: MatrixProgram) -> Reconfiguration:
        """Set the heaters for ``matrix``; returns the thermal-tuning time and energy it takes."""
        if matrix.phases.num_modes != self.num_modes:
            raise ValueError(
                f"a program for {matrix.phases.num_modes} modes does not fit mesh_size = {self.num_modes}."
            )
        reconfiguration = self.cost.reconfiguration(self.commanded, matrix.phases)
        self.commanded = UnitPhases.from_tensors(
            [t.detach().clone() for t in matrix.phases.tensors()]
        )
        self.gain = matrix.gain
        self.num_outputs, self.num_inputs = matrix.num_outputs, matrix.num_inputs
        return reconfiguration

    def actual_phases(self, commanded: UnitPhases | None = None) -> UnitPhases:
        """The phases the light sees for ``commanded`` (default: what is programmed).

        ``commanded`` are the phases the user asks for; the controller (calibration) turns
        them into heater drives, and the hidden errors act on those.
        """
        commanded = self.commanded if commanded is None else commanded
        applied = []
        for phase, effects, controller in zip(
            commanded.tensors(), self._phase_effects, self._controllers, strict=True
        ):
            phase = controller.command(phase)
            for effect in effects:
                phase = effect.apply(phase)
            applied.append(phase)
        return UnitPhases.from_tensors(applied)

    def elements(self, commanded: UnitPhases | None = None) -> list[OpticalElement]:
        """The optical circuit as the light sees it (hidden errors included)."""
        return self.circuit(self.actual_phases(commanded))

    def circuit(self, actual: UnitPhases) -> list[OpticalElement]:
        """The circuit for phases *as the light sees them*, with this device's losses.

        Emulator-side access (e.g. to check gradients against autograd); a user
        of a physical device only ever commands phases.
        """
        amplitudes = None if self._loss is None else [loss.amplitude for loss in self._loss]
        return unit_elements(actual, amplitudes, self._couplers)

    def encode(self, x_BI: Tensor) -> tuple[Tensor, Tensor]:
        """Input fields at modulator full scale (max |x| = 1 per row) and the scale to undo."""
        scale_B1 = (
            x_BI.detach()
            .abs()
            .amax(dim=-1, keepdim=True)
            .clamp(min=torch.finfo(torch.float64).tiny)
        )
        field = torch.nn.functional.pad(x_BI / scale_B1, (0, self.num_modes - x_BI.shape[-1]))
        return field.to(torch.complex128), scale_B1

    def read(self, field_BN: Tensor, scale_B1: Tensor) -> Tensor:
        """Detect the output fields and undo the input scaling, gain and nominal loss.

        Detector noise acts on the physical (lossy) field; the receiver gain then
        maps the nominal output level onto the ADC range before quantization.
        """
        return self.detect(field_BN)[..., : self.num_outputs] * (scale_B1 * self.gain)

    def detect(self, field_BN: Tensor) -> Tensor:
        """The detected fields in units of a full-scale input: noise, nominal-loss calibration, ADC."""
        if self._noise is not None:
            field_BN = self._noise.apply(field_BN)
        field_BN = field_BN / self.nominal_transmission
        if self._readout is not None:
            field_BN = self._readout.apply(field_BN)
        return field_BN

    def loss_amplitudes(self) -> list[Tensor] | None:
        """Per-MZI amplitude transmissions (mesh V [C, P], attenuators [N], mesh U [C, P]); None if lossless.

        Emulator-side access, like ``circuit``: a node's optics model needs them to run many
        tiles through this core at once.
        """
        return None if self._loss is None else [loss.amplitude for loss in self._loss]

    def coupler_errors(self) -> list[Tensor] | None:
        """Per-MZI coupler splitting errors (mesh V [C, P, 2], attenuators [N, 2], mesh U [C, P, 2]).

        Emulator-side access, like ``loss_amplitudes``; None for ideal couplers.
        """
        return self._couplers

    def output_scale(self, scale_B1: Tensor) -> Tensor:
        """Digital factor from detected field to y (d y / d field)."""
        return scale_B1 * self.gain / self.nominal_transmission

    def matmul(self, x_BI: Tensor) -> Tensor:
        """y = W x as the device computes it (complex; a real W gives Re(y) ~ W x)."""
        field, scale = self.encode(x_BI)
        return self.read(propagate(self.elements(), field), scale)


def _zero_phases(num_modes: int) -> UnitPhases:
    layout = MeshLayout(num_modes)
    mesh = (layout.num_columns, layout.num_slots)
    shapes = [mesh, mesh, (num_modes,), (num_modes,), (num_modes,), mesh, mesh, (num_modes,)]
    return UnitPhases.from_tensors([torch.zeros(s, dtype=torch.float64) for s in shapes])


class TiledEngine:
    """``num_cores`` physical cores running a tiled matrix; tile partial sums add up digitally.

    Tile k of a program runs on core k % num_cores. A core holding a different
    tile is reprogrammed first, which costs its thermal tuning time and energy:
    with fewer cores than tiles every product streams the tiles through again.
    Cores tune in parallel, so the time is that of the busiest core.
    """

    def __init__(self, config: PhotonicCore.Config, num_cores: int, seed: int) -> None:
        if num_cores < 1:
            raise ValueError(f"num_cores = {num_cores} is not valid; it must be a positive count.")
        self.cores = [config.build(seed + index) for index in range(num_cores)]
        self._held: list[MatrixProgram | None] = [None] * num_cores

    def matmul(self, program: TiledProgram, x_BI: Tensor) -> tuple[Tensor, Reconfiguration]:
        """y = W x (complex) for a tiled ``program`` and what reprogramming it took."""
        size = program.mesh_size
        num_col_tiles = len(program.tiles[0])
        x = torch.nn.functional.pad(x_BI, (0, num_col_tiles * size - x_BI.shape[-1]))
        tuning_s = [0.0] * len(self.cores)
        energy_j, num_changed = 0.0, 0
        rows = []
        for r, row in enumerate(program.tiles):
            acc = torch.zeros(*x.shape[:-1], size, dtype=torch.complex128)
            for c, tile in enumerate(row):
                slot = (r * num_col_tiles + c) % len(self.cores)
                if self._held[slot] is not tile:
                    step = self.cores[slot].program(tile)
                    tuning_s[slot] += step.time_s
                    energy_j += step.energy_j
                    num_changed += step.num_shifters_changed
                    self._held[slot] = tile
                acc = acc + self.cores[slot].matmul(x[..., c * size : (c + 1) * size])
            rows.append(acc)
        spent = Reconfiguration(max(tuning_s), energy_j, num_changed)
        return torch.cat(rows, dim=-1)[..., : program.num_outputs], spent
