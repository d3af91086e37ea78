"""Time and energy of photonic matrix engines, calibrated to one published figure.

Energy per matrix-vector multiply (MVM) on an N_in -> N_out engine:

    E = (N_in + N_out) * E_conv + (P_heaters + P_laser) / clock

with E_conv the energy of one electro-optic conversion (a modulator drive
with its DAC, or a detector read with its ADC), P_heaters the power that
holds the phases (the phase-shifter technology's hold power per pi of phase:
tens of mW for a thermo-optic heater, next to nothing for MEMS, electro-optic or
non-volatile phase-change shifters; ``PhaseShifter``), and P_laser the wall-plug
power of the input light.

**Calibrated:** E_conv is the one free parameter. It is solved so that a model
of Taichi's execution unit (docs/hardware.md §4.1; thermo-optic MZIs) gives
Taichi's 160.82 TOPS/W. **Predicted:** everything else, in particular the power of
an engine built from 64 x 64 meshes at 1 GHz (PACE's size and clock) scaled to
Lightmatter's 65.5 TOPS with Lightmatter's own phase-shifter technology (MEMS),
compared with their ~80 W (``predictions``).

Time: a tile MVM takes one clock period (modulators, detectors and ADCs are
pipelined) plus, once per batch, the optical latency through the mesh;
reprogramming a mesh takes the phase shifters' tuning time and energy.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from core.config import doc

if TYPE_CHECKING:
    from nodes.photonic.clements import UnitPhases

GpuPrecision = Literal["int8", "fp16", "fp32"]
#: Speed of light in vacuum, m/s (SI exact).
SPEED_OF_LIGHT_M_PER_S = 299_792_458.0


def _require_positive(config: object, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not value > 0:
            raise ValueError(f"{name} = {value!r} is not valid; it must be greater than 0.")


def num_unit_shifters(mesh_size: int) -> int:
    """Phase shifters of one U S V^H unit: two meshes of N(N-1)/2 MZIs, two screens, N attenuators."""
    return 2 * mesh_size * (mesh_size - 1) + 2 * mesh_size + 2 * mesh_size


@dataclass
class Cost:
    """Time, energy and operation count of some work (operations: 2 per MAC)."""

    time_s: float
    energy_j: float
    ops: float

    @property
    def tops(self) -> float:
        return self.ops / self.time_s / 1e12 if self.time_s > 0 else 0.0

    @property
    def tops_per_w(self) -> float:
        return self.ops / self.energy_j / 1e12 if self.energy_j > 0 else 0.0

    def __add__(self, other: Cost) -> Cost:
        return Cost(
            self.time_s + other.time_s, self.energy_j + other.energy_j, self.ops + other.ops
        )


@dataclass
class Reconfiguration:
    """What setting new phases on a mesh costs; zero if nothing changed."""

    time_s: float
    energy_j: float
    num_shifters_changed: int


ShifterTechnology = Literal["thermal", "mems", "electro_optic", "phase_change"]


@dataclass(frozen=True)
class ShifterFigures:
    """Published figures of one phase-shifter technology (sources: docs/device_fidelity.md)."""

    hold_power_per_pi_w: float  # power to hold a pi shift, W
    tuning_energy_per_pi_j: float  # energy to set a pi shift, J
    tuning_time_s: float  # time to settle after a change, s


#: Default figures per technology; every number is cited in docs/device_fidelity.md.
SHIFTER_FIGURES: dict[str, ShifterFigures] = {
    # Thermo-optic TiN heater on silicon: ~20 mW per pi, settles in microseconds
    # (docs/hardware.md §4.4); the heater burns its hold power while settling.
    "thermal": ShifterFigures(0.02, 0.02 * 10e-6, 10e-6),
    # MEMS / NOEMS (electrostatic; Lightmatter's published shifter): capacitive, ~nW leakage,
    # ~pJ per actuation, microsecond mechanical response.
    "mems": ShifterFigures(1e-9, 1e-12, 1e-6),
    # Electro-optic (Pockels; thin-film lithium niobate): capacitive, no static current,
    # sub-pJ per switch, nanosecond (GHz) response.
    "electro_optic": ShifterFigures(0.0, 1e-13, 1e-9),
    # Non-volatile phase-change (Sb2Se3 / GST with an integrated heater): zero hold power,
    # ~nJ switching pulses, microsecond crystallization.
    "phase_change": ShifterFigures(0.0, 1e-9, 1e-6),
}


class PhaseShifter(ABC):
    """What holding and changing phases costs, for one phase-shifter technology (a strategy).

    Phases are taken at their programmed setting in [0, 2 pi); a mesh whose phases spread
    over that range holds pi per shifter on average.
    """

    @dataclass(kw_only=True)
    class Config:
        technology: ShifterTechnology = doc(
            "phase-shifter technology: thermal | mems | electro_optic | phase_change "
            "(published figures: docs/device_fidelity.md)",
            default="thermal",
        )
        hold_power_per_pi_w: float | None = doc(
            "power to hold a pi shift, W; null = the technology's published figure",
            default=None,
        )
        tuning_energy_per_pi_j: float | None = doc(
            "energy to set a pi shift, J; null = the technology's figure (thermal: hold power "
            "x tuning time, the heater burning while it settles)",
            default=None,
        )
        tuning_time_s: float | None = doc(
            "time for a shifter to settle after a change, s; null = the technology's figure",
            default=None,
        )

        def __post_init__(self) -> None:
            if self.technology not in SHIFTER_FIGURES:
                raise ValueError(
                    f"phase_shifter.technology = {self.technology!r} is not valid; choose one of "
                    f"{', '.join(SHIFTER_FIGURES)}."
                )
            for name in ("hold_power_per_pi_w", "tuning_energy_per_pi_j"):
                value = getattr(self, name)
                if value is not None and not value >= 0:
                    raise ValueError(
                        f"phase_shifter.{name} = {value!r} is not valid; it must be >= 0."
                    )
            if self.tuning_time_s is not None and not self.tuning_time_s > 0:
                raise ValueError(
                    f"phase_shifter.tuning_time_s = {self.tuning_time_s!r} is not valid; "
                    "it must be greater than 0."
                )

        def build(self) -> PhaseShifter:
            kind = _SHIFTER_KINDS[self.technology]
            return kind(self)

    def __init__(self, config: Config) -> None:
        self.config = config
        published = SHIFTER_FIGURES[config.technology]
        hold, time = config.hold_power_per_pi_w, config.tuning_time_s
        self.hold_power_per_pi_w = published.hold_power_per_pi_w if hold is None else hold
        self.tuning_time_s = published.tuning_time_s if time is None else time
        energy = config.tuning_energy_per_pi_j
        self.tuning_energy_per_pi_j = (
            self._default_tuning_energy_per_pi_j(published) if energy is None else energy
        )

    @abstractmethod
    def _default_tuning_energy_per_pi_j(self, published: ShifterFigures) -> float:
        """Energy to set a pi shift when the config gives none, J."""

    def hold_power_w(self, phase_over_pi: float) -> float:
        """Power to hold phases summing to ``phase_over_pi`` pi, W."""
        return phase_over_pi * self.hold_power_per_pi_w

    def tuning_energy_j(self, phase_over_pi: float) -> float:
        """Energy to set phases summing to ``phase_over_pi`` pi, J."""
        return phase_over_pi * self.tuning_energy_per_pi_j


class ThermalShifter(PhaseShifter):
    """A heater: holding costs power all the time; setting it burns that power while it settles."""

    def _default_tuning_energy_per_pi_j(self, published: ShifterFigures) -> float:
        # The heater burns its (possibly overridden) hold power while it settles.
        return self.hold_power_per_pi_w * self.tuning_time_s


class CapacitiveShifter(PhaseShifter):
    """MEMS or electro-optic: a charged capacitor holds the phase; charging it costs C V^2."""

    def _default_tuning_energy_per_pi_j(self, published: ShifterFigures) -> float:
        return published.tuning_energy_per_pi_j


class NonVolatileShifter(PhaseShifter):
    """Phase-change material: the phase stays without power; each setting is a switching pulse."""

    def _default_tuning_energy_per_pi_j(self, published: ShifterFigures) -> float:
        return published.tuning_energy_per_pi_j

    def hold_power_w(self, phase_over_pi: float) -> float:
        return 0.0


_SHIFTER_KINDS: dict[str, type[PhaseShifter]] = {
    "thermal": ThermalShifter,
    "mems": CapacitiveShifter,
    "electro_optic": CapacitiveShifter,
    "phase_change": NonVolatileShifter,
}


class TaichiReference:
    """The calibration target: one Taichi execution unit, as this model counts it."""

    @dataclass(kw_only=True)
    class Config:
        tops_per_w: float = doc(
            "published efficiency, TOPS/W (Taichi, docs/hardware.md §4.1)", default=160.82
        )
        num_inputs: int = doc("input channels: 8 x 8 grating couplers, count", default=64)
        num_channels: int = doc(
            "channels after the diffractive encoder = MZI size, count", default=8
        )
        num_outputs: int = doc(
            "detected outputs of one shallow path (binary sub-task), count", default=2
        )
        neurons_per_plane: int = doc(
            "diffractive neurons per encoder/decoder plane, count (assumed; not published per unit)",
            default=10_000,
        )
        phase_shifter: PhaseShifter.Config = doc(
            "the phase shifters of Taichi's MZIs (thermo-optic): the calibration uses these, "
            "whatever the engine's own technology",
            default_factory=PhaseShifter.Config,
        )

        def __post_init__(self) -> None:
            _require_positive(
                self, "tops_per_w", "num_inputs", "num_channels", "num_outputs", "neurons_per_plane"
            )

    def __init__(self, config: Config) -> None:
        self.config = config

    @property
    def ops_per_pass(self) -> float:
        """Dense-equivalent operations: every diffractive neuron sums all neurons of the plane before."""
        c = self.config
        encoder = c.num_inputs * c.neurons_per_plane + c.neurons_per_plane * c.num_channels
        decoder = c.num_channels * c.neurons_per_plane + c.neurons_per_plane * c.num_outputs
        return 2.0 * (encoder + c.num_channels**2 + decoder)

    @property
    def num_shifters(self) -> int:
        return num_unit_shifters(self.config.num_channels)


class PhotonicCost:
    """Time and energy of MVMs, reprogramming, and the comparison with a GPU."""

    @dataclass(kw_only=True)
    class Config:
        clock_hz: float = doc(
            "modulation / detection rate, Hz (PACE: 1 GHz, docs/hardware.md §4.5)", default=1e9
        )
        phase_shifter: PhaseShifter.Config = doc(
            "phase-shifter technology of the engine and its hold power, tuning energy and time",
            default_factory=PhaseShifter.Config,
        )
        channel_power_w: float = doc(
            "optical power per input channel at full scale, W", default=1e-3
        )
        laser_wall_plug_efficiency: float = doc(
            "laser optical / electrical power, fraction", default=0.1
        )
        mzi_length_m: float = doc(
            "length of one MZI along the light path, m (assumed)", default=300e-6
        )
        group_index: float = doc(
            "group index of the waveguides, 1 (silicon wire, assumed)", default=4.2
        )
        calibration: TaichiReference.Config = doc(
            "the unit whose published efficiency fixes the conversion energy",
            default_factory=TaichiReference.Config,
        )
        gpu_precision: GpuPrecision = doc(
            "GPU precision for 'x times a GPU' claims", default="int8"
        )
        gpu_power_w: float = doc("H100 SXM board power, W (docs/hardware.md §5)", default=700.0)
        gpu_int8_tops: float = doc(
            "H100 SXM dense INT8, TOPS (docs/hardware.md §5)", default=1979.0
        )
        gpu_fp16_tops: float = doc(
            "H100 SXM dense FP16, TFLOP/s (docs/hardware.md §5)", default=989.0
        )
        gpu_fp32_tops: float = doc("H100 SXM FP32, TFLOP/s (docs/hardware.md §5)", default=67.0)

        def __post_init__(self) -> None:
            _require_positive(
                self,
                "clock_hz",
                "channel_power_w",
                "mzi_length_m",
                "group_index",
                "gpu_power_w",
                "gpu_int8_tops",
                "gpu_fp16_tops",
                "gpu_fp32_tops",
            )
            if not 0 < self.laser_wall_plug_efficiency <= 1:
                raise ValueError(
                    f"laser_wall_plug_efficiency = {self.laser_wall_plug_efficiency!r} is not valid; "
                    "it must be in (0, 1]."
                )

        def build(self) -> PhotonicCost:
            return PhotonicCost(self)

        @property
        def heater_power_per_pi_w(self) -> float:
            """Mean power per shifter (per pi of setting) while phases settle, W.

            Setting phases costs this times ``thermal_tuning_time_s``: for a heater that is its
            hold power, for any technology its tuning energy per pi (the names predate
            ``phase_shifter``; node counters and engines price programming with them).
            """
            shifter = self.phase_shifter.build()
            return shifter.tuning_energy_per_pi_j / shifter.tuning_time_s

        @property
        def thermal_tuning_time_s(self) -> float:
            """Time for the phase shifters to settle after a change, s (any technology)."""
            return self.phase_shifter.build().tuning_time_s

    def __init__(self, config: Config) -> None:
        self.config = config
        self.shifter = config.phase_shifter.build()
        self.reference = TaichiReference(config.calibration)
        self.conversion_energy_j = self._calibrate()

    def _static_power_w(
        self, num_inputs: int, num_shifters: int, shifter: PhaseShifter | None = None
    ) -> float:
        """Shifters held at their mean setting (pi, for phases spread over [0, 2 pi)) plus the laser."""
        c = self.config
        shifter = self.shifter if shifter is None else shifter
        laser = num_inputs * c.channel_power_w / c.laser_wall_plug_efficiency
        return shifter.hold_power_w(num_shifters) + laser

    def _calibrate(self) -> float:
        ref = self.reference
        rc = ref.config
        energy_per_pass = ref.ops_per_pass / (rc.tops_per_w * 1e12)
        taichi_shifters = rc.phase_shifter.build()
        static = (
            self._static_power_w(rc.num_inputs, ref.num_shifters, taichi_shifters)
            / self.config.clock_hz
        )
        conversion = (energy_per_pass - static) / (rc.num_inputs + rc.num_outputs)
        if conversion <= 0:
            raise ValueError(
                f"calibration.tops_per_w = {rc.tops_per_w} cannot be met: static power alone costs "
                f"{static:.3g} J per pass of {ref.ops_per_pass:.3g} ops; lower heater or laser power."
            )
        return conversion

    def mvm_energy_j(
        self,
        num_inputs: int,
        num_outputs: int,
        num_shifters: int,
        shifter: PhaseShifter | None = None,
    ) -> float:
        static = self._static_power_w(num_inputs, num_shifters, shifter) / self.config.clock_hz
        return (num_inputs + num_outputs) * self.conversion_energy_j + static

    def latency_s(self, mesh_size: int) -> float:
        """Light's time through a unit: one MZI per column of two meshes plus the attenuators."""
        c = self.config
        return (2 * mesh_size + 1) * c.mzi_length_m * c.group_index / SPEED_OF_LIGHT_M_PER_S

    def matmul(
        self,
        num_outputs: int,
        num_inputs: int,
        num_vectors: int,
        mesh_size: int,
        num_cores: int = 1,
    ) -> Cost:
        """Cost of ``num_vectors`` products with an out x in matrix tiled onto mesh_size units.

        With more tiles than cores the matrix is streamed: every round of
        ``num_cores`` tiles first waits for the heaters to settle.
        """
        for name, value in (
            ("num_outputs", num_outputs),
            ("num_inputs", num_inputs),
            ("num_vectors", num_vectors),
            ("mesh_size", mesh_size),
            ("num_cores", num_cores),
        ):
            if value < 1:
                raise ValueError(f"{name} = {value} is not valid; it must be a positive count.")
        c = self.config
        num_tiles = math.ceil(num_outputs / mesh_size) * math.ceil(num_inputs / mesh_size)
        num_rounds = math.ceil(num_tiles / num_cores)
        streamed = num_tiles > num_cores
        time = num_rounds * num_vectors / c.clock_hz + self.latency_s(mesh_size)
        shifters = num_unit_shifters(mesh_size)
        energy = num_tiles * num_vectors * self.mvm_energy_j(mesh_size, mesh_size, shifters)
        if streamed:
            time += num_rounds * self.shifter.tuning_time_s
            energy += num_tiles * self.shifter.tuning_energy_j(shifters)
        return Cost(time, energy, 2.0 * num_outputs * num_inputs * num_vectors)

    def streamed_matmul(
        self, num_outputs: int, num_inputs: int, num_vectors: int, mesh_size: int, num_cores: int
    ) -> Cost:
        """MVMs of a layer whose tiles were just programmed (reconfiguration costed apart).

        Energy as if every tile were resident; time as rounds of ``num_cores`` tiles, each
        streaming every vector at the clock rate, plus the light's latency through a unit.
        """
        num_tiles = math.ceil(num_outputs / mesh_size) * math.ceil(num_inputs / mesh_size)
        resident = self.matmul(num_outputs, num_inputs, num_vectors, mesh_size, num_tiles)
        rounds = math.ceil(num_tiles / num_cores)
        time_s = rounds * num_vectors / self.config.clock_hz + self.latency_s(mesh_size)
        return Cost(time_s, resident.energy_j, resident.ops)

    def reconfiguration(self, old: UnitPhases, new: UnitPhases) -> Reconfiguration:
        """Setting ``new`` phases: one tuning time if any shifter changes; energy for the new setting.

        A heater burns its hold power for the new setting while it settles; other technologies
        pay their tuning energy per pi of the new setting.
        """
        changed = 0
        setting_over_pi = 0.0
        for before, after in zip(old.tensors(), new.tensors(), strict=True):
            wrapped = after.detach().remainder(2 * math.pi)
            changed += int((before.detach().remainder(2 * math.pi) != wrapped).sum())
            setting_over_pi += float(wrapped.sum()) / math.pi
        if changed == 0:
            return Reconfiguration(0.0, 0.0, 0)
        time = self.shifter.tuning_time_s
        return Reconfiguration(time, self.shifter.tuning_energy_j(setting_over_pi), changed)

    def gpu_tops_per_w(self) -> float:
        c = self.config
        tops = {"int8": c.gpu_int8_tops, "fp16": c.gpu_fp16_tops, "fp32": c.gpu_fp32_tops}
        return tops[c.gpu_precision] / c.gpu_power_w

    def times_gpu(self, cost: Cost) -> float:
        """Energy efficiency relative to the GPU at ``gpu_precision``."""
        return cost.tops_per_w / self.gpu_tops_per_w()

    def predict_power_w(
        self, tops: float, mesh_size: int, shifter: PhaseShifter.Config | None = None
    ) -> float:
        """Power of an engine of mesh_size units at ``clock_hz`` that delivers ``tops``.

        ``shifter``: the engine's phase-shifter technology (default: this model's own).
        """
        built = None if shifter is None else shifter.build()
        per_mvm = self.mvm_energy_j(mesh_size, mesh_size, num_unit_shifters(mesh_size), built)
        ops_per_mvm = 2.0 * mesh_size * mesh_size
        return tops * 1e12 / ops_per_mvm * per_mvm


@dataclass
class Prediction:
    """A model prediction next to the published figure it should match."""

    name: str
    predicted: float
    published: float
    unit: str

    @property
    def relative_error(self) -> float:
        return (self.predicted - self.published) / self.published


def predictions(
    cost: PhotonicCost,
    lightmatter_tops: float = 65.5,
    lightmatter_power_w: float = 80.0,
    mesh_size: int = 64,
    lightmatter_shifter: PhaseShifter.Config | None = None,
) -> list[Prediction]:
    """What the calibrated model predicts for a figure it was not fitted to (docs/hardware.md §4.5).

    Lightmatter (Nature 2025) reports 65.5 TOPS at ~80 W; the model builds that throughput
    from PACE-sized 64 x 64 units at ``clock_hz`` holding their phases with Lightmatter's
    MEMS phase shifters (default; docs/device_fidelity.md), and the same calibrated
    conversion energy. The thermal row shows what the same engine would draw on heaters.
    """
    shifter = lightmatter_shifter or PhaseShifter.Config(technology="mems")
    thermal = PhaseShifter.Config(technology="thermal")
    power = cost.predict_power_w(lightmatter_tops, mesh_size, shifter)
    return [
        Prediction(
            f"Lightmatter power at 65.5 TOPS ({shifter.technology} shifters)",
            power,
            lightmatter_power_w,
            "W",
        ),
        Prediction(
            "Lightmatter efficiency",
            lightmatter_tops / power,
            lightmatter_tops / lightmatter_power_w,
            "TOPS/W",
        ),
        Prediction(
            "Lightmatter power at 65.5 TOPS if thermal shifters",
            cost.predict_power_w(lightmatter_tops, mesh_size, thermal),
            lightmatter_power_w,
            "W",
        ),
    ]
