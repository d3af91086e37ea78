"""Everything a PCM node is configured with, and loading the chip preset."""

from __future__ import annotations

from dataclasses import dataclass

from core.config import doc, from_dict, yaml_text
from core.cost.engine import DigitalUnit
from core.presets import PRESET_DIR  # noqa: E402 (bundled presets live in one folder)
from nodes.pcm.analog import WeightStationary
from nodes.pcm.cost import PcmCost
from nodes.pcm.device import PcmDevice
from nodes.pcm.modes import HardwareAware
from nodes.pcm.periphery import Periphery
from nodes.pcm.tile import Tile


@dataclass(kw_only=True)
class PcmConfig:
    """The PCM chip: devices, tiles, periphery, cost model, placement and training mode."""

    device: PcmDevice.Config = doc("device physics", default_factory=PcmDevice.Config)
    tile: Tile.Config = doc(
        "crossbar tile geometry and weight mapping", default_factory=Tile.Config
    )
    periphery: Periphery.Config = doc(
        "DACs, ADCs and their management", default_factory=Periphery.Config
    )
    cost: PcmCost.Config = doc("time and energy model", default_factory=PcmCost.Config)
    weight_stationary: WeightStationary.Config = doc(
        "chips available when weights stay resident", default_factory=WeightStationary.Config
    )
    training: HardwareAware.Config = doc(
        "hardware-aware training mode", default_factory=HardwareAware.Config
    )
    digital: DigitalUnit.Config = doc(
        "the node's digital unit in the emulated clock", default_factory=DigitalUnit.Config
    )


def load_preset(name: str = "pcm_ibm64") -> PcmConfig:
    """Read ``core/presets/<name>.yaml`` into a validated ``PcmConfig``."""
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in PRESET_DIR.glob("pcm_*.yaml"))
        raise ValueError(
            f"PCM preset {name!r} not found in {PRESET_DIR}; available: {', '.join(available)}."
        )
    return from_dict(PcmConfig, yaml_text(path.read_text()) or {})


__all__ = ["PRESET_DIR", "PcmConfig", "load_preset"]
