"""The photonic node as the cluster cost model sees it: reconfiguration, optical MVMs, digital rest.

Per operation (one layer, one pass, one micro-batch on one node), counted as
the photonic backend's counters count it (``nodes.photonic.backend``), so a
functional run's emulated clock and ``wafer simulate --backend photonic``
agree on time:

- **program**: a streamed layer sets the phases of each of its tiles; cores
  tune in parallel, so ``ceil(tiles / num_cores)`` thermal tuning times, with
  every heater burning at its mean setting (pi) while it settles;
- **mvm**: rounds of ``num_cores`` tiles, each streaming every vector at the
  clock rate, plus the light's latency through a unit (``PhotonicCost``);
- **optics**: fixed optical stages (Taichi's multi-path units, ``OpticalPass``):
  paths side by side at the clock rate, each charged its conversions, held
  heaters and laser, the split of ``PhotonicCost``'s calibrated unit pass;
- **digital**: what the meshes do not compute, on the node's digital unit.

What runs where depends on the training method (docs/hardware.md §4.2, §4.3); each
method's count is in its strategy object (``nodes.photonic.training``), beside what its
backend runs:

- ``backprop`` trains on the digital twin, i.e. a computer: forward and
  backward are digital. Putting the result on the photonic node is the
  one-off ``deployment`` (programming every layer).
- ``ffm`` runs forward on the mesh; its backward re-programs the layer (the
  arrays held later layers), re-runs the forward to restore the stored field
  and sends the conjugated error through the same mesh (``ffm_error``).
- ``dfa`` runs forward on the mesh; its backward streams no weights, projects
  the output error through a fixed random matrix per hidden layer
  (``dfa_projection``, optical) and forms the weight gradient digitally.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from core.cost.engine import AcceleratorEngine, MatmulWork, OpCost, Tally, matmul_work
from core.cost.hardware import Precision
from nodes.photonic.training import program_tiles

if TYPE_CHECKING:
    from core.cost.operation import Operation
    from core.cost.workload import OpticalPass, Workload
    from nodes.photonic.backend import PhotonicBackend


class PhotonicEngine(AcceleratorEngine):
    component = "photonic"

    def __init__(self, backend: PhotonicBackend.Config) -> None:
        super().__init__(backend.digital.build())
        self.backend = backend
        self.cost = backend.device.cost.build()
        self.mesh_size = backend.mesh_size
        self.num_cores = backend.num_cores
        self.method = backend.method

    @property
    def name(self) -> str:
        n = self.mesh_size
        return (
            f"photonic {self.num_cores} x {n}x{n} MZI ({self.method.name}) + "
            f"{self.digital.config.name}"
        )

    def peak_flops(self, precision: Precision) -> float:
        return self.method.peak_flops(self)

    def _num_tiles(self, work: MatmulWork) -> int:
        n = self.mesh_size
        return math.ceil(work.num_outputs / n) * math.ceil(work.num_inputs / n)

    def program(self, work: MatmulWork, tally: Tally) -> None:
        """Setting every phase of ``work``'s tiles (``program_tiles``)."""
        programming = program_tiles(
            self.cost, self.mesh_size, self.num_cores, self._num_tiles(work)
        )
        tally.add("program", programming.time_s, programming.energy_j)

    def mvms(self, num_outputs: int, num_inputs: int, num_vectors: int, part: str, tally: Tally):
        cost = self.cost.streamed_matmul(
            num_outputs, num_inputs, num_vectors, self.mesh_size, self.num_cores
        )
        tally.add(part, cost.time_s, cost.energy_j)

    def program_stage(self, stage: OpticalPass, tally: Tally) -> None:
        """Set a stage's phases: its paths tune on the cores, ``ceil(paths / cores)`` rounds."""
        if stage.num_programmed == 0:
            return
        c = self.cost.config
        rounds = math.ceil(stage.num_paths / self.num_cores)
        heater_w = stage.num_paths * stage.num_programmed * c.heater_power_per_pi_w
        tally.add("program", rounds * c.thermal_tuning_time_s, heater_w * c.thermal_tuning_time_s)

    def light_stage(self, stage: OpticalPass, num_vectors: int, part: str, tally: Tally) -> None:
        """Vectors through every path: one clock each, paths ``num_cores`` at a time.

        Per path and vector, the calibrated conversion energy of its inputs and outputs
        plus its held heaters and (where light enters) the laser over one clock: over the
        three stages of a Taichi unit this is exactly ``PhotonicCost``'s calibrated pass.
        """
        rounds = math.ceil(stage.num_paths / self.num_cores)
        energy = self.cost.mvm_energy_j(
            stage.num_inputs, stage.num_outputs, stage.num_held_shifters
        )
        tally.add(
            part,
            rounds * num_vectors / self.cost.config.clock_hz,
            stage.num_paths * num_vectors * energy,
        )

    def op_cost(self, op: Operation, precision: Precision) -> OpCost:
        tally = Tally()
        for stage in op.optical_passes:
            num_vectors = max(1, round(stage.vectors_per_sample * op.samples))
            self.method.stage_cost(self, op, stage, num_vectors, tally)
        self.method.matmul_cost(self, op, matmul_work(op), tally)
        return tally.cost()

    def deployment(self, workload: Workload) -> OpCost:
        """Programming every layer's phases once: the trained model on the node."""
        tally = Tally()
        for layer in workload.layers:
            for m in layer.matmuls:
                self.program(MatmulWork(m.num_outputs, m.num_inputs, 1), tally)
            for stage in layer.optical_passes:
                self.program_stage(stage, tally)
        return tally.cost()


__all__ = ["PhotonicEngine"]
