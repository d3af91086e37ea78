"""The PCM node as the cluster cost model sees it: programming, analog MVMs, digital rest.

Per operation (one layer, one pass, one micro-batch on one node), with the
counts the PCM backend's counters use (``nodes.pcm.backend``), so a
functional run's emulated clock and ``wafer simulate --backend pcm`` agree:

- **program**: every weight matrix the pass reads is programmed onto its
  tiles first (``PcmCost.program``: program-and-verify, tiles in rounds of
  the node's cores, ``devices_programmed_in_parallel`` devices per array at a time).
  Training changes every weight each step, so every device is rewritten in
  the forward pass; the analog backward re-programs in streaming mode, where
  later layers overwrote the arrays.
- **calibration**: with drift compensation, each programming reads the
  compensation baseline (one one-hot vector per input row).
- **mvm**: each vector through each tile (``PcmCost.matmul`` on the node's
  ``num_chips * cores_per_chip`` cores).
- **digital**: the rest on the node's digital unit: biases, activations,
  attention, and in hardware-aware training the whole backward pass (ideal
  backward) or everything but the transposed reads (analog backward).

What depends on the operating mode and the backward pass is counted by their strategy
objects (``nodes.pcm.modes``), which the functional backend runs too.

Sparsity does not speed the arrays up (a pruned weight is a zero-conductance
pair that is still read); it only shrinks the bytes streamed.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING

from core.cost.engine import AcceleratorEngine, MatmulWork, OpCost, Tally, matmul_work
from core.cost.hardware import Precision

if TYPE_CHECKING:
    from core.cost.operation import Operation
    from core.cost.workload import Workload
    from nodes.pcm.backend import PcmBackend


class PcmEngine(AcceleratorEngine):
    component = "pcm"

    def __init__(self, backend: PcmBackend.Config) -> None:
        super().__init__(backend.digital.build())
        self.backend = backend
        self.cost = backend.cost.build()
        self.mode = self.cost.operating_mode(backend.tile, backend.periphery)
        self.transposed_mode = replace(self.mode, rows=self.mode.cols, cols=self.mode.rows)
        self.num_cores = (
            backend.weight_stationary.num_chips * backend.weight_stationary.cores_per_chip
        )
        self.compensates = backend.device.drift_compensation.kind != "none"
        self.operating_mode = backend.operating_mode
        self.backward_pass = backend.training.backward_pass
        self.placement = backend.weight_stationary.build(backend.tile.build())

    @property
    def name(self) -> str:
        mode = self.mode
        return (
            f"PCM {self.num_cores} cores {mode.rows}x{mode.cols} ({mode.num_phases}-phase, "
            f"{self.operating_mode.name}) + {self.digital.config.name}"
        )

    def peak_flops(self, precision: Precision) -> float:
        analog = self.num_cores * 2 * self.mode.num_macs / self.cost.mvm(self.mode).time_s
        return analog + self.digital.config.flops_per_s

    def check(self, workload: Workload) -> None:
        """In weight-stationary mode, every matrix needs arrays of its own on the node's chips."""
        self.operating_mode.check_fit(
            self.placement,
            [(m.num_outputs, m.num_inputs) for layer in workload.layers for m in layer.matmuls],
        )

    @property
    def write_cycles_per_step(self) -> int:
        """Pulses each device takes per training step: a programming per pass that programs."""
        programmings = 1 + self.backward_pass.programmings(self.operating_mode)
        return programmings * self.backend.cost.program_verify_iterations

    def details(self, step_time_s: float) -> dict[str, float]:
        steps = self.backend.cost.endurance_cycles / self.write_cycles_per_step
        return {
            "write_cycles_per_device_per_step": float(self.write_cycles_per_step),
            "endurance_steps": steps,
            "endurance_lifetime_s": steps * step_time_s,
        }

    def _tiles(self, num_outputs: int, num_inputs: int) -> tuple[int, int]:
        """(tiles, devices per tile): a differential pair per weight, tiles cut as Tile.split."""
        mode = self.mode
        num_tiles = math.ceil(num_inputs / mode.rows) * math.ceil(num_outputs / mode.cols)
        return num_tiles, 2 * min(mode.rows, num_inputs) * min(mode.cols, num_outputs)

    def program(self, work: MatmulWork, tally: Tally) -> None:
        """Programming ``work``'s matrix (and its drift-compensation baseline read)."""
        num_tiles, devices = self._tiles(work.num_outputs, work.num_inputs)
        program = self.cost.program([devices] * num_tiles, self.mode, self.num_cores)
        tally.add("program", program.time_s, program.energy_j)
        if self.compensates:
            self.read(work.num_outputs, work.num_inputs, work.num_inputs, "calibration", tally)

    def read(
        self, num_outputs: int, num_inputs: int, num_vectors: int, part: str, tally: Tally
    ) -> None:
        """``num_vectors`` forward reads of every tile of a matrix, charged to ``part``."""
        cost = self.cost.matmul(self.mode, num_outputs, num_inputs, num_vectors, self.num_cores)
        tally.add(part, cost.time_s, cost.energy_j)

    def read_transposed(self, work: MatmulWork, tally: Tally) -> None:
        """grad_x = grad_y W through the transposed tiles: columns driven, rows converted."""
        cost = self.cost.matmul(
            self.transposed_mode,
            work.num_inputs,
            work.num_outputs,
            work.num_vectors,
            self.num_cores,
        )
        tally.add("mvm_transposed", cost.time_s, cost.energy_j)

    def op_cost(self, op: Operation, precision: Precision) -> OpCost:
        tally = Tally()
        works = matmul_work(op)
        if op.phase == "forward":
            # Either forward pass programs and reads the arrays (an ideal one only discards
            # what it read), so the forward's cost does not depend on it.
            analog_flops = sum(w.flops for w in works)
            for w in works:
                self.program(w, tally)
                self.read(w.num_outputs, w.num_inputs, w.num_vectors, "mvm", tally)
            self.charge_digital(max(0.0, op.flops_per_node - analog_flops), tally)
        else:
            self.backward_pass.op_cost(self, op, works, self.operating_mode, tally)
        return tally.cost()

    def deployment(self, workload: Workload) -> OpCost:
        """Programming every matrix once: the trained model on the arrays for inference."""
        tally = Tally()
        for layer in workload.layers:
            for m in layer.matmuls:
                self.program(MatmulWork(m.num_outputs, m.num_inputs, 1), tally)
        return tally.cost()


__all__ = ["PcmEngine"]
