"""One layer in one pass of one micro-batch: the unit every node engine costs.

The cost model's compile stage (``emulator.cost.compile``) produces these; node
engines (``core.cost.engine``) price them. Plain numbers, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from core.config import doc
from core.cost.workload import Matmul, OpticalPass

Phase = Literal["forward", "backward"]


@dataclass(frozen=True)
class Operation:
    """One layer in one pass of one micro-batch, as every system runs it."""

    layer: str = doc("layer name")
    layer_index: int = doc("position of the layer in forward order")
    phase: Phase = doc("forward or backward")
    stream_in_bytes: float = doc("weights broadcast to every system, bytes")
    flops_per_node: float = doc("dense FLOPs each system computes, FLOP")
    grad_out_bytes: float = doc("gradients each system sends (reduced on the way), bytes")
    samples: float = doc("samples of this micro-batch on each system, count")
    weight_flops_fraction: float = doc("share of FLOPs that multiply weights, fraction")
    weight_density: float = doc("non-zero share of the layer's weights, fraction")
    matmuls: tuple[Matmul, ...] = doc("the layer's weight products, per sample")
    optical_passes: tuple[OpticalPass, ...] = doc("the layer's fixed optical stages")
    has_input_gradient: bool = doc("backward also computes the gradient of the layer input")
    is_last_layer: bool = doc("the model's output layer (its output error starts backward)")
    output_width: int = doc("outputs per vector of the model's last weight product, count")
