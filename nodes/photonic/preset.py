"""Loader of photonic presets (``emulator/presets/photonic_*.yaml``)."""

from __future__ import annotations

from pathlib import Path

import yaml

from emulator.configbase import from_dict
from nodes.photonic.device import PhotonicCore

PRESET_DIR = Path(__file__).resolve().parents[2] / "emulator" / "presets"


def load_preset(name_or_path: str | Path = "photonic_taichi") -> PhotonicCore.Config:
    """The physical device of a bundled preset (by name) or of a YAML file (by path)."""
    bundled = PRESET_DIR / f"{name_or_path}.yaml"
    path = bundled if bundled.is_file() else Path(name_or_path)
    if path.suffix not in (".yaml", ".yml") or not path.is_file():
        known = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("photonic_*.yaml")))
        raise ValueError(
            f"Unknown photonic preset {str(name_or_path)!r}; choose one of {known} or give a YAML path."
        )
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict) or set(data) != {"device"}:
        raise ValueError(
            f"Photonic preset {str(path)!r} must be a mapping with one section, 'device'."
        )
    return from_dict(PhotonicCore.Config, data["device"], "device")
