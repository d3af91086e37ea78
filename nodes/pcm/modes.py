"""PCM operating modes and hardware-aware training passes, as strategy objects.

Three choices configure a PCM node, each a YAML name resolved once by its config to one of
the small classes below, which hold everything that depends on it: what the functional
backend does (``nodes.pcm.backend``) and what the cost engine counts (``nodes.pcm.engine``).
A new mode is one new class registered in its table; nothing else compares mode names.

- ``OperatingMode`` (``backend.mode``): where a layer's weights live between uses.
  ``streaming``: layers share the arrays, each is programmed when its weights arrive (every
  device rewritten, the previous layer's contents gone); ``weight-stationary``: every matrix
  keeps arrays of its own on the node's chips (it must fit) and is rewritten only when its
  weights change.
- ``ForwardPass`` (``backend.training.forward``): ``analog`` reads the programmed arrays;
  ``ideal`` computes the exact product (the arrays are still programmed and read, and costed).
- ``BackwardPass`` (``backend.training.backward``): ``ideal`` is the exact autograd of the
  digital layer, run on the digital unit (no array is touched); ``analog`` re-runs the
  forward on the arrays and reads each input gradient through the transposed tiles.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

import torch
from torch import Tensor, nn

from core.config import doc
from nodes.backend import autograd_backward, call_block
from nodes.pcm.analog import WeightStationary, analog_matmul, analog_matmul_transposed
from nodes.pcm.interception import AnalogLayer
from nodes.pcm.tile import ProgrammedMatrix

if TYPE_CHECKING:
    from core.cost.engine import MatmulWork, Tally
    from core.cost.operation import Operation
    from nodes.pcm.backend import PcmBackend
    from nodes.pcm.device import PcmDevice
    from nodes.pcm.engine import PcmEngine
    from nodes.pcm.periphery import Periphery
    from nodes.pcm.tile import Tile


# ---- Operating modes: where the weights live ----------------------------------------------


class OperatingMode(ABC):
    """Where a layer's matrices live between uses, and so what each use must program."""

    name: ClassVar[str]
    #: Whether a layer's analog backward finds its arrays overwritten by the later layers
    #: (and programs them again).
    reprograms_for_backward: ClassVar[bool]
    #: Whether a matrix programmed in one pass can still be read in a later one.
    arrays_outlive_a_pass: ClassVar[bool]

    @abstractmethod
    def check_fit(
        self, placement: WeightStationary, weight_shapes_OI: Sequence[tuple[int, int]]
    ) -> None:
        """ValueError (with the numbers) if a model of these matrices cannot run in this mode."""

    @abstractmethod
    def resident(
        self, previous: ProgrammedMatrix | None, w_OI: Tensor, tile: Tile, device: PcmDevice
    ) -> ProgrammedMatrix | None:
        """The arrays that already hold exactly ``w_OI`` (None: program them now)."""

    @abstractmethod
    def admit(
        self,
        placement: WeightStationary,
        held_shapes_OI: Sequence[tuple[int, int]],
        new_shape_OI: tuple[int, int],
        first_time: bool,
    ) -> None:
        """ValueError if a new matrix cannot get arrays next to those already held."""

    @abstractmethod
    def overwritten(self, previous: ProgrammedMatrix | None) -> Tensor | None:
        """Conductance targets the arrays held before this programming (None: all rewritten)."""


class Streaming(OperatingMode):
    """Layers share the arrays: each arrival programs every device of its matrices."""

    name = "streaming"
    reprograms_for_backward = True
    arrays_outlive_a_pass = False

    def check_fit(self, placement, weight_shapes_OI) -> None:
        return None  # one layer at a time: any model fits

    def resident(self, previous, w_OI, tile, device) -> None:
        return None  # later layers overwrote the arrays since

    def admit(self, placement, held_shapes_OI, new_shape_OI, first_time) -> None:
        return None

    def overwritten(self, previous) -> None:
        return None  # the arrays held another layer's weights: every device is rewritten


class WeightStationaryMode(OperatingMode):
    """Every matrix keeps arrays of its own; only a changed matrix is written, and only the
    devices whose target changed take pulses."""

    name = "weight-stationary"
    reprograms_for_backward = False
    arrays_outlive_a_pass = True

    def check_fit(self, placement, weight_shapes_OI) -> None:
        placement.place(weight_shapes_OI)

    def resident(self, previous, w_OI, tile, device) -> ProgrammedMatrix | None:
        if previous is not None and _holds(previous, w_OI, tile, device):
            return previous
        return None

    def admit(self, placement, held_shapes_OI, new_shape_OI, first_time) -> None:
        if first_time:
            placement.place([*held_shapes_OI, new_shape_OI])

    def overwritten(self, previous) -> Tensor | None:
        return None if previous is None else previous.g_target_SRCIO


def _holds(programmed: ProgrammedMatrix, w_OI: Tensor, tile: Tile, device: PcmDevice) -> bool:
    g_target_SRCIO, scale_RC = tile.map_weights(w_OI, device.g_max)
    return (
        g_target_SRCIO.shape == programmed.g_target_SRCIO.shape
        and torch.equal(g_target_SRCIO, programmed.g_target_SRCIO)
        and torch.equal(scale_RC, programmed.weight_scale_RC)
    )


# ---- Forward pass: what the layer's output is -----------------------------------------------


class ForwardPass(ABC):
    """The value of ``x W^T`` the layer passes on (the arrays are programmed and read either way)."""

    name: ClassVar[str]

    @abstractmethod
    def read(
        self,
        x_BI: Tensor,
        w_OI: Tensor,
        programmed: ProgrammedMatrix,
        t_inference: float,
        periphery: Periphery,
        generator: torch.Generator,
        drift_scale: Callable[[], float | Tensor],
    ) -> Tensor:
        """y_BO; ``drift_scale()`` gives the drift-compensation factor when it is needed."""


class AnalogForward(ForwardPass):
    name = "analog"

    def read(self, x_BI, w_OI, programmed, t_inference, periphery, generator, drift_scale):
        return analog_matmul(x_BI, programmed, t_inference, periphery, generator, drift_scale())


class IdealForward(ForwardPass):
    name = "ideal"

    def read(self, x_BI, w_OI, programmed, t_inference, periphery, generator, drift_scale):
        return x_BI @ w_OI.T


# ---- Backward pass: where the input gradient comes from ------------------------------------


class BackwardPass(ABC):
    """How a layer's gradients are computed, functionally and in the cost model."""

    name: ClassVar[str]

    @abstractmethod
    def backward(
        self,
        backend: PcmBackend,
        layer: int,
        block: nn.Module,
        params: dict[str, Tensor],
        x: Tensor,
        grad_y: Tensor,
    ) -> tuple[Tensor | None, dict[str, Tensor]]:
        """The node's backward of one layer (``Backend.backward``)."""

    @abstractmethod
    def input_gradient(self, grad_BO: Tensor, w_OI: Tensor, read_args: tuple) -> Tensor:
        """grad_x of a hardware-aware product; ``read_args`` are its forward's array reads."""

    @abstractmethod
    def programmings(self, mode: OperatingMode) -> int:
        """Programmings of each matrix per backward pass (wear, on top of the forward's one)."""

    @abstractmethod
    def op_cost(
        self,
        engine: PcmEngine,
        op: Operation,
        works: list[MatmulWork],
        mode: OperatingMode,
        tally: Tally,
    ) -> None:
        """The backward operation ``op`` on one node, as the backend counts it."""


class IdealBackward(BackwardPass):
    """Rasch et al. 2023: the exact gradient, run on the digital unit."""

    name = "ideal"

    def backward(self, backend, layer, block, params, x, grad_y):
        return autograd_backward(call_block, block, params, x, grad_y)

    def input_gradient(self, grad_BO, w_OI, read_args):
        return grad_BO @ w_OI

    def programmings(self, mode) -> int:
        return 0

    def op_cost(self, engine, op, works, mode, tally) -> None:
        analog_flops = sum(w.flops for w in works)
        weight_products = analog_flops * (2 if op.has_input_gradient else 1)
        engine.charge_digital(max(op.flops_per_node, weight_products), tally)


class AnalogBackward(BackwardPass):
    """The block re-run on the arrays, each input gradient read through the transposed tiles.

    What is counted and why is in ``nodes.pcm.backend``'s docstring: the re-run forward
    (``mvm_recompute``), the transposed reads (``mvm_transposed``, only where autograd asks
    for an input gradient) and, where the mode shares the arrays, the re-programming.
    """

    name = "analog"

    def backward(self, backend, layer, block, params, x, grad_y):
        generator = backend.layer_generator()

        def analog_run(block: nn.Module, leaves: dict[str, Tensor], x_in: Tensor) -> Tensor:
            # Layer 0's input is the data set's: the node drops its gradient (nodes.worker).
            data = x_in if layer == 0 else None
            with AnalogLayer(backend, layer, leaves, generator, autograd=True, data=data):
                return call_block(block, leaves, x_in)

        return autograd_backward(analog_run, block, params, x, grad_y)

    def input_gradient(self, grad_BO, w_OI, read_args):
        return analog_matmul_transposed(grad_BO, *read_args)

    def programmings(self, mode) -> int:
        return 1 if mode.reprograms_for_backward else 0

    def op_cost(self, engine, op, works, mode, tally) -> None:
        transposed = 0.0
        for w in works:
            if mode.reprograms_for_backward:
                engine.program(w, tally)
            # Re-read forward: the node kept only the layer input, not the analog outputs.
            engine.read(w.num_outputs, w.num_inputs, w.num_vectors, "mvm_recompute", tally)
            if op.has_input_gradient:
                # grad_x = grad_y W through the transposed tiles: the columns are driven
                # and the rows converted, as the backend counts it.
                engine.read_transposed(w, tally)
                transposed += w.flops
        engine.charge_digital(max(0.0, op.flops_per_node - transposed), tally)


# ---- The tables the configs resolve names with ----------------------------------------------

OPERATING_MODES: dict[str, OperatingMode] = {
    m.name: m for m in (Streaming(), WeightStationaryMode())
}
FORWARD_PASSES: dict[str, ForwardPass] = {m.name: m for m in (AnalogForward(), IdealForward())}
BACKWARD_PASSES: dict[str, BackwardPass] = {m.name: m for m in (IdealBackward(), AnalogBackward())}


# ---- Hardware-aware training: the config and its autograd product --------------------------


class HardwareAware:
    """Hardware-aware training: analog (noisy) forward, ideal backward, digital update."""

    @dataclass(kw_only=True)
    class Config:
        # Rasch et al., Nat. Commun. 2023 / docs/hardware.md §3.4: noisy forward, ideal backward.
        forward: Literal["analog", "ideal"] = doc(
            "forward pass on the emulated chip or exact", default="analog"
        )
        backward: Literal["ideal", "analog"] = doc(
            "input gradient exact (x W^T's true gradient) or read through the transposed tiles",
            default="ideal",
        )

        @property
        def forward_pass(self) -> ForwardPass:
            return FORWARD_PASSES[self.forward]

        @property
        def backward_pass(self) -> BackwardPass:
            return BACKWARD_PASSES[self.backward]

        def build(self) -> HardwareAware:
            return HardwareAware(self)

    def __init__(self, config: HardwareAware.Config) -> None:
        self.config = config

    def linear(
        self,
        x_BI: Tensor,
        w_OI: Tensor,
        bias_O: Tensor | None,
        programmed: ProgrammedMatrix,
        t_inference: float,
        periphery: Periphery,
        generator: torch.Generator,
        drift_scale: float | Tensor = 1.0,
    ) -> Tensor:
        """y = x W^T + b whose value comes from ``programmed`` (the chip's copy of ``w_OI``)
        and whose gradients with respect to x, W and b are those of the exact product
        (``backward = "analog"``: the input gradient is read through the transposed tiles).
        ``drift_scale`` is the drift-compensation factor of both reads (1: uncompensated)."""
        return _HardwareAwareLinear.apply(
            x_BI,
            w_OI,
            bias_O,
            programmed,
            t_inference,
            periphery,
            generator,
            drift_scale,
            self.config,
        )


class _HardwareAwareLinear(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x_BI, w_OI, bias_O, programmed, t_inference, periphery, generator, drift_scale, config
    ):
        ctx.save_for_backward(x_BI, w_OI)
        ctx.has_bias = bias_O is not None
        ctx.backward_pass = config.backward_pass
        ctx.read_args = (programmed, t_inference, periphery, generator, drift_scale)
        # The chip adds its own copy of the bias; the argument is the digital master.
        y_BO = config.forward_pass.read(
            x_BI,
            w_OI,
            dataclasses.replace(programmed, bias_O=None),
            t_inference,
            periphery,
            generator,
            lambda: drift_scale,
        )
        return y_BO if bias_O is None else y_BO + bias_O

    @staticmethod
    def backward(ctx, grad_BO):
        x_BI, w_OI = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = ctx.backward_pass.input_gradient(grad_BO, w_OI, ctx.read_args)
        if ctx.needs_input_grad[1]:
            grad_w = grad_BO.T @ x_BI
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_BO.sum(dim=0)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


__all__ = [
    "BACKWARD_PASSES",
    "FORWARD_PASSES",
    "OPERATING_MODES",
    "AnalogBackward",
    "AnalogForward",
    "BackwardPass",
    "ForwardPass",
    "HardwareAware",
    "IdealBackward",
    "IdealForward",
    "OperatingMode",
    "Streaming",
    "WeightStationaryMode",
]
