"""Loader of photonic presets (``core/presets/photonic_*.yaml``), and the YAML form of a device."""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.config import doc, field_docs, from_dict, yaml_text
from core.presets import PRESET_DIR  # noqa: E402 (bundled presets live in one folder)
from nodes.photonic.calibration import PhaseCalibration
from nodes.photonic.cost import PhotonicCost
from nodes.photonic.device import PhotonicCore
from nodes.photonic.nonideal import (
    DetectionNoise,
    InsertionLoss,
    PhaseError,
    PhaseQuantization,
    Readout,
    ShifterGainError,
    SplitterImbalance,
    ThermalCrosstalk,
)

#: The realistic device a backend config starts from.
DEFAULT_PRESET = "photonic_taichi"


def load_preset(name_or_path: str | Path = DEFAULT_PRESET) -> PhotonicCore.Config:
    """The physical device of a bundled preset (by name) or of a YAML file (by path)."""
    bundled = PRESET_DIR / f"{name_or_path}.yaml"
    path = bundled if bundled.is_file() else Path(name_or_path)
    if path.suffix not in (".yaml", ".yml") or not path.is_file():
        known = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("photonic_*.yaml")))
        raise ValueError(
            f"Unknown photonic preset {str(name_or_path)!r}; choose one of {known} or give a YAML path."
        )
    data = yaml_text(path.read_text())
    if not isinstance(data, dict) or set(data) != {"device"}:
        raise ValueError(
            f"Photonic preset {str(path)!r} must be a mapping with one section, 'device'."
        )
    return from_dict(PhotonicCore.Config, data["device"], "device")


@functools.cache
def _default_preset() -> PhotonicCore.Config:
    return load_preset(DEFAULT_PRESET)


def _from_preset(name: str) -> Any:
    """A field of ``PhotonicCore.Config`` whose default is the default preset's value."""
    return doc(
        f"{field_docs(PhotonicCore.Config)[name]} (default: the {DEFAULT_PRESET} preset's)",
        # A copy: the cached preset is shared, a config's sections are its own.
        default_factory=lambda: copy.deepcopy(getattr(_default_preset(), name)),
    )


@dataclass(kw_only=True)
class PresetDevice(PhotonicCore.Config):
    """How a backend config reads its ``device:`` mapping: an overlay on the realistic preset.

    ``PhotonicCore.Config`` leaves every error section at None (ideal), so reading a partial
    mapping into it would silently switch off every section not written out. Here a section
    not given keeps the preset's value and a section given as null is ideal. Fields inside a
    given section default to their dataclass defaults, which are the preset's numbers
    (``tests/nodes/photonic/test_photonic_preset.py``). ``PhotonicBackend.Config`` turns it back
    into a plain ``PhotonicCore.Config``.
    """

    mesh_size: int = _from_preset("mesh_size")
    phase_quantization: PhaseQuantization.Config | None = _from_preset("phase_quantization")
    phase_error: PhaseError.Config | None = _from_preset("phase_error")
    gain_error: ShifterGainError.Config | None = _from_preset("gain_error")
    crosstalk: ThermalCrosstalk.Config | None = _from_preset("crosstalk")
    insertion_loss: InsertionLoss.Config | None = _from_preset("insertion_loss")
    splitter_imbalance: SplitterImbalance.Config | None = _from_preset("splitter_imbalance")
    detection_noise: DetectionNoise.Config | None = _from_preset("detection_noise")
    readout: Readout.Config | None = _from_preset("readout")
    calibration: PhaseCalibration.Config | None = _from_preset("calibration")
    cost: PhotonicCost.Config = _from_preset("cost")

    def plain(self) -> PhotonicCore.Config:
        """The same device as a ``PhotonicCore.Config``."""
        return PhotonicCore.Config(
            **{name: getattr(self, name) for name in field_docs(PhotonicCore.Config)}
        )
