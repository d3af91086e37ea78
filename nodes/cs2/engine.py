"""The CS-2/CS-3 wafer's node engine: what one layer costs the digital wafer of the preset."""

from __future__ import annotations

from typing import TYPE_CHECKING

from core.cost.engine import NodeEngine, OpCost
from core.cost.hardware import Precision, WaferCost
from core.units import format_bytes

if TYPE_CHECKING:
    from core.cost.operation import Operation


class WaferEngine(NodeEngine):
    """The preset's wafer: FLOPs at ``compute_efficiency`` of peak, zero weights skipped."""

    component = "wafer"
    activation_memory = "SRAM"

    def __init__(self, wafer: WaferCost) -> None:
        self.wafer = wafer

    @property
    def name(self) -> str:
        return self.wafer.config.name

    @property
    def activation_budget_bytes(self) -> float:
        return self.wafer.activation_budget_bytes

    @property
    def idle_power_w(self) -> float:
        c = self.wafer.config
        return c.idle_power_fraction * c.power_w

    @property
    def activation_budget_source(self) -> str:
        c = self.wafer.config
        return (
            f"SRAM a {c.name} gives them ({format_bytes(c.sram_bytes)} x "
            f"activation_sram_fraction {c.activation_sram_fraction:g})"
        )

    def peak_flops(self, precision: Precision) -> float:
        return self.wafer.peak_flops(precision)

    def op_cost(self, op: Operation, precision: Precision) -> OpCost:
        # Time-equivalent FLOPs: the preset's sparse speedup curve, not the ideal 1/density.
        flops = self.wafer.sparse_flops(
            op.flops_per_node, op.weight_flops_fraction, op.weight_density
        )
        time_s = self.wafer.compute_time_s(flops, precision)
        c = self.wafer.config
        energy_j = (1 - c.idle_power_fraction) * c.power_w * time_s
        return OpCost.of_parts({"compute": time_s}, {"compute": energy_j})
