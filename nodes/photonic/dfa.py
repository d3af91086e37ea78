"""Direct feedback alignment (Nokland 2016; photonic: Filipovich et al., Optica 2022; docs/hardware.md §4.3).

The output error e = y_hat - y reaches every hidden layer through its own
fixed random matrix B_l, uniform in [-1, 1) scaled by 1/sqrt(width_l):

    delta_L = e,   delta_l = (B_l e) * f'(a_l),   dW_l = -lr delta_l h_{l-1}^T.

No layer's weights appear in the backward pass, so every layer can update in
parallel as soon as e is known; a weight-streaming node need not stream any
weights back in. On a photonic engine the projection B_l e is itself an
optical MVM and carries its noise: N(mean, std) * max|e| per output element.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from core.config import doc


class DirectFeedbackAlignment:
    """Fixed feedback matrices and the weight-free update rule."""

    @dataclass(kw_only=True)
    class Config:
        noise: bool = doc("add photonic noise to each projection B_l e", default=False)
        noise_mean: float = doc(
            "mean of the projection noise, in units of max|e| (Filipovich et al.; docs/hardware.md §4.3)",
            default=0.03,
        )
        noise_std: float = doc(
            "std of the projection noise, in units of max|e| (Filipovich et al.; docs/hardware.md §4.3)",
            default=0.618,
        )

        def __post_init__(self) -> None:
            if self.noise_std < 0:
                raise ValueError(f"noise_std = {self.noise_std!r} is not valid; it must be >= 0.")

        def build(
            self, hidden_widths: list[int], num_outputs: int, seed: int
        ) -> DirectFeedbackAlignment:
            return DirectFeedbackAlignment(self, hidden_widths, num_outputs, seed)

    def __init__(
        self, config: Config, hidden_widths: list[int], num_outputs: int, seed: int
    ) -> None:
        for width in [*hidden_widths, num_outputs]:
            if width < 1:
                raise ValueError(
                    f"layer width {width} is not valid; widths must be positive counts."
                )
        self.config = config
        generator = torch.Generator().manual_seed(seed)
        self.feedback = [
            (2 * torch.rand(width, num_outputs, generator=generator) - 1) / math.sqrt(width)
            for width in hidden_widths
        ]
        self.noise_generator = torch.Generator().manual_seed(seed + 1)

    def project(self, error_BO: Tensor) -> list[Tensor]:
        """B_l e for every hidden layer (with photonic noise if configured), each ``(B, width_l)``."""
        projections = []
        scale_B1 = error_BO.abs().amax(dim=-1, keepdim=True)
        for b_WO in self.feedback:
            projection = error_BO @ b_WO.to(error_BO.dtype).T
            if self.config.noise:
                noise = torch.randn(
                    projection.shape, generator=self.noise_generator, dtype=projection.dtype
                )
                projection = (
                    projection + (self.config.noise_mean + self.config.noise_std * noise) * scale_B1
                )
            projections.append(projection)
        return projections

    def deltas(self, error_BO: Tensor, activation_derivatives: list[Tensor]) -> list[Tensor]:
        """delta_l = (B_l e) * f'(a_l) for the hidden layers, then delta_L = e for the output layer."""
        if len(activation_derivatives) != len(self.feedback):
            raise ValueError(
                f"got {len(activation_derivatives)} activation derivatives for "
                f"{len(self.feedback)} hidden layers; pass one per hidden layer."
            )
        hidden = [
            p * d for p, d in zip(self.project(error_BO), activation_derivatives, strict=True)
        ]
        return [*hidden, error_BO]

    def updates(
        self, error_BO: Tensor, layer_inputs: list[Tensor], activation_derivatives: list[Tensor]
    ) -> list[tuple[Tensor, Tensor]]:
        """(dL/dW_l, dL/db_l) for every layer from e, each layer's input h_{l-1} and f'(a_l).

        Gradients are batch means; an optimizer step with them is dW = -lr delta h^T.
        Note what is absent: no weight of any layer is needed.
        """
        deltas = self.deltas(error_BO, activation_derivatives)
        if len(layer_inputs) != len(deltas):
            raise ValueError(
                f"got {len(layer_inputs)} layer inputs for {len(deltas)} layers; pass one per layer."
            )
        batch = error_BO.shape[0]
        return [
            (d.T @ h / batch, d.sum(dim=0) / batch)
            for d, h in zip(deltas, layer_inputs, strict=True)
        ]
