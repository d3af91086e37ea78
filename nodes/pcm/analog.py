"""Analog matrix-vector products on programmed PCM tiles, drift compensation, placement.

Hardware-aware training (which of these reads a training pass makes) is in ``nodes.pcm.modes``.

``analog_matmul`` is what one layer costs on the chip: inputs go through noise management and
the DACs, every tile multiplies by its drifted, noisy conductances, outputs get noise and pass
the ADCs (with bound management), and the digital periphery rescales, sums partial products
across row tiles, applies drift compensation and adds the bias.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from core.config import doc
from nodes.pcm.device import DriftCompensation, PcmDevice, check_drift_time
from nodes.pcm.periphery import Periphery
from nodes.pcm.tile import ProgrammedMatrix, Tile


def _tiled_read(
    x_BK: Tensor,
    w_PQKN: Tensor,
    scale_PQ: Tensor,
    num_outputs: int,
    periphery: Periphery,
    generator: torch.Generator,
) -> Tensor:
    """y_B(num_outputs): inputs split over P tile rows, each feeding Q tiles of K x N."""
    num_in_tiles, num_out_tiles, tile_in, tile_out = w_PQKN.shape
    batch, num_inputs = x_BK.shape
    x_padded = torch.zeros(batch, num_in_tiles * tile_in, dtype=w_PQKN.dtype)
    x_padded[:, :num_inputs] = x_BK
    x_BPK = x_padded.reshape(batch, num_in_tiles, tile_in)
    y_BPQN = periphery.read(
        x_BPK,
        num_out_tiles,
        lambda x_BPQK: torch.einsum("bpqk,pqkn->bpqn", x_BPQK, w_PQKN),
        generator,
    )
    y_BQN = (y_BPQN * scale_PQ[None, :, :, None]).sum(dim=1)
    return y_BQN.reshape(batch, num_out_tiles * tile_out)[:, :num_outputs]


def _check_inputs(x_BI: Tensor, num_inputs: int) -> None:
    if x_BI.ndim != 2 or x_BI.shape[1] != num_inputs:
        raise ValueError(
            f"input of shape {tuple(x_BI.shape)} does not fit the programmed layer; "
            f"expected (batch, {num_inputs})."
        )


def analog_matmul(
    x_BI: Tensor,
    programmed: ProgrammedMatrix,
    t_inference: float,
    periphery: Periphery,
    generator: torch.Generator,
    drift_scale: float | Tensor = 1.0,
) -> Tensor:
    """y_BO ~= x_BI @ W^T + b as the chip computes it ``t_inference`` s after programming.

    One call is one read of the arrays: the conductances (drift plus 1/f noise) are drawn once
    and shared by the whole batch, since the vectors of a batch are read microseconds apart
    while the 1/f noise that matters lives at far lower frequencies. ``drift_scale`` is the
    drift-compensation factor (see ``drift_compensation_scale``); 1 means uncompensated.
    """
    check_drift_time(t_inference)
    _check_inputs(x_BI, programmed.num_inputs)
    w_RCIO = programmed.normalized_weights(t_inference, generator)
    y_BO = _tiled_read(
        x_BI.to(w_RCIO.dtype),
        w_RCIO,
        programmed.weight_scale_RC,
        programmed.num_outputs,
        periphery,
        generator,
    )
    y_BO = y_BO * drift_scale
    if programmed.bias_O is not None:
        y_BO = y_BO + programmed.bias_O
    return y_BO


def analog_matmul_transposed(
    grad_BO: Tensor,
    programmed: ProgrammedMatrix,
    t_inference: float,
    periphery: Periphery,
    generator: torch.Generator,
    drift_scale: float | Tensor = 1.0,
) -> Tensor:
    """grad_BI ~= grad_BO @ W read through the same tiles driven from the column side.

    ``drift_scale`` is the forward's compensation factor: a global factor undoes the mean
    conductance decay, which the transposed read sees just as the forward does.
    """
    check_drift_time(t_inference)
    w_CROI = programmed.normalized_weights(t_inference, generator).permute(1, 0, 3, 2)
    grad_BI = _tiled_read(
        grad_BO.to(w_CROI.dtype),
        w_CROI,
        programmed.weight_scale_RC.T,
        programmed.num_inputs,
        periphery,
        generator,
    )
    return grad_BI * drift_scale


def drift_readout(
    programmed: ProgrammedMatrix,
    t_inference: float,
    periphery: Periphery,
    generator: torch.Generator,
) -> Tensor:
    """The compensation strategy's reference figure, read through the full analog path."""
    check_drift_time(t_inference)

    def read(x_KI: Tensor) -> Tensor:
        w_RCIO = programmed.normalized_weights(t_inference, generator)
        return _tiled_read(
            x_KI, w_RCIO, programmed.weight_scale_RC, programmed.num_outputs, periphery, generator
        )

    return programmed.device.drift_compensation.readout(read, programmed.num_inputs)


def calibrate_drift(
    programmed: ProgrammedMatrix, periphery: Periphery, generator: torch.Generator
) -> ProgrammedMatrix:
    """The same programmed state with its drift baseline read right after programming."""
    return dataclasses.replace(
        programmed, drift_baseline=drift_readout(programmed, 0.0, periphery, generator)
    )


def drift_compensation_scale(
    programmed: ProgrammedMatrix,
    t_inference: float,
    periphery: Periphery,
    generator: torch.Generator,
) -> Tensor:
    """Output factor baseline / readout(t) for ``analog_matmul(..., drift_scale=...)``."""
    assert programmed.drift_baseline is not None, (
        "calibrate_drift() must run right after programming"
    )
    return DriftCompensation.output_scale(
        programmed.drift_baseline, drift_readout(programmed, t_inference, periphery, generator)
    )


def program_layer(
    w_OI: Tensor,
    bias_O: Tensor | None,
    tile: Tile,
    device: PcmDevice,
    periphery: Periphery,
    generator: torch.Generator,
    programmed_at_s: float = 0.0,
) -> ProgrammedMatrix:
    """Program a layer into tiles and record its drift-compensation baseline."""
    programmed = tile.program(w_OI, bias_O, device, generator, programmed_at_s)
    return calibrate_drift(programmed, periphery, generator)


class WeightStationary:
    """Inference with every layer resident in its own arrays: does the model fit the chips?"""

    @dataclass(kw_only=True)
    class Config:
        num_chips: int = doc("PCM chips available to the node, count", default=1)
        # Le Gallo et al. 2023 (docs/hardware.md §3.1): 64 cores, one crossbar each.
        cores_per_chip: int = doc("crossbar arrays (cores) per chip, count", default=64)

        def __post_init__(self) -> None:
            for name in ("num_chips", "cores_per_chip"):
                value = getattr(self, name)
                if value <= 0:
                    raise ValueError(
                        f"{name} = {value} is not valid for WeightStationary; use a count >= 1."
                    )

        def build(self, tile: Tile) -> WeightStationary:
            return WeightStationary(self, tile)

    def __init__(self, config: WeightStationary.Config, tile: Tile) -> None:
        self.config = config
        self.tile = tile
        self.num_arrays = config.num_chips * config.cores_per_chip

    def arrays_needed(self, weight_shapes_OI: Sequence[tuple[int, int]]) -> list[int]:
        """Tiles each (outputs, inputs) weight matrix occupies."""
        return [
            self.tile.num_tiles(num_outputs, num_inputs)
            for num_outputs, num_inputs in weight_shapes_OI
        ]

    def place(self, weight_shapes_OI: Sequence[tuple[int, int]]) -> int:
        """Total arrays the model needs; ValueError if that exceeds the configured chips."""
        per_layer = self.arrays_needed(weight_shapes_OI)
        total = sum(per_layer)
        if total > self.num_arrays:
            raise ValueError(
                f"weight-stationary mode needs {total} arrays of {self.tile.rows}x{self.tile.cols} "
                f"(per layer: {per_layer}) but {self.config.num_chips} chip(s) x "
                f"{self.config.cores_per_chip} cores = {self.num_arrays} arrays; raise num_chips to at least "
                f"{-(-total // self.config.cores_per_chip)} or stream the weights instead."
            )
        return total


__all__ = [
    "WeightStationary",
    "analog_matmul",
    "analog_matmul_transposed",
    "calibrate_drift",
    "drift_compensation_scale",
    "drift_readout",
    "program_layer",
]
