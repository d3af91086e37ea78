"""The PCM compute-node backend: streamed layers computed on emulated analog crossbars.

When a layer's weights arrive, every ``F.linear`` / ``F.conv2d`` weight of the layer is
programmed onto PCM tiles (``program_layer``), and the layer's matrix products are read
from those tiles (``analog_matmul``: DAC, drifted noisy conductances, output noise, ADC,
drift compensation). Biases, activations, normalisations, embeddings and products between
activations (attention scores) stay digital. A Conv2d is a matmul over unfolded patches
(``F.unfold``: rows = ``C_in * kh * kw``, one input vector per output pixel), so it is
programmed as an ``C_out x (C_in kh kw)`` matrix, as the IBM chip maps convolutions.

Backward is hardware-aware training (Rasch et al. 2023): by default exactly the autograd of
the digital layer, run digitally (no array is touched); ``training.backward = "analog"``
instead reads the input gradient through the transposed tiles of a re-run analog forward.
What the chip does in that mode, and how it is counted:

- Re-run forward (``pcm.mvm_recompute_*``): the node keeps only each layer's input (see
  ``nodes.worker``), yet the backward of whatever follows a matmul inside the block (ReLU
  masks, norms, a second matmul's input) needs the values the analog forward produced, so the
  layer is read again from its arrays, one MVM per tile per input vector. These are reads the
  backward costs, kept apart from the forward's ``pcm.mvm_*``. A matmul whose output is the
  block's own output (a logits layer) needs no recomputed value, but the node as modelled
  recomputes the whole block, and so is it counted.
- Transposed reads (``pcm.mvm_transposed_*``): grad_x = grad_y W, one MVM per tile per
  grad_y vector, counted when autograd actually asks for that input gradient. In layer 0 a
  matmul fed by the data alone is not counted: the node drops the data's gradient, so the
  chip need not read it (the backend still returns it, as ``Backend.backward`` promises, but
  it is emulation, not work; the FLOP count leaves it out the same way). Assumption:
  the tiles can be driven from the column side and converted on the row side (an RPU-style
  bidirectional periphery; the IBM 64-core chip only reads forward), with the same DAC and
  ADC resolutions as the forward. Time and energy are ``PcmCost.matmul`` of the transposed
  matrix on transposed tiles: ``cols`` drivers, ``rows`` ADCs.
- Re-programming: in streaming mode the arrays are shared, so by the layer's backward later
  layers have overwritten it and it is programmed again (``pcm.programmings``, wear). In
  weight-stationary mode its arrays still hold it and nothing is written.

All of it advances the emulated clock. With the same torch random state as the forward (the
node seeds it again, as for dropout) a streaming re-run reproduces the forward's values exactly.

Interception works inside any block run by ``call_block`` (``functional_call``): a
``TorchFunctionMode`` swaps the calls whose weight *is* one of the streamed tensors, so the
node and the model stay unaware of the backend.

The backend keeps an emulated clock (its own busy time: programming plus MVMs) for drift,
and counters of programming time and energy, MVMs, write cycles and projected endurance,
returned by ``stats()``. Counters are cumulative over the node's life (wear is).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor, nn

from core.config import doc
from core.cost.engine import DigitalUnit
from core.cost.hardware import Hardware
from nodes.backend import Backend, call_block
from nodes.pcm.analog import WeightStationary, drift_compensation_scale, program_layer
from nodes.pcm.cost import PcmCost, WriteCycleCounter
from nodes.pcm.device import PcmDevice, check_drift_time
from nodes.pcm.engine import PcmEngine
from nodes.pcm.interception import AnalogLayer, shaped_by_parameters, uncounted
from nodes.pcm.modes import (
    OPERATING_MODES,
    HardwareAware,
    OperatingMode,
    WeightStationaryMode,
)
from nodes.pcm.periphery import Periphery
from nodes.pcm.state import (
    _ABSENT,
    PassStateMixin,
    PcmPassState,
    Provenance,
    _ArrayState,
    _target_digest,
)
from nodes.pcm.tile import ProgrammedMatrix, Tile

#: Drift compensation is re-read when the drift clock (t + t0) has grown by this factor since
#: the last reference read: drift is a power law in (t + t0), and a 10% step moves conductances
#: by ~nu ln(1.1) ~ 0.5%, below the read noise.
_RECOMPENSATE_CLOCK_RATIO = 1.1


class PcmBackend(PassStateMixin, Backend):
    @dataclass(kw_only=True)
    class Config(Backend.Config):
        kind: Literal["pcm"] = doc("backend: PCM analog in-memory compute nodes", default="pcm")
        mode: Literal["streaming", "weight-stationary"] = doc(
            "'streaming': each layer is programmed when its weights arrive, onto arrays the "
            "layers share; 'weight-stationary': every layer keeps its own arrays (must fit "
            "weight_stationary.num_chips) and only changed devices are rewritten",
            default="streaming",
        )
        device: PcmDevice.Config = doc(
            "device physics (noise, drift, compensation)", default_factory=PcmDevice.Config
        )
        tile: Tile.Config = doc("crossbar geometry and weight mapping", default_factory=Tile.Config)
        periphery: Periphery.Config = doc(
            "DACs, ADCs, noise and bound management", default_factory=Periphery.Config
        )
        cost: PcmCost.Config = doc(
            "time, energy and endurance model", default_factory=PcmCost.Config
        )
        weight_stationary: WeightStationary.Config = doc(
            "chips per node: the arrays available to the layers",
            default_factory=WeightStationary.Config,
        )
        training: HardwareAware.Config = doc(
            "hardware-aware training: analog or ideal forward and backward",
            default_factory=HardwareAware.Config,
        )
        drift_time_s: float = doc(
            "extra time between programming a layer and reading it, s (0: read at once)",
            default=0.0,
        )
        seed: int = doc(
            "seed of the physical randomness (mixed with the node's per-step random state)",
            default=0,
        )
        digital: DigitalUnit.Config = doc(
            "the node's digital unit (biases, activations, ideal backward) in the emulated clock",
            default_factory=DigitalUnit.Config,
        )

        @property
        def keeps_state_between_passes(self) -> bool:
            return self.operating_mode.arrays_outlive_a_pass

        @property
        def operating_mode(self) -> OperatingMode:
            """``mode`` as its strategy object (``nodes.pcm.modes``)."""
            return OPERATING_MODES[self.mode]

        def __post_init__(self) -> None:
            if not self.drift_time_s >= 0:
                raise ValueError(
                    f"drift_time_s = {self.drift_time_s} is not valid for PcmBackend; "
                    "use a time >= 0 s after programming."
                )

        @classmethod
        def ideal(cls, **overrides) -> PcmBackend.Config:
            """Exact devices and converters: the forward equals the digital layer (to rounding)."""
            return cls(
                device=PcmDevice.Config.ideal(), periphery=Periphery.Config.ideal(), **overrides
            )

        def drift_eval_config(self, compensated: bool) -> PcmBackend.Config:
            """Weight-stationary (programmed once), with global drift compensation or none."""
            compensation = replace(
                self.device.drift_compensation, kind="global" if compensated else "none"
            )
            device = replace(self.device, drift_compensation=compensation)
            return replace(self, mode=WeightStationaryMode.name, device=device)

        def build(self) -> PcmBackend:
            return PcmBackend(self)

        def engine(self, hardware: Hardware.Config) -> PcmEngine:
            return PcmEngine(self)

    def __init__(self, config: Config):
        self.config = config
        self.device = config.device.build()
        self.tile = config.tile.build()
        self.periphery = config.periphery.build()
        self.cost = config.cost.build()
        self.hardware_aware = config.training.build()
        self.operating_mode = config.operating_mode
        self.forward_pass = config.training.forward_pass
        self.backward_pass = config.training.backward_pass
        self.placement = config.weight_stationary.build(self.tile)
        self.mvm_mode = self.cost.operating_mode(config.tile, config.periphery)
        # A read driven from the column side: cols drivers (DACs), rows converted (ADCs).
        self.transposed_mvm_mode = replace(
            self.mvm_mode, rows=self.mvm_mode.cols, cols=self.mvm_mode.rows
        )
        #: Emulated seconds this node's arrays have been busy (programming and reading).
        self.clock_s = 0.0
        #: The same clock in whole femtoseconds: the age of a programmed matrix is a difference
        #: of these, exact whatever the clock's magnitude, so a replacement node whose clock
        #: started later reads arrays of the same age bit-identically.
        self._clock_fs = 0
        #: What each matrix's arrays physically hold: its last programming (wear is counted
        #: against it).
        self._programmed: dict[tuple[int, str], ProgrammedMatrix] = {}
        #: How each of those was programmed (``Provenance``): its age, and enough to program
        #: it again identically.
        self._provenance: dict[tuple[int, str], Provenance] = {}
        #: Matrices the numerics say the arrays hold, but that are not materialised here: a
        #: replacement's inherited arrays, or the pass-start content of arrays an aborted
        #: attempt reprogrammed. Programmed again from their provenance when first read with
        #: the same weights; ``_ABSENT``: the arrays held nothing at the pass start.
        self._pending: dict[tuple[int, str], Provenance] = {}
        self._wear: dict[tuple[int, str], WriteCycleCounter] = {}
        #: Per matrix: (t_inference of the last reference read, its compensation factor).
        self._compensation: dict[tuple[int, str], tuple[float, Tensor]] = {}
        self._counters: dict[str, float] = {}
        #: The last pass begun (step, kind) and what the arrays held then (``begin_pass``).
        self._pass_start: tuple[tuple[int, int], _ArrayState] | None = None

    # ---- Backend interface -------------------------------------------------------------

    def forward(self, layer: int, block: nn.Module, params: dict[str, Tensor], x: Tensor) -> Tensor:
        params = {name: p.float() for name, p in params.items()}
        with (
            torch.no_grad(),
            AnalogLayer(self, layer, params, self.layer_generator(), autograd=False),
        ):
            return call_block(block, params, x)

    def backward(self, layer, block, params, x, grad_y):
        """Digital autograd (``backward = "ideal"``) or the chip's analog backward.

        Analog: the block is re-run on the arrays (re-programmed in streaming mode) and the
        input gradient of every matmul is read through its transposed tiles; the module
        docstring says what is counted and why. ``nodes.pcm.modes.BackwardPass`` runs it.
        """
        return self.backward_pass.backward(self, layer, block, params, x, grad_y)

    def stats(self) -> dict[str, float]:
        stats = dict(self._counters)
        stats["pcm.clock_s"] = self.clock_s
        stats["pcm.arrays_in_use"] = float(self.arrays_in_use)
        stats["pcm.array_state_bytes"] = float(self.array_bytes)
        if self._wear:
            reports = {
                key: counter.endurance(
                    self.clock_s / counter.num_programmings, self.config.cost.endurance_cycles
                )
                for key, counter in self._wear.items()
            }
            stats["pcm.max_write_cycles"] = float(max(r.max_cycles for r in reports.values()))
            stats["pcm.endurance_programmings"] = min(
                r.projected_programmings for r in reports.values()
            )
            stats["pcm.endurance_lifetime_s"] = min(
                r.projected_lifetime_s for r in reports.values()
            )
            for (layer, name), report in reports.items():
                stats[f"pcm.layer.{layer}.{name}.max_write_cycles"] = float(report.max_cycles)
        return stats

    def check_layers(self, layers: list[nn.Module]) -> None:
        """In weight-stationary mode, ValueError (with the numbers) if the model cannot fit."""
        self.operating_mode.check_fit(self.placement, matrix_shapes(layers))

    # ---- Emulated clock ----------------------------------------------------------------

    def advance_clock(self, seconds: float) -> None:
        """Let ``seconds`` of emulated time pass (programmed arrays drift meanwhile)."""
        check_drift_time(seconds)
        self._tick(seconds)

    def _tick(self, seconds: float) -> None:
        self.clock_s += seconds
        self._clock_fs += round(seconds * _FS_PER_S)

    def _age_s(self, key: tuple[int, str]) -> float:
        """Emulated seconds since matrix ``key`` was programmed (exact: a difference of ints)."""
        return (self._clock_fs - self._provenance[key].programmed_at_fs) / _FS_PER_S

    # ---- Internals ---------------------------------------------------------------------

    def _count(self, name: str, value: float) -> None:
        self._counters[name] = self._counters.get(name, 0.0) + value

    def layer_generator(self) -> torch.Generator:
        # The node seeds torch's random state per (seed, rank, step, layer), the same again for
        # the backward recompute, as for dropout; drawing from it gives every node, step and
        # layer its own reproducible noise, and mixing in config.seed picks another chip.
        draw = int(torch.randint(0, 2**62, ()))
        return torch.Generator().manual_seed(
            (draw ^ (self.config.seed * 0x9E3779B97F4A7C15)) % 2**63
        )

    @property
    def arrays_in_use(self) -> int:
        """Arrays holding a programmed matrix now."""
        return sum(p.num_tiles for p in self._programmed.values())

    def _program(
        self, layer: int, name: str, w_OI: Tensor, gen: torch.Generator
    ) -> ProgrammedMatrix:
        """The arrays holding ``w_OI``, programmed now unless they already hold exactly it."""
        key = (layer, name)
        mode = self.operating_mode
        previous = self._programmed.get(key)
        pending = self._pending.pop(key, None)
        if pending is not None:
            if pending is not _ABSENT and pending.digest == _target_digest(
                *self.tile.map_weights(w_OI, self.device.g_max)
            ):
                return self._program_again(key, w_OI, pending, previous)
            resident = None  # the arrays, as the numerics see them, held other weights
        else:
            resident = mode.resident(previous, w_OI, self.tile, self.device)
        if resident is not None:
            return resident
        mode.admit(
            self.placement,
            [_matrix_shape(p) for k, p in self._programmed.items() if k != key],
            tuple(w_OI.shape),
            first_time=previous is None,
        )
        # Taken only where arrays outlive a pass: a replacement may have to program it again.
        state_before = gen.get_state() if mode.arrays_outlive_a_pass else None
        programmed = program_layer(
            w_OI, None, self.tile, self.device, self.periphery, gen, programmed_at_s=self.clock_s
        )
        self._count_programming(key, programmed, previous)
        if self.config.device.drift_compensation.kind != "none":
            # program_layer read the compensation baseline with one-hot inputs.
            self._count_reads(programmed, programmed.num_inputs, "pcm.calibration")
        programmed = replace(programmed, programmed_at_s=self.clock_s)
        self._programmed[key] = programmed
        self._provenance[key] = Provenance(
            generator_state=state_before,
            digest=(
                _target_digest(programmed.g_target_SRCIO, programmed.weight_scale_RC)
                if state_before is not None
                else b""
            ),
            programmed_at_s=self.clock_s,
            programmed_at_fs=self._clock_fs,
        )
        # The baseline was read right now, so the factor is 1 until the arrays drift.
        self._compensation[key] = (0.0, torch.ones(()))
        return programmed

    def _program_again(
        self,
        key: tuple[int, str],
        w_OI: Tensor,
        provenance: Provenance,
        previous: ProgrammedMatrix | None,
    ) -> ProgrammedMatrix:
        """The matrix ``provenance`` describes, programmed again from the same generator state:
        bitwise what the arrays held then, with its age and compensation (already restored).

        The devices are written now (wear, ``pcm.restored_programmings``: a replacement's new
        chip), but the emulated clock does not move: the arrays they stand for were programmed
        back then, and their reads must see that age.
        """
        gen = torch.Generator()
        gen.set_state(provenance.generator_state)
        programmed = program_layer(w_OI, None, self.tile, self.device, self.periphery, gen)
        programmed = replace(programmed, programmed_at_s=provenance.programmed_at_s)
        self._wear_of(key, programmed).record(
            self.operating_mode.overwritten(previous), programmed.g_target_SRCIO
        )
        self._count("pcm.restored_programmings", 1)
        self._programmed[key] = programmed
        self._provenance[key] = provenance
        return programmed

    def _wear_of(self, key: tuple[int, str], programmed: ProgrammedMatrix) -> WriteCycleCounter:
        counter = self._wear.get(key)
        if counter is None:
            counter = self._wear[key] = WriteCycleCounter(
                programmed.g_target_SRCIO.shape, self.config.cost.program_verify_iterations
            )
        return counter

    def _count_programming(
        self, key: tuple[int, str], programmed: ProgrammedMatrix, previous: ProgrammedMatrix | None
    ) -> None:
        """Wear, time and energy of writing ``programmed`` over ``previous``; the clock moves."""
        layer = key[0]
        written_SRCIO = self._wear_of(key, programmed).record(
            self.operating_mode.overwritten(previous), programmed.g_target_SRCIO
        )
        cost = self.cost.program(
            written_SRCIO.sum(dim=(0, 3, 4)), self.mvm_mode, self.placement.num_arrays
        )
        self._count("pcm.programmings", 1)
        self._count("pcm.devices_written", cost.num_devices)
        self._count("pcm.program_time_s", cost.time_s)
        self._count("pcm.program_energy_j", cost.energy_j)
        self._count(f"pcm.layer.{layer}.program_time_s", cost.time_s)
        self._count(f"pcm.layer.{layer}.program_energy_j", cost.energy_j)
        self._tick(cost.time_s)

    def _count_reads(
        self,
        programmed: ProgrammedMatrix,
        num_vectors: int,
        prefix: str,
        transposed: bool = False,
    ) -> None:
        """``num_vectors`` reads of every tile of ``programmed``, forward or transposed."""
        if transposed:
            # Same physical tiles, driven from the columns: the matrix read is W^T (inputs =
            # the layer's outputs) on tiles of cols x rows, so the tile count is unchanged.
            mode, outputs, inputs = (
                self.transposed_mvm_mode,
                programmed.num_inputs,
                programmed.num_outputs,
            )
        else:
            mode, outputs, inputs = self.mvm_mode, programmed.num_outputs, programmed.num_inputs
        cost = self.cost.matmul(mode, outputs, inputs, num_vectors, self.placement.num_arrays)
        self._count(f"{prefix}_mvms", cost.num_mvms)
        self._count(f"{prefix}_macs", cost.num_macs)
        self._count(f"{prefix}_time_s", cost.time_s)
        self._count(f"{prefix}_energy_j", cost.energy_j)
        self._tick(cost.time_s)

    def _drift_scale(
        self, key: tuple[int, str], t_inference: float, gen: torch.Generator
    ) -> Tensor:
        t_ref, scale = self._compensation[key]
        t0 = self.config.device.t0
        if self.config.device.drift_compensation.kind == "none" or (t_inference + t0) <= (
            _RECOMPENSATE_CLOCK_RATIO * (t_ref + t0)
        ):
            return scale
        programmed = self._programmed[key]
        scale = drift_compensation_scale(programmed, t_inference, self.periphery, gen)
        self._count_reads(programmed, programmed.num_inputs, "pcm.calibration")
        self._compensation[key] = (t_inference, scale)
        return scale

    def matmul(
        self,
        layer: int,
        name: str,
        x_BI: Tensor,
        w_OI: Tensor,
        gen: torch.Generator,
        autograd: bool,
        data: Tensor | None = None,
    ) -> Tensor:
        """x_BI @ w_OI^T read from the arrays holding ``w_OI`` (no bias: it is added digitally).

        ``autograd``: the analog backward's re-run of the forward, whose input gradient is read
        through the transposed tiles when autograd reaches it. ``data``: the block's input when
        it is the data set's, whose gradient nobody uses.
        """
        with uncounted():
            programmed = self._program(layer, name, w_OI.detach(), gen)
            t_inference = self.config.drift_time_s + self._age_s((layer, name))
            self._count_reads(
                programmed, x_BI.shape[0], "pcm.mvm_recompute" if autograd else "pcm.mvm"
            )
            if autograd:
                # Same order of random draws as the forward below, so a streaming re-run
                # (programmed again from the same state) reproduces the forward's values.
                scale = self._drift_scale((layer, name), t_inference, gen)
                y_BO = self.hardware_aware.linear(
                    x_BI, w_OI, None, programmed, t_inference, self.periphery, gen, scale
                )
                if x_BI.requires_grad and (data is None or shaped_by_parameters(x_BI, data)):
                    # The hook fires as grad_y reaches this product, just before its backward
                    # reads grad_x through the transposed tiles: one MVM per tile per vector.
                    y_BO.register_hook(
                        lambda grad_BO: self._count_reads(
                            programmed, grad_BO.shape[0], "pcm.mvm_transposed", transposed=True
                        )
                    )
                return y_BO
            return self.forward_pass.read(
                x_BI,
                w_OI,
                programmed,
                t_inference,
                self.periphery,
                gen,
                lambda: self._drift_scale((layer, name), t_inference, gen),
            )


#: Femtoseconds per second: the exact clock's unit (a Python int never overflows).
_FS_PER_S = 10**15


def _matrix_shape(programmed: ProgrammedMatrix) -> tuple[int, int]:
    return (programmed.num_outputs, programmed.num_inputs)


def matrix_shapes(layers: list[nn.Module]) -> list[tuple[int, int]]:
    """(outputs, inputs) of every crossbar matrix the layers' Linear and Conv2d modules need."""
    shapes = []
    for layer in layers:
        for module in layer.modules():
            if isinstance(module, nn.Linear):
                shapes.append(tuple(module.weight.shape))
            elif isinstance(module, nn.Conv2d):
                out_channels = module.weight.shape[0]
                shapes.append((out_channels, math.prod(module.weight.shape[1:])))
    return shapes


__all__ = ["PcmBackend", "PcmPassState", "Provenance", "matrix_shapes"]
