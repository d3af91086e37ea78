"""What one training step asks of the hardware, layer by layer.

A ``Workload`` is the single typed input of the cost model. Three producers
build it: the analytic GPT builder (``emulator.cost.gpt``), ``profile_modules``
(``core.cost.profile``: FLOPs counted by torch on a chain of blocks), and a functional run
that records the bytes it actually streamed and the FLOPs it computed per
layer. The cost model never needs to know which one it got.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.config import doc
from core.precision import Precision, precision_format


@dataclass(frozen=True)
class Matmul:
    """One weight matrix of a layer and how many vectors pass through it per sample.

    Analog and photonic engines compute these products in their arrays or
    meshes (tiled by their size); everything else in a layer is digital.
    """

    num_outputs: int = doc("rows of the weight matrix (Linear out_features), count")
    num_inputs: int = doc("columns (Linear in_features, conv C_in*kh*kw), count")
    vectors_per_sample: float = doc("input vectors per sample (tokens, output pixels), count")

    def __post_init__(self) -> None:
        if self.num_outputs < 1 or self.num_inputs < 1 or self.vectors_per_sample < 0:
            raise ValueError(
                f"Matmul({self.num_outputs} x {self.num_inputs}, {self.vectors_per_sample} vectors) "
                "is not valid; sizes must be >= 1 and vectors >= 0."
            )

    @property
    def flops_per_sample(self) -> float:
        return 2.0 * self.num_outputs * self.num_inputs * self.vectors_per_sample


@dataclass(frozen=True)
class OpticalPass:
    """A fixed optical stage of a layer (e.g. Taichi's paths): light through it, per sample.

    Unlike a ``Matmul`` it is not tiled onto an engine's meshes: its paths are
    units of their own, side by side; what it costs is its conversions, the
    heaters it holds while light passes, and the phases set when it streams in.
    """

    num_paths: int = doc("units side by side, count")
    num_inputs: int = doc("electro-optic conversions into each path per vector, count")
    num_outputs: int = doc("detections out of each path per vector, count")
    num_held_shifters: int = doc("heaters each path keeps powered while computing, count")
    num_programmed: int = doc("phase elements of each path set when its layer streams in, count")
    dense_ops: float = doc("dense-equivalent operations per path and vector (2 per MAC), op")
    vectors_per_sample: float = doc("vectors through the stage per sample, count", default=1.0)

    @property
    def ops_per_sample(self) -> float:
        return self.dense_ops * self.num_paths * self.vectors_per_sample


@dataclass(kw_only=True, frozen=True)
class LayerProfile:
    """One layer as the weight-streaming hardware sees it (all per-sample figures)."""

    name: str = doc("layer name, unique within a workload")
    num_params: int = doc("trainable parameters owned by this layer, count")
    weight_bytes: float = doc("bytes streamed in per pass (less than dense when sparse), bytes")
    grad_bytes: float = doc("weight-gradient bytes streamed out per backward pass, bytes")
    backward_weight_bytes: float | None = doc(
        "bytes streamed in for the backward pass; None means weight_bytes (0: a training "
        "method such as DFA needs no weights there), bytes",
        default=None,
    )
    forward_flops: float = doc("forward FLOPs per sample, FLOP")
    backward_flops: float | None = doc(
        "backward FLOPs per sample; None means 2x forward, FLOP", default=None
    )
    activation_bytes: float = doc("activations per sample kept on the wafer for backward, bytes")
    weight_flops_fraction: float = doc(
        "share of FLOPs that multiply weights (skipped for zero weights), fraction", default=1.0
    )
    weight_density: float = doc("non-zero share of weights (1.0 = dense), fraction", default=1.0)
    matmuls: tuple[Matmul, ...] = doc(
        "the weight products (for analog and photonic engines); () if unknown", default=()
    )
    optical_passes: tuple[OpticalPass, ...] = doc(
        "fixed optical stages (photonic engines; digital nodes see their FLOPs only)", default=()
    )

    def __post_init__(self) -> None:
        for name in (
            "num_params",
            "weight_bytes",
            "grad_bytes",
            "forward_flops",
            "activation_bytes",
        ):
            if getattr(self, name) < 0:
                raise ValueError(
                    f"{name} = {getattr(self, name)!r} of layer {self.name!r} is not valid; "
                    "it must be >= 0."
                )
        if self.backward_weight_bytes is None:
            object.__setattr__(self, "backward_weight_bytes", self.weight_bytes)
        elif self.backward_weight_bytes < 0:
            raise ValueError(
                f"backward_weight_bytes = {self.backward_weight_bytes!r} of layer {self.name!r} "
                "is not valid; it must be >= 0 (or None for weight_bytes)."
            )
        if self.backward_flops is None:
            object.__setattr__(self, "backward_flops", 2.0 * self.forward_flops)
        elif self.backward_flops < 0:
            raise ValueError(
                f"backward_flops = {self.backward_flops!r} of layer {self.name!r} is not valid; "
                "it must be >= 0 (or None for 2x forward)."
            )
        for name in ("weight_flops_fraction", "weight_density"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(
                    f"{name} = {getattr(self, name)!r} of layer {self.name!r} is not valid; "
                    "it must be in [0, 1]."
                )

    def effective_flops(self, flops: float) -> float:
        """FLOPs left after the wafer skips zero weights (unstructured sparsity)."""
        weight_part = flops * self.weight_flops_fraction
        return flops - weight_part + weight_part * self.weight_density


@dataclass(kw_only=True, frozen=True)
class Workload:
    """One training step: the layers in forward order and the global batch."""

    name: str = doc("model name shown in tables")
    layers: tuple[LayerProfile, ...] = doc("layers in forward order")
    samples_per_step: int = doc("global batch, samples (sequences for language models)")
    tokens_per_sample: int = doc("tokens per sample; 1 for non-sequence models", default=1)
    precision: Precision = doc("operand precision on the wafer", default="fp16")

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError(f"layers of workload {self.name!r} is empty; give at least one layer.")
        if self.samples_per_step < 1:
            raise ValueError(
                f"samples_per_step = {self.samples_per_step!r} is not valid; it must be >= 1."
            )
        if self.tokens_per_sample < 1:
            raise ValueError(
                f"tokens_per_sample = {self.tokens_per_sample!r} is not valid; it must be >= 1."
            )
        precision_format(self.precision)  # ValueError naming the valid precisions
        names = [layer.name for layer in self.layers]
        if len(set(names)) != len(names):
            raise ValueError(f"layers of workload {self.name!r} must have unique names: {names}.")

    @property
    def num_params(self) -> int:
        return sum(layer.num_params for layer in self.layers)

    @property
    def tokens_per_step(self) -> int:
        return self.samples_per_step * self.tokens_per_sample

    def flops_per_sample(self) -> float:
        """Dense training FLOPs (forward + backward) per sample."""
        return sum(layer.forward_flops + layer.backward_flops for layer in self.layers)

    def effective_flops_per_sample(self) -> float:
        """Training FLOPs per sample after skipping zero weights."""
        return sum(
            layer.effective_flops(layer.forward_flops + layer.backward_flops)
            for layer in self.layers
        )


__all__ = ["LayerProfile", "Matmul", "OpticalPass", "Workload"]
