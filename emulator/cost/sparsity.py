"""Weight sparsity in the cost model: a workload at a given sparsity, and its speedup curve.

A sparse layer keeps ``density = 1 - sparsity`` of its weights. What changes:

- weight bytes per pass: the surviving values plus the smaller of a bitmap
  (1 bit per weight) and int32 positions, or the dense tensor when that is
  smaller; the same rule as the functional run's wire format (``proto.sparse``);
- gradient bytes: the surviving values only (sender and receiver hold the mask);
- compute: ``LayerProfile.weight_density``; the preset's sparse speedup curve
  (``WaferCost.sparse_speedup``) turns it into time.

Layers that the default ``param_filter`` keeps dense (embeddings, the LM head)
stay dense here too. Plain numbers: nothing imports torch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

from core.config import doc
from core.cost.engine import NodeEngine
from core.cost.hardware import Hardware
from core.cost.workload import LayerProfile, Workload
from core.precision import precision_format
from emulator.cost.stats import StepStats, predict

#: Layer names the default sparsity filter leaves dense (see memoryx.sparsity.filters).
DENSE_LAYER_WORDS = ("embedding", "norm", "lm_head")
_INDEX_ITEMSIZE = 4  # int32 positions (proto.sparse)


def sparse_weight_bytes(num_params: int, density: float, element_bytes: float) -> float:
    """Bytes of one masked tensor on the wire: values + smaller index, or dense if smaller."""
    kept = round(density * num_params)
    index = min(math.ceil(num_params / 8), kept * _INDEX_ITEMSIZE)
    return min(num_params * element_bytes, kept * element_bytes + index)


def parse_sparsities(text: str) -> list[float]:
    """'0,0.5,0.75,0.9' -> [0.0, 0.5, 0.75, 0.9]; each in [0, 1)."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or any(not 0 <= v < 1 for v in values):
        raise ValueError(
            f"--sparsity {text!r} is not valid; give fractions of pruned weights in [0, 1), "
            "comma-separated, e.g. 0,0.5,0.75,0.9."
        )
    return values


def with_sparsity(workload: Workload, sparsity: float) -> Workload:
    """``workload`` with every weight layer (not embeddings, norms, LM head) at ``sparsity``."""
    assert 0 <= sparsity < 1, sparsity
    if sparsity == 0:
        return workload
    density = 1.0 - sparsity
    element_bytes = precision_format(workload.precision).bytes_per_element

    def sparse(layer: LayerProfile) -> LayerProfile:
        if any(word in layer.name for word in DENSE_LAYER_WORDS) or layer.num_params == 0:
            return layer
        grad_element_bytes = layer.grad_bytes / layer.num_params
        return dataclasses.replace(
            layer,
            weight_bytes=sparse_weight_bytes(layer.num_params, density, element_bytes),
            grad_bytes=round(density * layer.num_params) * grad_element_bytes,
            weight_density=density,
        )

    return dataclasses.replace(workload, layers=tuple(sparse(x) for x in workload.layers))


@dataclass(frozen=True)
class SparsityPoint:
    """One point of the emulated speedup curve."""

    sparsity: float = doc("fraction of each weight layer pruned")
    stats: StepStats = doc("the cost model's step at this sparsity")
    speedup: float = doc("dense step time / this step time, x")
    bytes_per_step: float = doc("MemoryX egress (weights, 2 passes) + ingress (gradients), bytes")

    def to_json(self) -> dict:
        return {
            "sparsity": self.sparsity,
            "step_time_s": self.stats.step_time_s,
            "speedup_vs_dense": self.speedup,
            "bytes_per_step": self.bytes_per_step,
            "bound": self.stats.bound,
        }


def bytes_per_step(workload: Workload) -> float:
    """MemoryX traffic of one step: weights stream twice (forward, backward), gradients once."""
    return sum(2 * layer.weight_bytes + layer.grad_bytes for layer in workload.layers)


def sparsity_curve(
    workload: Workload,
    hardware: Hardware.Config,
    num_nodes: int,
    sparsities: Sequence[float],
    engine: NodeEngine | None = None,
) -> list[SparsityPoint]:
    """Step time and bytes of ``workload`` at each sparsity, with speedup against dense."""
    dense = predict(workload, hardware, num_nodes, engine=engine)
    points = []
    for sparsity in sparsities:
        sparse = with_sparsity(workload, sparsity)
        stats = predict(sparse, hardware, num_nodes, engine=engine)
        points.append(
            SparsityPoint(
                sparsity=sparsity,
                stats=stats,
                speedup=dense.step_time_s / stats.step_time_s,
                bytes_per_step=bytes_per_step(sparse),
            )
        )
    return points


__all__ = [
    "SparsityPoint",
    "bytes_per_step",
    "parse_sparsities",
    "sparse_weight_bytes",
    "sparsity_curve",
    "with_sparsity",
]
