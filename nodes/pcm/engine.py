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

    @property
    def name(self) -> str:
        mode = self.mode
        return (
            f"PCM {self.num_cores} cores {mode.rows}x{mode.cols} ({mode.num_phases}-phase, "
            f"{self.backend.mode}) + {self.digital.config.name}"
        )

    def peak_flops(self, precision: Precision) -> float:
        analog = self.num_cores * 2 * self.mode.num_macs / self.cost.mvm(self.mode).time_s
        return analog + self.digital.config.flops_per_s

    def check(self, workload: Workload) -> None:
        """In weight-stationary mode, every matrix needs arrays of its own on the node's chips."""
        if self.backend.mode == "weight-stationary":
            placement = self.backend.weight_stationary.build(self.backend.tile.build())
            placement.place(
                [(m.num_outputs, m.num_inputs) for layer in workload.layers for m in layer.matmuls]
            )

    @property
    def write_cycles_per_step(self) -> int:
        """Pulses each device takes per training step: a programming per pass that programs."""
        programmings = 1
        if self.backend.training.backward == "analog" and self.backend.mode == "streaming":
            programmings = 2
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

    def _program(self, work: MatmulWork, tally: Tally) -> None:
        num_tiles, devices = self._tiles(work.num_outputs, work.num_inputs)
        program = self.cost.program([devices] * num_tiles, self.mode, self.num_cores)
        tally.add("program", program.time_s, program.energy_j)
        if self.compensates:
            self._read(work.num_outputs, work.num_inputs, work.num_inputs, "calibration", tally)

    def _read(
        self, num_outputs: int, num_inputs: int, num_vectors: int, part: str, tally: Tally
    ) -> None:
        cost = self.cost.matmul(self.mode, num_outputs, num_inputs, num_vectors, self.num_cores)
        tally.add(part, cost.time_s, cost.energy_j)

    def op_cost(self, op: Operation, precision: Precision) -> OpCost:
        tally = Tally()
        works = matmul_work(op)
        analog_flops = sum(w.flops for w in works)
        if op.phase == "forward":
            for w in works:
                self._program(w, tally)
                self._read(w.num_outputs, w.num_inputs, w.num_vectors, "mvm", tally)
            self._digital(max(0.0, op.flops_per_node - analog_flops), tally)
        elif self.backend.training.backward == "ideal":
            # Hardware-aware training: the backward pass is exact, i.e. digital.
            weight_products = analog_flops * (2 if op.has_input_gradient else 1)
            self._digital(max(op.flops_per_node, weight_products), tally)
        else:
            transposed = 0.0
            for w in works:
                if self.backend.mode == "streaming":
                    self._program(w, tally)
                # Re-read forward: the node kept only the layer input, not the analog outputs.
                self._read(w.num_outputs, w.num_inputs, w.num_vectors, "mvm_recompute", tally)
                if op.has_input_gradient:
                    # grad_x = grad_y W through the transposed tiles: the columns are driven
                    # and the rows converted, as the backend counts it.
                    cost = self.cost.matmul(
                        self.transposed_mode,
                        w.num_inputs,
                        w.num_outputs,
                        w.num_vectors,
                        self.num_cores,
                    )
                    tally.add("mvm_transposed", cost.time_s, cost.energy_j)
                    transposed += w.flops
            self._digital(max(0.0, op.flops_per_node - transposed), tally)
        return tally.cost()

    def deployment(self, workload: Workload) -> OpCost:
        """Programming every matrix once: the trained model on the arrays for inference."""
        tally = Tally()
        for layer in workload.layers:
            for m in layer.matmuls:
                self._program(MatmulWork(m.num_outputs, m.num_inputs, 1), tally)
        return tally.cost()


__all__ = ["PcmEngine"]
