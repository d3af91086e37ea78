"""Emulated phase-change-memory analog in-memory compute (IBM 64-core chip).

Plain torch physics and cost model; the compute-node backend wraps these functions.
"""

from nodes.pcm.analog import (
    WeightStationary,
    analog_matmul,
    analog_matmul_transposed,
    calibrate_drift,
    drift_compensation_scale,
    drift_readout,
    program_layer,
)
from nodes.pcm.config import PcmConfig, load_preset
from nodes.pcm.cost import MvmMode, PcmCost, WriteCycleCounter
from nodes.pcm.device import PcmDevice
from nodes.pcm.modes import HardwareAware
from nodes.pcm.periphery import Periphery
from nodes.pcm.tile import ProgrammedMatrix, Tile

__all__ = [
    "HardwareAware",
    "MvmMode",
    "PcmConfig",
    "PcmCost",
    "PcmDevice",
    "Periphery",
    "ProgrammedMatrix",
    "Tile",
    "WeightStationary",
    "WriteCycleCounter",
    "analog_matmul",
    "analog_matmul_transposed",
    "calibrate_drift",
    "drift_compensation_scale",
    "drift_readout",
    "load_preset",
    "program_layer",
]
