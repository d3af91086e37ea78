"""The digital wafer: fp32, bf16 or fp16 operands with fp32 arithmetic.

Weights travel from MemoryX already rounded to the operand precision (half
the bytes of fp32). Activations are rounded when they enter a layer; inside
the layer everything runs in fp32, as the wafer's fp16/bf16 multiply with
fp32 accumulate does. Gradients are computed in fp32 from those operands,
so fp16 needs no loss scaling here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from core.config import doc
from core.cost.hardware import Hardware
from core.precision import precision_format
from nodes.backend import Backend, autograd_backward, call_block
from nodes.cs2.engine import WaferEngine


class Cs2Backend(Backend):
    @dataclass(kw_only=True)
    class Config(Backend.Config):
        kind: Literal["cs2"] = doc("backend: the digital CS-2 wafer", default="cs2")
        precision: Literal["fp32", "bf16", "fp16"] = doc(
            "operand precision of weights and activations (arithmetic is fp32)", default="fp32"
        )

        @property
        def wire_precision(self) -> str:
            """Weights travel already rounded to the operand precision."""
            return self.precision

        def engine(self, hardware: Hardware.Config) -> WaferEngine:
            """The preset's digital wafer."""
            return WaferEngine(hardware.wafer.build())

        def build(self) -> Cs2Backend:
            return Cs2Backend(self)

    def __init__(self, config: Config):
        self.config = config
        self.operand_dtype = precision_format(config.precision).torch_dtype

    def _round(self, x: Tensor) -> Tensor:
        if self.operand_dtype is torch.float32 or not x.is_floating_point():
            return x
        return x.to(self.operand_dtype).float()

    def _run(self, block: nn.Module, params: dict[str, Tensor], x: Tensor) -> Tensor:
        return call_block(block, {k: v.float() for k, v in params.items()}, self._round(x))

    #: Digital and deterministic: the backward differentiates exactly the forward that ran.
    keeps_forward_graph = True

    def differentiable_run(self, layer: int):
        return self._run

    def forward(self, layer: int, block: nn.Module, params: dict[str, Tensor], x: Tensor) -> Tensor:
        with torch.no_grad():
            return self._run(block, params, x)

    def backward(self, layer, block, params, x, grad_y):
        return autograd_backward(self._run, block, params, x, grad_y)
