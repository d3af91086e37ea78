"""Mapping a weight matrix onto PCM crossbar tiles, and the programmed state of those tiles.

Layout: crossbar rows carry inputs (word lines, driven by the DACs), columns carry outputs
(bit lines, one ADC each). A weight matrix ``w_OI`` is transposed, zero-padded to whole tiles
and split into an R x C grid of ``rows x cols`` tiles. Each weight becomes a differential pair
(G+, G-) with one side at 0 uS, so conductance tensors carry a leading side axis S = 2
(0: G+, 1: G-): ``g_SRCIO`` with I = row inside a tile and O = column inside a tile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from core.config import doc
from nodes.pcm.device import PcmDevice, check_drift_time


@dataclass(eq=False)
class ProgrammedMatrix:
    """One layer's weights as programmed into its tiles; read it at any time afterwards."""

    g_target_SRCIO: Tensor
    g_programmed_SRCIO: Tensor
    drift_exponent_SRCIO: Tensor
    weight_scale_RC: Tensor
    bias_O: Tensor | None
    num_outputs: int
    num_inputs: int
    programmed_at_s: float
    device: PcmDevice
    drift_baseline: Tensor | None = None

    @property
    def num_tiles(self) -> int:
        return self.weight_scale_RC.numel()

    def time_since_programming(self, now_s: float) -> float:
        """``t_inference`` for a read at emulated clock time ``now_s``."""
        t_inference = now_s - self.programmed_at_s
        check_drift_time(t_inference)
        return t_inference

    def conductances(self, t_inference: float, generator: torch.Generator) -> Tensor:
        """g_SRCIO (uS) one read sees ``t_inference`` seconds after programming."""
        return self.device.read(
            self.g_target_SRCIO,
            self.g_programmed_SRCIO,
            self.drift_exponent_SRCIO,
            t_inference,
            generator,
        )

    def normalized_weights(self, t_inference: float, generator: torch.Generator) -> Tensor:
        """w_RCIO = (G+ - G-) / g_max, the analog weight each tile multiplies by (|w| <~ 1)."""
        g_SRCIO = self.conductances(t_inference, generator)
        return (g_SRCIO[0] - g_SRCIO[1]) / self.device.g_max

    def effective_weights(self, t_inference: float, generator: torch.Generator) -> Tensor:
        """w_OI that one read realises, scaled back to weight units (for inspection)."""
        w_RCIO = (
            self.normalized_weights(t_inference, generator) * self.weight_scale_RC[:, :, None, None]
        )
        num_row_tiles, num_col_tiles, rows, cols = w_RCIO.shape
        w_IO = w_RCIO.permute(0, 2, 1, 3).reshape(num_row_tiles * rows, num_col_tiles * cols)
        return w_IO[: self.num_inputs, : self.num_outputs].T


class Tile:
    """Cuts weight matrices into crossbar tiles and programs them."""

    @dataclass(kw_only=True)
    class Config:
        # Le Gallo et al., Nat. Electron. 2023 (docs/hardware.md §3.1): 256 x 256 PCM crossbar per core.
        rows: int = doc("crossbar rows (inputs) per tile, count", default=256)
        cols: int = doc("crossbar columns (outputs) per tile, count", default=256)
        # Per tile: each tile's partial sums are rescaled digitally anyway, so giving every tile
        # its own max|W| -> g_max costs nothing and uses each array's full conductance range,
        # which keeps small-weight tiles above the programming/read noise floor.
        weight_scaling: Literal["tile", "layer"] = doc(
            "what max|W| maps to g_max over: each tile on its own, or the whole layer",
            default="tile",
        )

        def __post_init__(self) -> None:
            for name in ("rows", "cols"):
                value = getattr(self, name)
                if value <= 0:
                    raise ValueError(
                        f"{name} = {value} is not valid for Tile; a tile needs a positive number of {name} (e.g. 256)."
                    )

        def build(self) -> Tile:
            return Tile(self)

    def __init__(self, config: Tile.Config) -> None:
        self.config = config
        self.rows = config.rows
        self.cols = config.cols

    def grid(self, num_outputs: int, num_inputs: int) -> tuple[int, int]:
        """(row tiles, column tiles) that a num_outputs x num_inputs matrix needs."""
        return math.ceil(num_inputs / self.rows), math.ceil(num_outputs / self.cols)

    def num_tiles(self, num_outputs: int, num_inputs: int) -> int:
        num_row_tiles, num_col_tiles = self.grid(num_outputs, num_inputs)
        return num_row_tiles * num_col_tiles

    def split(self, w_OI: Tensor) -> Tensor:
        """w_RCIO: the zero-padded matrix cut into tiles, rows = inputs.

        A matrix smaller than one tile leaves the array's other rows without input and its
        other columns unread, so only the used block is kept (the arrays counted stay whole).
        """
        num_outputs, num_inputs = w_OI.shape
        num_row_tiles, num_col_tiles = self.grid(num_outputs, num_inputs)
        rows, cols = min(self.rows, num_inputs), min(self.cols, num_outputs)
        w_IO = torch.zeros(num_row_tiles * rows, num_col_tiles * cols, dtype=w_OI.dtype)
        w_IO[:num_inputs, :num_outputs] = w_OI.T
        return w_IO.reshape(num_row_tiles, rows, num_col_tiles, cols).permute(0, 2, 1, 3)

    def map_weights(self, w_OI: Tensor, g_max: float) -> tuple[Tensor, Tensor]:
        """Target conductances g_SRCIO (uS) and the weight each tile's g_max stands for."""
        w_RCIO = self.split(w_OI.detach())
        if self.config.weight_scaling == "tile":
            scale_RC = w_RCIO.abs().amax(dim=(2, 3))
        else:
            scale_RC = w_RCIO.abs().amax().expand(w_RCIO.shape[:2]).clone()
        # An all-zero tile maps to all-zero conductances whatever its scale; 1 avoids 0 / 0.
        scale_RC = torch.where(scale_RC > 0, scale_RC, torch.ones_like(scale_RC))
        w_norm_RCIO = w_RCIO / scale_RC[:, :, None, None]
        g_target_SRCIO = g_max * torch.stack(
            [w_norm_RCIO.clamp(min=0.0), (-w_norm_RCIO).clamp(min=0.0)]
        )
        return g_target_SRCIO, scale_RC

    def program(
        self,
        w_OI: Tensor,
        bias_O: Tensor | None,
        device: PcmDevice,
        generator: torch.Generator,
        programmed_at_s: float = 0.0,
    ) -> ProgrammedMatrix:
        """Program ``w_OI`` into tiles; the bias stays digital and is added after the ADCs."""
        g_target_SRCIO, scale_RC = self.map_weights(w_OI, device.g_max)
        g_programmed_SRCIO, exponents_SRCIO = device.program(g_target_SRCIO, generator)
        return ProgrammedMatrix(
            g_target_SRCIO=g_target_SRCIO,
            g_programmed_SRCIO=g_programmed_SRCIO,
            drift_exponent_SRCIO=exponents_SRCIO,
            weight_scale_RC=scale_RC,
            bias_O=None if bias_O is None else bias_O.detach().clone(),
            num_outputs=w_OI.shape[0],
            num_inputs=w_OI.shape[1],
            programmed_at_s=programmed_at_s,
            device=device,
        )


__all__ = ["ProgrammedMatrix", "Tile"]
