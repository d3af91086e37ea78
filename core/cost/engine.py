"""What one compute node costs per operation: the node engine of the cost model.

The timeline (``emulator.cost.timeline``) moves weights, gradients and updates
between MemoryX, SwarmX and the nodes; how long a node computes one layer, and
what energy that takes, is the node engine's answer. Each backend has one:

- ``WaferEngine`` (``nodes.cs2``): the digital wafer of the preset (CS-2, CS-3): FLOPs at the
  achieved share of peak, unstructured sparsity skipped;
- the PCM engine (``nodes.pcm.engine``): crossbar programming, analog MVMs
  and a digital unit for the rest;
- the photonic engine (``nodes.photonic.engine``): phase reconfiguration,
  optical MVMs and a digital unit.

``Backend.Config.engine(hardware)`` picks it, so the same timeline serves
``wafer train`` (a measured workload) and ``wafer simulate --backend``.
Plain numbers in, plain numbers out: nothing here imports torch, Ray or gRPC.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

from core.config import doc
from core.cost.hardware import Precision

if TYPE_CHECKING:
    from core.cost.operation import Operation
    from core.cost.workload import Workload


@dataclass(frozen=True)
class OpCost:
    """One operation (a layer in one pass of one micro-batch) on one node."""

    time_s: float = doc("time the node is busy with it, s")
    energy_j: float = doc("energy above the node's idle power, J")
    time_by_part_s: dict[str, float] = doc(
        "busy time by part (program, mvm, digital, ...), s", default_factory=dict
    )
    energy_by_part_j: dict[str, float] = doc("energy by part, J", default_factory=dict)

    @staticmethod
    def of_parts(time_by_part_s: dict[str, float], energy_by_part_j: dict[str, float]) -> OpCost:
        """Parts run one after another: the operation's time is their sum."""
        return OpCost(
            time_s=sum(time_by_part_s.values()),
            energy_j=sum(energy_by_part_j.values()),
            time_by_part_s=time_by_part_s,
            energy_by_part_j=energy_by_part_j,
        )


class NodeEngine(ABC):
    """The compute side of one node, as the cost model sees it."""

    #: Short key of the node's energy and time in reports ("wafer", "pcm", "photonic").
    component: str = "node"
    #: Where a node keeps activations, in reports.
    activation_memory: str = "node memory"

    @property
    @abstractmethod
    def name(self) -> str:
        """One line naming the node in tables, e.g. 'CS-2' or 'PCM 64-core x1 + H100'."""

    @property
    @abstractmethod
    def activation_budget_bytes(self) -> float:
        """Memory a node gives the activations it keeps for backward, bytes."""

    @property
    def activation_budget_source(self) -> str:
        """Where ``activation_budget_bytes`` comes from, for error messages."""
        return f"{self.activation_memory} a {self.name} node gives them"

    @property
    @abstractmethod
    def idle_power_w(self) -> float:
        """Power while the node waits on streams, W."""

    @abstractmethod
    def peak_flops(self, precision: Precision) -> float:
        """Peak dense-equivalent throughput, FLOP/s (2 per MAC), for utilization figures."""

    @abstractmethod
    def op_cost(self, op: Operation, precision: Precision) -> OpCost:
        """Time and energy of ``op`` on one node."""

    def check(self, workload: Workload) -> None:
        """ValueError (with the numbers) if a node cannot hold ``workload`` at all."""
        return None  # a streaming node holds one layer at a time

    def details(self, step_time_s: float) -> dict[str, float]:
        """Named backend figures for reports (e.g. projected endurance); none by default."""
        return {}

    def deployment(self, workload: Workload) -> OpCost:
        """One-off cost of putting weights trained elsewhere on one node (none if digital)."""
        return OpCost(0.0, 0.0)


class DigitalUnit:
    """The digital processor beside an analog core: what the analog arrays do not compute.

    Analog nodes compute their weight products in the arrays; biases,
    activations, attention and (in hardware-aware training) the backward pass
    run on a digital unit. Its defaults are an H100 SXM at FP16 (docs/hardware.md
    §5), the digital baseline the analog papers compare against.
    """

    @dataclass(kw_only=True)
    class Config:
        # docs/hardware.md §5: H100 SXM dense FP16 989 TFLOP/s at 700 W.
        flops_per_s: float = doc("dense throughput, FLOP/s", default=989e12)
        power_w: float = doc("power while computing, W", default=700.0)
        # Vendor datasheet: H100 SXM has 80 GB of HBM3.
        memory_bytes: float = doc("memory for kept activations, bytes", default=80e9)
        name: str = doc("name shown in tables", default="H100 FP16")

        def __post_init__(self) -> None:
            for name in ("flops_per_s", "power_w", "memory_bytes"):
                if not getattr(self, name) > 0:
                    raise ValueError(
                        f"digital.{name} = {getattr(self, name)!r} is not valid; it must be > 0."
                    )

        def build(self) -> DigitalUnit:
            return DigitalUnit(self)

    def __init__(self, config: Config) -> None:
        self.config = config

    def time_s(self, flops: float) -> float:
        return flops / self.config.flops_per_s

    def energy_j(self, flops: float) -> float:
        return self.time_s(flops) * self.config.power_w


class Tally:
    """Time and energy of an operation's parts as they add up; ``cost()`` is the total."""

    def __init__(self) -> None:
        self.time_by_part_s: dict[str, float] = {}
        self.energy_by_part_j: dict[str, float] = {}

    def add(self, part: str, time_s: float, energy_j: float) -> None:
        self.time_by_part_s[part] = self.time_by_part_s.get(part, 0.0) + time_s
        self.energy_by_part_j[part] = self.energy_by_part_j.get(part, 0.0) + energy_j

    def cost(self) -> OpCost:
        return OpCost.of_parts(self.time_by_part_s, self.energy_by_part_j)


class AcceleratorEngine(NodeEngine):
    """A node whose arrays or meshes do the weight products and a ``DigitalUnit`` the rest.

    Activations are kept in the digital unit's memory. The arrays' running power is in
    their calibrated per-operation energy and the digital unit is charged per FLOP, so a
    node waiting on streams costs nothing extra in this model.
    """

    def __init__(self, digital: DigitalUnit) -> None:
        self.digital = digital

    @property
    def activation_budget_bytes(self) -> float:
        return self.digital.config.memory_bytes

    @property
    def idle_power_w(self) -> float:
        return 0.0

    def charge_digital(self, flops: float, tally: Tally) -> None:
        """``flops`` on the node's digital unit, charged to the ``digital`` part."""
        tally.add("digital", self.digital.time_s(flops), self.digital.energy_j(flops))


@dataclass(frozen=True)
class MatmulWork:
    """One weight product of an operation on one node: the matrix and the vectors through it."""

    num_outputs: int = doc("rows of the weight matrix, count")
    num_inputs: int = doc("columns of the weight matrix, count")
    num_vectors: int = doc("input vectors through it in this operation, count")

    @property
    def flops(self) -> float:
        return 2.0 * self.num_outputs * self.num_inputs * self.num_vectors


def matmul_work(op: Operation) -> list[MatmulWork]:
    """The weight products of ``op`` with their vector counts on one node."""
    return [
        MatmulWork(m.num_outputs, m.num_inputs, max(1, round(m.vectors_per_sample * op.samples)))
        for m in op.matmuls
    ]


__all__ = [
    "AcceleratorEngine",
    "DigitalUnit",
    "MatmulWork",
    "NodeEngine",
    "OpCost",
    "Tally",
    "matmul_work",
]
