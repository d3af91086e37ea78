"""Time and energy of photonic matrix engines, calibrated to one published figure.

Energy per matrix-vector multiply (MVM) on an N_in -> N_out engine:

    E = (N_in + N_out) * E_conv + (P_heaters + P_laser) / clock

with E_conv the energy of one electro-optic conversion (a modulator drive
with its DAC, or a detector read with its ADC), P_heaters the power that
holds the thermo-optic phases (P_pi per pi of phase), and P_laser the wall-plug
power of the input light.

**Calibrated:** E_conv is the one free parameter. It is solved so that a model
of Taichi's execution unit (docs/hardware.md §4.1) gives Taichi's
160.82 TOPS/W. **Predicted:** everything else, in particular the power of an
engine built from 64 x 64 meshes at 1 GHz (PACE's size and clock) scaled to
Lightmatter's 65.5 TOPS, compared with their ~80 W (``prediction``).

Time: a tile MVM takes one clock period (modulators, detectors and ADCs are
pipelined) plus, once per batch, the optical latency through the mesh;
reprogramming a mesh takes the thermal tuning time.
"""

from __future__ import annotations

import math
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
        heater_power_per_pi_w: float = doc(
            "thermo-optic heater power for a pi shift, W (assumed typical; not in docs/hardware.md)",
            default=0.02,
        )
        thermal_tuning_time_s: float = doc(
            "time for heaters to settle after a change, s (docs/hardware.md §4.4: microseconds)",
            default=10e-6,
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
                "thermal_tuning_time_s",
                "channel_power_w",
                "mzi_length_m",
                "group_index",
                "gpu_power_w",
                "gpu_int8_tops",
                "gpu_fp16_tops",
                "gpu_fp32_tops",
            )
            if self.heater_power_per_pi_w < 0:
                raise ValueError(
                    f"heater_power_per_pi_w = {self.heater_power_per_pi_w!r} is not valid; it must be >= 0."
                )
            if not 0 < self.laser_wall_plug_efficiency <= 1:
                raise ValueError(
                    f"laser_wall_plug_efficiency = {self.laser_wall_plug_efficiency!r} is not valid; "
                    "it must be in (0, 1]."
                )

        def build(self) -> PhotonicCost:
            return PhotonicCost(self)

    def __init__(self, config: Config) -> None:
        self.config = config
        self.reference = TaichiReference(config.calibration)
        self.conversion_energy_j = self._calibrate()

    def _static_power_w(self, num_inputs: int, num_shifters: int) -> float:
        """Heaters at their mean setting (pi, for phases spread over [0, 2 pi)) plus the laser."""
        c = self.config
        laser = num_inputs * c.channel_power_w / c.laser_wall_plug_efficiency
        return num_shifters * c.heater_power_per_pi_w + laser

    def _calibrate(self) -> float:
        ref = self.reference
        rc = ref.config
        energy_per_pass = ref.ops_per_pass / (rc.tops_per_w * 1e12)
        static = self._static_power_w(rc.num_inputs, ref.num_shifters) / self.config.clock_hz
        conversion = (energy_per_pass - static) / (rc.num_inputs + rc.num_outputs)
        if conversion <= 0:
            raise ValueError(
                f"calibration.tops_per_w = {rc.tops_per_w} cannot be met: static power alone costs "
                f"{static:.3g} J per pass of {ref.ops_per_pass:.3g} ops; lower heater or laser power."
            )
        return conversion

    def mvm_energy_j(self, num_inputs: int, num_outputs: int, num_shifters: int) -> float:
        static = self._static_power_w(num_inputs, num_shifters) / self.config.clock_hz
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
            time += num_rounds * c.thermal_tuning_time_s
            energy += num_tiles * self._heater_power_w(shifters) * c.thermal_tuning_time_s
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

    def _heater_power_w(self, num_shifters: int) -> float:
        return num_shifters * self.config.heater_power_per_pi_w

    def reconfiguration(self, old: UnitPhases, new: UnitPhases) -> Reconfiguration:
        """Setting ``new`` phases: one tuning time if any heater changes; heaters burn while settling."""
        changed = 0
        power = 0.0
        for before, after in zip(old.tensors(), new.tensors(), strict=True):
            wrapped = after.detach().remainder(2 * math.pi)
            changed += int((before.detach().remainder(2 * math.pi) != wrapped).sum())
            power += float(wrapped.sum()) / math.pi * self.config.heater_power_per_pi_w
        if changed == 0:
            return Reconfiguration(0.0, 0.0, 0)
        time = self.config.thermal_tuning_time_s
        return Reconfiguration(time, power * time, changed)

    def gpu_tops_per_w(self) -> float:
        c = self.config
        tops = {"int8": c.gpu_int8_tops, "fp16": c.gpu_fp16_tops, "fp32": c.gpu_fp32_tops}
        return tops[c.gpu_precision] / c.gpu_power_w

    def times_gpu(self, cost: Cost) -> float:
        """Energy efficiency relative to the GPU at ``gpu_precision``."""
        return cost.tops_per_w / self.gpu_tops_per_w()

    def predict_power_w(self, tops: float, mesh_size: int) -> float:
        """Power of an engine of mesh_size units at ``clock_hz`` that delivers ``tops``."""
        per_mvm = self.mvm_energy_j(mesh_size, mesh_size, num_unit_shifters(mesh_size))
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
) -> list[Prediction]:
    """What the calibrated model predicts for a figure it was not fitted to (docs/hardware.md §4.1).

    Lightmatter (Nature 2025) reports 65.5 TOPS at ~80 W; the model builds that
    throughput from PACE-sized 64 x 64 units at ``clock_hz``.
    """
    power = cost.predict_power_w(lightmatter_tops, mesh_size)
    return [
        Prediction("Lightmatter power at 65.5 TOPS", power, lightmatter_power_w, "W"),
        Prediction(
            "Lightmatter efficiency",
            lightmatter_tops / power,
            lightmatter_tops / lightmatter_power_w,
            "TOPS/W",
        ),
    ]
