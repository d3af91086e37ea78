"""Shared fixtures: a hardware config with round numbers, so step times can be worked by hand."""

from __future__ import annotations

import pytest

from core.cost.hardware import Hardware, MemoryXCost, SwarmXCost, WaferCost


def round_hardware(
    *, hop_latency_s: float = 1e-3, sram_bytes: float = 1e9, max_systems: int = 64
) -> Hardware.Config:
    """Effective compute 5e11 FLOP/s, streams at 1e9 B/s, updates 1e9 params/s."""
    return Hardware.Config(
        name="round",
        wafer=WaferCost.Config(
            name="round-wafer",
            num_cores=1000,
            sram_bytes=sram_bytes,
            activation_sram_fraction=0.5,
            peak_flops_16bit=1e12,
            peak_flops_fp32=0.25e12,
            compute_efficiency=0.5,
            io_bandwidth_bytes_per_s=1e9,
            power_w=1000.0,
            idle_power_fraction=0.5,
        ),
        memoryx=MemoryXCost.Config(
            capacity_options_bytes=[1e12, 1e11],
            state_bytes_per_param=20.0,
            bandwidth_bytes_per_s=2e9,
            update_params_per_s=1e9,
            power_w=100.0,
        ),
        swarmx=SwarmXCost.Config(
            fan_out=4,
            port_bandwidth_bytes_per_s=0.5e9,
            num_lanes=4,
            hop_latency_s=hop_latency_s,
            power_w_per_node=10.0,
            max_systems=max_systems,
        ),
    )


@pytest.fixture
def hardware() -> Hardware.Config:
    return round_hardware()
