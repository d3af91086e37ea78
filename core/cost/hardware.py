"""Typed hardware configs of the analytic cost model: wafer, MemoryX, SwarmX.

The numbers live in the preset files (``core/presets/*.yaml``) with their
sources; these dataclasses only give them names, units and validation. Each
``Config.build()`` returns a small cost object whose methods turn bytes and
FLOPs into seconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from core.config import doc
from core.precision import Precision


def _require_positive(config: object, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not value > 0:
            raise ValueError(f"{name} = {value!r} is not valid; it must be greater than 0.")


def _require_fraction(config: object, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not 0 < value <= 1:
            raise ValueError(f"{name} = {value!r} is not valid; it must be in (0, 1].")


class WaferCost:
    """One compute system (CS-2, CS-3): compute time and stream time of its I/O."""

    @dataclass(kw_only=True)
    class Config:
        name: str = doc("system name shown in tables, e.g. CS-2")
        num_cores: int = doc("compute cores on the wafer, count")
        sram_bytes: float = doc("on-wafer SRAM, bytes")
        activation_sram_fraction: float = doc(
            "share of SRAM that may hold activations kept for backward, fraction"
        )
        peak_flops_16bit: float = doc("dense peak with fp16/bf16/cbfloat16 operands, FLOP/s")
        peak_flops_fp32: float = doc("dense peak with fp32 operands, FLOP/s")
        compute_efficiency: float = doc("achieved share of peak on large layers, fraction")
        io_bandwidth_bytes_per_s: float = doc("system I/O to SwarmX/MemoryX, bytes/s")
        power_w: float = doc("system power while computing, W")
        idle_power_fraction: float = doc("power while waiting on streams / power_w, fraction")
        # Unstructured sparsity: the wafer's dataflow cores skip multiplications by zero
        # weights, so weight FLOPs run speedup(d) = min(max_sparse_speedup,
        # 1 + sparse_speedup_efficiency * (1/d - 1)) times faster at weight density d.
        max_sparse_speedup: float = doc(
            "cap of the weight-FLOP speedup from unstructured sparsity (vendor: up to ~8-10x), x",
            default=8.0,
        )
        sparse_speedup_efficiency: float = doc(
            "share of the ideal 1/density speedup achieved below the cap (1.0: linear), fraction",
            default=1.0,
        )

        def __post_init__(self) -> None:
            _require_positive(
                self,
                "num_cores",
                "sram_bytes",
                "peak_flops_16bit",
                "peak_flops_fp32",
                "io_bandwidth_bytes_per_s",
                "power_w",
            )
            _require_fraction(self, "activation_sram_fraction", "compute_efficiency")
            if self.max_sparse_speedup < 1:
                raise ValueError(
                    f"max_sparse_speedup = {self.max_sparse_speedup!r} is not valid; "
                    "it must be >= 1 (1: sparsity gives no compute speedup)."
                )
            if not 0 <= self.sparse_speedup_efficiency <= 1:
                raise ValueError(
                    f"sparse_speedup_efficiency = {self.sparse_speedup_efficiency!r} is not "
                    "valid; it must be in [0, 1]."
                )
            if not 0 <= self.idle_power_fraction <= 1:
                raise ValueError(
                    f"idle_power_fraction = {self.idle_power_fraction!r} is not valid; "
                    "it must be in [0, 1]."
                )

        def build(self) -> WaferCost:
            return WaferCost(self)

    def __init__(self, config: Config) -> None:
        self.config = config

    def peak_flops(self, precision: Precision) -> float:
        return self.config.peak_flops_fp32 if precision == "fp32" else self.config.peak_flops_16bit

    def sparse_speedup(self, density: float) -> float:
        """How much faster weight FLOPs run at weight ``density`` (1.0 when dense)."""
        assert 0 <= density <= 1, density
        c = self.config
        if density == 0:
            return c.max_sparse_speedup
        return min(c.max_sparse_speedup, 1 + c.sparse_speedup_efficiency * (1 / density - 1))

    def sparse_flops(self, flops: float, weight_flops_fraction: float, density: float) -> float:
        """Dense-equivalent FLOPs the wafer spends on ``flops`` of a layer at ``density``."""
        weight_part = flops * weight_flops_fraction
        return flops - weight_part + weight_part / self.sparse_speedup(density)

    def compute_time_s(self, flops: float, precision: Precision) -> float:
        return flops / (self.config.compute_efficiency * self.peak_flops(precision))

    @property
    def activation_budget_bytes(self) -> float:
        return self.config.sram_bytes * self.config.activation_sram_fraction


class MemoryXCost:
    """The parameter store: capacity, stream bandwidth and the optimizer update."""

    @dataclass(kw_only=True)
    class Config:
        capacity_options_bytes: list[float] = doc(
            "MemoryX capacities one can buy, bytes (a cluster picks one)"
        )
        state_bytes_per_param: float = doc(
            "model state kept per parameter (fp32 weight, Adam m and v, gradient), bytes"
        )
        bandwidth_bytes_per_s: float = doc("MemoryX stream bandwidth to SwarmX, bytes/s")
        update_params_per_s: float = doc("optimizer update throughput, parameters/s")
        power_w: float = doc("MemoryX power, W")

        def __post_init__(self) -> None:
            if not self.capacity_options_bytes or min(self.capacity_options_bytes) <= 0:
                raise ValueError(
                    f"capacity_options_bytes = {self.capacity_options_bytes!r} is not valid; "
                    "give at least one capacity, each greater than 0 bytes."
                )
            self.capacity_options_bytes = sorted(self.capacity_options_bytes)
            _require_positive(
                self,
                "state_bytes_per_param",
                "bandwidth_bytes_per_s",
                "update_params_per_s",
                "power_w",
            )

        def build(self) -> MemoryXCost:
            return MemoryXCost(self)

    def __init__(self, config: Config) -> None:
        self.config = config

    def state_bytes(self, num_params: float) -> float:
        return num_params * self.config.state_bytes_per_param

    def update_time_s(self, num_params: float) -> float:
        return num_params / self.config.update_params_per_s

    @property
    def largest_capacity_bytes(self) -> float:
        return self.config.capacity_options_bytes[-1]


class SwarmXCost:
    """The broadcast-reduce tree between MemoryX and the systems."""

    @dataclass(kw_only=True)
    class Config:
        fan_out: int = doc("systems or child nodes per SwarmX node, count")
        port_bandwidth_bytes_per_s: float = doc("one SwarmX port, bytes/s")
        num_lanes: int = doc("parallel trees, one per system I/O port, count")
        hop_latency_s: float = doc("latency added per tree level, s")
        power_w_per_node: float = doc("power of one SwarmX node, W")
        max_systems: int = doc("largest supported cluster, systems")

        def __post_init__(self) -> None:
            if self.fan_out < 2:
                raise ValueError(f"fan_out = {self.fan_out!r} is not valid; it must be at least 2.")
            _require_positive(
                self, "port_bandwidth_bytes_per_s", "num_lanes", "power_w_per_node", "max_systems"
            )
            if self.hop_latency_s < 0:
                raise ValueError(
                    f"hop_latency_s = {self.hop_latency_s!r} is not valid; it must be >= 0 s."
                )

        def build(self) -> SwarmXCost:
            return SwarmXCost(self)

    def __init__(self, config: Config) -> None:
        self.config = config

    def depth(self, num_systems: int) -> int:
        """Tree levels between MemoryX and the systems: ceil(log_fan_out N), 0 for one system."""
        depth, reach = 0, 1
        while reach < num_systems:  # integer loop: math.log rounds 4**k badly
            reach *= self.config.fan_out
            depth += 1
        return depth

    def nodes_per_level(self, num_systems: int) -> list[int]:
        """SwarmX node count per level, level 1 next to the systems."""
        counts, width = [], num_systems
        for _ in range(self.depth(num_systems)):
            width = math.ceil(width / self.config.fan_out)
            counts.append(width)
        return counts

    @property
    def bandwidth_bytes_per_s(self) -> float:
        return self.config.port_bandwidth_bytes_per_s * self.config.num_lanes

    def latency_s(self, num_systems: int) -> float:
        return self.depth(num_systems) * self.config.hop_latency_s


class Hardware:
    """A preset: one wafer type, its MemoryX and its SwarmX."""

    @dataclass(kw_only=True)
    class Config:
        name: str = doc("preset name, e.g. cs2")
        description: str = doc("one line shown in tables", default="")
        wafer: WaferCost.Config = doc("the compute system")
        memoryx: MemoryXCost.Config = doc("the parameter store")
        swarmx: SwarmXCost.Config = doc("the broadcast-reduce fabric")

        def build(self) -> Hardware:
            return Hardware(self)

    def __init__(self, config: Config) -> None:
        self.config = config
        self.wafer = config.wafer.build()
        self.memoryx = config.memoryx.build()
        self.swarmx = config.swarmx.build()

    @property
    def stream_bandwidth_bytes_per_s(self) -> float:
        """Weights in and gradients out run at the slowest of the three links."""
        return min(
            self.wafer.config.io_bandwidth_bytes_per_s,
            self.swarmx.bandwidth_bytes_per_s,
            self.memoryx.config.bandwidth_bytes_per_s,
        )


__all__ = [
    "Hardware",
    "MemoryXCost",
    "Precision",
    "SwarmXCost",
    "WaferCost",
]
