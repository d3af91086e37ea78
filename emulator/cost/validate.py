"""``wafer validate``: the cost model against published figures.

The figures, their sources and tolerances live in ``references.yaml``. Only
entries with ``role: validation`` count; ``calibration`` entries are the
figures the presets were derived from and agree by construction. Device-level
entries (photonic power, in-situ training, PCM drift) run small seeded
experiments (``device_validate.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from core.config import doc, from_dict, yaml_text
from core.presets import load_hardware
from emulator.cost.gpt import gpt_workload
from emulator.cost.stats import sweep

REFERENCES_PATH = Path(__file__).resolve().parent / "references.yaml"

Quantity = Literal[
    "scaling_efficiency",
    "speedup",
    "training_flops_ratio",
    "cluster_peak_flops",
    "max_params",
    "max_nodes",
    "peak_ratio",
    "photonic_power_w",
    "photonic_tops_per_w",
    "ffm_over_twin_accuracy",
    "pcm_drift_retention",
]


@dataclass(kw_only=True)
class Reference:
    """One published figure and how the model predicts it."""

    id: str = doc("short unique name")
    role: Literal["validation", "calibration"] = doc("counted, or only shown")
    claim: str = doc("what was published, in words")
    source: str = doc("where it was published")
    quantity: Quantity = doc("what the model predicts for it")
    value: float = doc("the published value, in the quantity's unit")
    tolerance: float = doc("allowed |predicted - value| / |value|, fraction")
    model: str | None = doc("workload for model-based quantities", default=None)
    hardware: str | None = doc("hardware preset", default=None)
    baseline_hardware: str | None = doc("preset to compare against (peak_ratio)", default=None)
    nodes: int | None = doc("cluster size, systems", default=None)
    sparsity: float | None = doc("share of zero weights (training_flops_ratio)", default=None)
    tops: float | None = doc(
        "throughput the engine delivers, TOPS (photonic_power_w)", default=None
    )
    mesh_size: int | None = doc("modes per photonic mesh, count", default=None)
    technology: str | None = doc(
        "phase-shifter technology: thermal | mems | electro_optic | phase_change", default=None
    )
    device: str | None = doc("photonic device preset (ffm_over_twin_accuracy)", default=None)
    steps: int | None = doc("training steps of the experiment, count", default=None)
    drift_time_s: float | None = doc(
        "time after programming, s (pcm_drift_retention)", default=None
    )
    seed: int = doc("seed of the experiment", default=0)

    def __post_init__(self) -> None:
        if self.tolerance < 0:
            raise ValueError(
                f"tolerance = {self.tolerance!r} of reference {self.id!r} is not valid; "
                "it must be >= 0."
            )
        needs = {
            "scaling_efficiency": ("model", "hardware", "nodes"),
            "speedup": ("model", "hardware", "nodes"),
            "training_flops_ratio": ("model", "sparsity"),
            "cluster_peak_flops": ("hardware", "nodes"),
            "max_params": ("hardware",),
            "max_nodes": ("hardware",),
            "peak_ratio": ("hardware", "baseline_hardware"),
            "photonic_power_w": ("tops", "mesh_size", "technology"),
            "photonic_tops_per_w": (),
            "ffm_over_twin_accuracy": ("device", "mesh_size", "steps"),
            "pcm_drift_retention": ("model", "drift_time_s", "steps"),
        }[self.quantity]
        missing = [name for name in needs if getattr(self, name) is None]
        if missing:
            raise ValueError(
                f"quantity = {self.quantity!r} of reference {self.id!r} needs {', '.join(missing)}."
            )


@dataclass(frozen=True)
class Check:
    """A reference next to the model's prediction."""

    reference: Reference
    predicted: float

    @property
    def error(self) -> float:
        """Relative error |predicted - value| / |value|, fraction."""
        return abs(self.predicted - self.reference.value) / abs(self.reference.value)

    @property
    def passed(self) -> bool:
        return self.error <= self.reference.tolerance


def load_references(path: str | Path = REFERENCES_PATH) -> list[Reference]:
    data = yaml_text(Path(path).read_text())
    if not isinstance(data, dict) or not isinstance(data.get("references"), list):
        raise ValueError(f"{path} must hold a mapping with a 'references' list.")
    return [
        from_dict(Reference, entry, f"references[{i}]")
        for i, entry in enumerate(data["references"])
    ]


def _predict_device(ref: Reference) -> float:
    """Device-level quantities: one small seeded experiment each (``device_validate``)."""
    from emulator.cost import device_validate

    if ref.quantity == "photonic_power_w":
        return device_validate.lightmatter_power_w(ref.tops, ref.mesh_size, ref.technology)
    if ref.quantity == "photonic_tops_per_w":
        return device_validate.taichi_tops_per_w()
    if ref.quantity == "ffm_over_twin_accuracy":
        return device_validate.ffm_over_twin_accuracy(
            ref.device, ref.mesh_size, ref.steps, ref.seed
        )
    assert ref.quantity == "pcm_drift_retention"
    return device_validate.pcm_drift_retention(ref.model, ref.drift_time_s, ref.steps, ref.seed)


_DEVICE_QUANTITIES = (
    "photonic_power_w",
    "photonic_tops_per_w",
    "ffm_over_twin_accuracy",
    "pcm_drift_retention",
)


def predict_reference(ref: Reference) -> float:
    """The model's value for ``ref.quantity``."""
    if ref.quantity in _DEVICE_QUANTITIES:
        return _predict_device(ref)
    if ref.quantity in ("scaling_efficiency", "speedup"):
        (stats,) = sweep(gpt_workload(ref.model), load_hardware(ref.hardware), [ref.nodes])
        return stats.scaling_efficiency if ref.quantity == "scaling_efficiency" else stats.speedup
    if ref.quantity == "training_flops_ratio":
        dense = gpt_workload(ref.model)
        sparse = gpt_workload(ref.model, weight_density=1.0 - ref.sparsity)
        return dense.effective_flops_per_sample() / sparse.effective_flops_per_sample()
    hardware = load_hardware(ref.hardware)
    if ref.quantity == "cluster_peak_flops":
        return ref.nodes * hardware.wafer.peak_flops_16bit
    if ref.quantity == "max_params":
        memoryx = hardware.memoryx
        return max(memoryx.capacity_options_bytes) / memoryx.state_bytes_per_param
    if ref.quantity == "max_nodes":
        return float(hardware.swarmx.max_systems)
    assert ref.quantity == "peak_ratio"
    baseline = load_hardware(ref.baseline_hardware)
    return hardware.wafer.peak_flops_16bit / baseline.wafer.peak_flops_16bit


def run_checks(path: str | Path = REFERENCES_PATH) -> list[Check]:
    return [Check(ref, predict_reference(ref)) for ref in load_references(path)]


__all__ = [
    "REFERENCES_PATH",
    "Check",
    "Reference",
    "load_references",
    "predict_reference",
    "run_checks",
]
