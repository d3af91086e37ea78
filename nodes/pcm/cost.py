"""Time and energy of PCM matrix-vector multiplies, of programming, and device wear.

Component model of one MVM on one core (one crossbar), for a mode with ``num_phases`` passes:

- each phase applies the inputs as pulse-width-modulated (PWM) pulses of up to
  ``2^(dac_bits-1) - 1`` clock steps (sign by polarity), then converts every column with a
  time-based ADC counting up to ``2^adc_bits`` steps on the same clock:
  ``time = num_phases * (pwm_steps + adc_steps) * clock``;
- energy per phase: row drivers (``rows * row_drive``), the array (``rows * cols * pwm_steps *
  cell_step_energy``, current through every device for the pulse length), the ADCs
  (``cols * adc_energy``, Walden scaling ``2^bits``) and one digital accumulate per column;
  once per MVM the digital affine correction of every column.

Two parameters are unknown and are fitted to the chip's 1-phase calibration point only (Le
Gallo et al., Nat. Electron. 2023; docs/hardware.md §3.1): the clock, from the MVM time, and the
array's energy per device and PWM step, from the energy per MAC left after the priors (ADC,
digital, row drive) are paid. Every other mode follows from the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from core.config import doc
from nodes.pcm.periphery import Periphery
from nodes.pcm.tile import Tile

_TERA = 1e12


@dataclass(kw_only=True)
class MvmMode:
    """How an MVM runs: tile geometry, converter resolutions and number of phases."""

    rows: int = doc("crossbar rows driven, count", default=256)
    cols: int = doc("crossbar columns converted, count", default=256)
    dac_bits: int = doc("input resolution incl. sign, bits", default=8)
    adc_bits: int = doc("output resolution incl. sign, bits", default=8)
    num_phases: int = doc("passes over the array per MVM, count", default=1)

    def __post_init__(self) -> None:
        for name in ("rows", "cols", "num_phases"):
            value = getattr(self, name)
            if value <= 0:
                raise ValueError(f"{name} = {value} is not valid for MvmMode; use a count >= 1.")
        for name in ("dac_bits", "adc_bits"):
            value = getattr(self, name)
            if not 2 <= value <= 16:
                raise ValueError(
                    f"{name} = {value} is not valid for MvmMode; use 2 to 16 bits (sign included)."
                )

    @property
    def num_macs(self) -> int:
        return self.rows * self.cols

    @property
    def pwm_steps(self) -> int:
        return 2 ** (self.dac_bits - 1) - 1

    @property
    def adc_steps(self) -> int:
        return 2**self.adc_bits


@dataclass(frozen=True)
class MvmCost:
    """One MVM on one core, with its energy split by component."""

    mode: MvmMode
    time_s: float
    row_drive_j: float
    array_j: float
    adc_j: float
    digital_j: float

    @property
    def energy_j(self) -> float:
        return self.row_drive_j + self.array_j + self.adc_j + self.digital_j

    @property
    def energy_per_mac_j(self) -> float:
        return self.energy_j / self.mode.num_macs

    @property
    def tops_per_watt(self) -> float:
        return 2 * self.mode.num_macs / self.energy_j / _TERA

    def tops(self, num_cores: int) -> float:
        return 2 * self.mode.num_macs * num_cores / self.time_s / _TERA


@dataclass(frozen=True)
class ProgramCost:
    """Programming (program-and-verify) a set of devices."""

    num_devices: int
    time_s: float
    energy_j: float


@dataclass(frozen=True)
class MatmulCost:
    """A batch of input vectors through one layer's tiles."""

    num_mvms: int
    num_macs: int
    time_s: float
    energy_j: float


@dataclass(frozen=True)
class CalibrationReport:
    """The calibration point as the fitted model reproduces it, and a predicted mode."""

    target_tops: float
    target_tops_per_watt: float
    num_cores: int
    calibration: MvmCost
    prediction: MvmCost

    def rows(self) -> list[tuple[str, float, float, float, float]]:
        """(label, TOPS, TOPS/W, fJ/MAC, ns/MVM) for target, reproduction and prediction."""
        out = [
            (
                "1-phase published",
                self.target_tops,
                self.target_tops_per_watt,
                2e15 / (self.target_tops_per_watt * _TERA),
                2
                * self.calibration.mode.num_macs
                * self.num_cores
                / (self.target_tops * _TERA)
                * 1e9,
            )
        ]
        for label, cost in (
            (f"{self.calibration.mode.num_phases}-phase model (fitted)", self.calibration),
            (f"{self.prediction.mode.num_phases}-phase model (predicted)", self.prediction),
        ):
            out.append(
                (
                    label,
                    cost.tops(self.num_cores),
                    cost.tops_per_watt,
                    cost.energy_per_mac_j * 1e15,
                    cost.time_s * 1e9,
                )
            )
        return out

    def __str__(self) -> str:
        lines = [f"{'mode':32s} {'TOPS':>8s} {'TOPS/W':>8s} {'fJ/MAC':>8s} {'ns/MVM':>8s}"]
        for label, tops, tops_per_watt, fj_per_mac, ns_per_mvm in self.rows():
            lines.append(
                f"{label:32s} {tops:8.2f} {tops_per_watt:8.2f} {fj_per_mac:8.1f} {ns_per_mvm:8.1f}"
            )
        return "\n".join(lines)


class PcmCost:
    """Fitted component cost model of the 64-core PCM chip."""

    @dataclass(kw_only=True)
    class Config:
        # Le Gallo et al., Nat. Electron. 2023 (docs/hardware.md §3.1): 1-phase mode.
        calibration_tops: float = doc(
            "published throughput of the calibration mode, TOPS", default=63.1
        )
        calibration_tops_per_watt: float = doc(
            "published efficiency of the calibration mode, TOPS/W", default=9.76
        )
        calibration_cores: int = doc(
            "cores running in parallel at the calibration point, count", default=64
        )
        calibration_mode: MvmMode = doc(
            "mode the published figures were measured in", default_factory=MvmMode
        )
        # Le Gallo et al. 2023: the chip's fastest, calibrated mode; more phases trade speed for precision.
        num_phases: int = doc("phases of the mode the node runs in, count", default=1)
        # docs/hardware.md §3.5 (MNSIM preset): 8-bit 1 GS/s ADC at ~2 mW -> 2 mW / 1 GS/s = 2 pJ.
        adc_energy_j: float = doc(
            "energy of one conversion at adc_reference_bits, J", default=2e-12
        )
        adc_reference_bits: int = doc("resolution adc_energy_j was quoted at, bits", default=8)
        # docs/hardware.md §5: H100 INT8, 1979 TOPS at 700 W -> 0.35 pJ per 8-bit op (assumed alike on chip).
        digital_energy_per_op_j: float = doc(
            "energy of one 8-bit digital op, J", default=700 / 1979e12
        )
        digital_ops_per_output_per_phase: int = doc(
            "accumulate of each phase's partial sum, ops", default=1
        )
        digital_ops_per_output: int = doc(
            "affine correction (scale, offset) per output and MVM, ops", default=2
        )
        # Assumption: word-line C ~ 50 fF charged to ~0.3 V per pulse, CV^2 ~ 5 fJ.
        row_drive_energy_j: float = doc("energy to drive one row for one phase, J", default=5e-15)
        # Assumption: PWM generator and time-based ADC count on one clock.
        adc_step_clocks: float = doc("clock periods per ADC count step, ratio", default=1.0)
        # Program-and-verify (assumptions; IBM's iterative programming converges in ~5-20 rounds).
        program_verify_iterations: int = doc(
            "program pulses (each with one verify read) per device write, count", default=10
        )
        # Assumption: PCM SET/RESET pulses last ~0.1-1 us.
        program_pulse_s: float = doc("duration of one programming pulse, s", default=500e-9)
        # Assumption: PCM RESET energies at scaled nodes span ~1-100 pJ.
        program_pulse_energy_j: float = doc("energy of one programming pulse, J", default=10e-12)
        # Assumption: one word line (all columns of a 256-wide array) is programmed at a time.
        devices_programmed_in_parallel: int = doc(
            "devices one array programs concurrently, count", default=256
        )
        # Assumption within the 1e6-1e9 cycles reported for PCM.
        endurance_cycles: float = doc("write cycles a device survives, count", default=1e8)

        def __post_init__(self) -> None:
            positive = (
                "calibration_tops",
                "calibration_tops_per_watt",
                "calibration_cores",
                "num_phases",
                "adc_reference_bits",
                "adc_step_clocks",
                "program_verify_iterations",
                "program_pulse_s",
                "devices_programmed_in_parallel",
                "endurance_cycles",
            )
            for name in positive:
                value = getattr(self, name)
                if value <= 0:
                    raise ValueError(f"{name} = {value} is not valid for PcmCost; use a value > 0.")
            non_negative = (
                "adc_energy_j",
                "digital_energy_per_op_j",
                "digital_ops_per_output_per_phase",
                "digital_ops_per_output",
                "row_drive_energy_j",
                "program_pulse_energy_j",
            )
            for name in non_negative:
                value = getattr(self, name)
                if value < 0:
                    raise ValueError(
                        f"{name} = {value} is not valid for PcmCost; use a value >= 0."
                    )

        def build(self) -> PcmCost:
            return PcmCost(self)

    def __init__(self, config: PcmCost.Config) -> None:
        self.config = config
        mode = config.calibration_mode
        mvm_time_s = (
            2 * mode.num_macs * config.calibration_cores / (config.calibration_tops * _TERA)
        )
        self.clock_s = mvm_time_s / (
            mode.num_phases * (mode.pwm_steps + mode.adc_steps * config.adc_step_clocks)
        )
        self.cell_step_energy_j = 0.0
        mvm_energy_j = 2 * mode.num_macs / (config.calibration_tops_per_watt * _TERA)
        priors_j = self.mvm(mode).energy_j
        if priors_j >= mvm_energy_j:
            raise ValueError(
                f"PcmCost.Config priors (ADC, digital, row drive) already cost {priors_j:.3e} J per MVM, "
                f"more than the {mvm_energy_j:.3e} J that {config.calibration_tops_per_watt} TOPS/W allows; "
                "lower adc_energy_j, digital_energy_per_op_j or row_drive_energy_j."
            )
        self.cell_step_energy_j = (mvm_energy_j - priors_j) / (
            mode.num_phases * mode.num_macs * mode.pwm_steps
        )

    def mvm(self, mode: MvmMode) -> MvmCost:
        """Time and energy of one MVM on one core in ``mode``."""
        config = self.config
        phase_clocks = mode.pwm_steps + mode.adc_steps * config.adc_step_clocks
        adc_conversion_j = config.adc_energy_j * 2.0 ** (mode.adc_bits - config.adc_reference_bits)
        digital_ops = mode.cols * (
            mode.num_phases * config.digital_ops_per_output_per_phase
            + config.digital_ops_per_output
        )
        return MvmCost(
            mode=mode,
            time_s=mode.num_phases * phase_clocks * self.clock_s,
            row_drive_j=mode.num_phases * mode.rows * config.row_drive_energy_j,
            array_j=mode.num_phases * mode.num_macs * mode.pwm_steps * self.cell_step_energy_j,
            adc_j=mode.num_phases * mode.cols * adc_conversion_j,
            digital_j=digital_ops * config.digital_energy_per_op_j,
        )

    def verify_read(self, mode: MvmMode) -> MvmCost:
        """One 1-phase read of a single row (the verify step), all columns converted."""
        single_row = MvmMode(
            rows=1, cols=mode.cols, dac_bits=mode.dac_bits, adc_bits=mode.adc_bits, num_phases=1
        )
        return self.mvm(single_row)

    def program(
        self, num_written_per_array: Tensor | list[int], mode: MvmMode, num_cores: int
    ) -> ProgramCost:
        """Program-and-verify ``num_written_per_array[k]`` devices in tile k on ``num_cores`` cores.

        Each device write is ``program_verify_iterations`` rounds of one pulse and one verify
        read; an array programs ``devices_programmed_in_parallel`` devices at a time, and the
        cores program their tiles in parallel, ``ceil(tiles / num_cores)`` rounds (each as long
        as the fullest tile: a bound, exact when tiles are alike). From a
        ``WriteCycleCounter.record`` mask: ``written_SRCIO.sum(dim=(0, 3, 4))``.
        """
        config = self.config
        counts = torch.as_tensor(num_written_per_array, dtype=torch.int64).flatten()
        num_devices = int(counts.sum())
        verify = self.verify_read(mode)
        round_s = config.program_pulse_s + verify.time_s
        batches = (
            math.ceil(int(counts.max()) / config.devices_programmed_in_parallel)
            * math.ceil(int((counts > 0).sum()) / num_cores)
            if counts.numel()
            else 0
        )
        per_device_round_j = config.program_pulse_energy_j + verify.energy_j / mode.cols
        return ProgramCost(
            num_devices=num_devices,
            time_s=batches * config.program_verify_iterations * round_s,
            energy_j=num_devices * config.program_verify_iterations * per_device_round_j,
        )

    def operating_mode(self, tile: Tile.Config, periphery: Periphery.Config) -> MvmMode:
        """The MVM mode of a node with this tile and periphery, in ``num_phases`` phases.

        An ideal (null-bit) converter has no cost of its own; it is costed like the calibrated one.
        """
        calibration = self.config.calibration_mode
        return MvmMode(
            rows=tile.rows,
            cols=tile.cols,
            dac_bits=calibration.dac_bits if periphery.dac_bits is None else periphery.dac_bits,
            adc_bits=calibration.adc_bits if periphery.adc_bits is None else periphery.adc_bits,
            num_phases=self.config.num_phases,
        )

    def matmul(
        self, mode: MvmMode, num_outputs: int, num_inputs: int, batch: int, num_cores: int
    ) -> MatmulCost:
        """``batch`` vectors through a num_outputs x num_inputs layer tiled in ``mode``.

        Every tile runs one full MVM per vector (a partly filled tile still drives its
        periphery); the tiles share ``num_cores`` cores, each core working through its tiles
        one vector at a time.
        """
        num_tiles = math.ceil(num_inputs / mode.rows) * math.ceil(num_outputs / mode.cols)
        mvm = self.mvm(mode)
        return MatmulCost(
            num_mvms=batch * num_tiles,
            num_macs=batch * num_outputs * num_inputs,
            time_s=batch * math.ceil(num_tiles / num_cores) * mvm.time_s,
            energy_j=batch * num_tiles * mvm.energy_j,
        )

    def calibration_report(self, predict_phases: int = 4) -> CalibrationReport:
        """The fitted calibration point next to the model's prediction for ``predict_phases``."""
        calibration = self.config.calibration_mode
        predicted_mode = MvmMode(
            rows=calibration.rows,
            cols=calibration.cols,
            dac_bits=calibration.dac_bits,
            adc_bits=calibration.adc_bits,
            num_phases=predict_phases,
        )
        return CalibrationReport(
            target_tops=self.config.calibration_tops,
            target_tops_per_watt=self.config.calibration_tops_per_watt,
            num_cores=self.config.calibration_cores,
            calibration=self.mvm(calibration),
            prediction=self.mvm(predicted_mode),
        )


@dataclass(frozen=True)
class EnduranceReport:
    """Wear after some programmings and what it projects to."""

    num_programmings: int
    max_cycles: int
    mean_cycles: float
    endurance_cycles: float
    projected_programmings: float
    projected_lifetime_s: float


class WriteCycleCounter:
    """Write cycles per device of one layer's arrays (tensor shaped like its g_SRCIO)."""

    def __init__(self, shape: torch.Size | tuple[int, ...], pulses_per_write: int) -> None:
        self.cycles = torch.zeros(shape, dtype=torch.int64)
        self.pulses_per_write = pulses_per_write
        self.num_programmings = 0

    def record(self, previous_target: Tensor | None, new_target: Tensor) -> Tensor:
        """Count one programming; only devices whose target changed are rewritten.

        Returns the written mask, so callers can cost exactly those devices.
        """
        written = (
            torch.ones_like(new_target, dtype=torch.bool)
            if previous_target is None
            else new_target != previous_target
        )
        self.cycles += written.to(torch.int64) * self.pulses_per_write
        self.num_programmings += 1
        return written

    def endurance(self, seconds_per_programming: float, endurance_cycles: float) -> EnduranceReport:
        """Project the worst device's wear rate forward to its endurance limit."""
        max_cycles = int(self.cycles.max()) if self.cycles.numel() else 0
        if max_cycles == 0 or self.num_programmings == 0:
            projected = math.inf
        else:
            projected = endurance_cycles / (max_cycles / self.num_programmings)
        return EnduranceReport(
            num_programmings=self.num_programmings,
            max_cycles=max_cycles,
            mean_cycles=float(self.cycles.double().mean()) if self.cycles.numel() else 0.0,
            endurance_cycles=endurance_cycles,
            projected_programmings=projected,
            projected_lifetime_s=projected * seconds_per_programming,
        )


def main() -> None:
    """Print the calibration point reproduction and the 4-phase prediction."""
    print(PcmCost.Config().build().calibration_report(predict_phases=4))


if __name__ == "__main__":
    main()


__all__ = [
    "CalibrationReport",
    "EnduranceReport",
    "MatmulCost",
    "MvmCost",
    "MvmMode",
    "PcmCost",
    "ProgramCost",
    "WriteCycleCounter",
    "main",
]
