"""Hardware presets: YAML data files a user copies and edits, and their loader.

``load_hardware("cs2")`` reads ``cs2.yaml`` next to this module;
``load_hardware("path/to/my.yaml")`` reads a user's copy. Overrides are dotted
paths (``{"wafer.compute_efficiency": 0.4}``) applied before validation, so a
bad override gets the same error as a bad file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.config import from_dict, yaml_text
from core.cost.hardware import Hardware

PRESET_DIR = Path(__file__).resolve().parent


def _is_cluster_preset(path: Path) -> bool:
    # The folder also holds presets of other components (e.g. PCM nodes).
    data = yaml_text(path.read_text())
    return isinstance(data, dict) and {"wafer", "memoryx", "swarmx"} <= data.keys()


def list_presets() -> list[str]:
    """Names of the bundled cluster hardware presets."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml") if _is_cluster_preset(p))


def _preset_path(name_or_path: str | Path) -> Path:
    bundled = PRESET_DIR / f"{name_or_path}.yaml"
    if bundled.is_file() and _is_cluster_preset(bundled):
        return bundled
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    raise ValueError(
        f"Unknown hardware preset {str(name_or_path)!r}; choose one of "
        f"{', '.join(list_presets())} or give the path of a preset YAML file."
    )


def _apply_override(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    *parents, leaf = dotted.split(".")
    for depth, key in enumerate(parents):
        if not isinstance(node.get(key), dict):
            raise ValueError(
                f"Unknown hardware override {dotted!r}: {'.'.join(parents[: depth + 1])} "
                f"is not a section; sections are: "
                f"{', '.join(k for k, v in node.items() if isinstance(v, dict))}."
            )
        node = node[key]
    node[leaf] = value


def load_hardware(
    name_or_path: str | Path, overrides: dict[str, Any] | None = None
) -> Hardware.Config:
    """Read a preset by name or path, apply dotted overrides, validate."""
    path = _preset_path(name_or_path)
    data = yaml_text(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"Hardware preset {str(path)!r} must be a YAML mapping of sections.")
    for dotted, value in (overrides or {}).items():
        _apply_override(data, dotted, value)
    return from_dict(Hardware.Config, data)


__all__ = ["PRESET_DIR", "list_presets", "load_hardware"]
