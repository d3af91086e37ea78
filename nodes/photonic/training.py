"""Photonic training methods as strategy objects (docs/hardware.md §4.2, §4.3).

``PhotonicBackend.Config.training`` names a method; the config resolves it once to one of the
classes below (``TRAINING_METHODS``), and each class holds everything that depends on it:
which layers it can train (``prepare_layer``, ``check_layer``, ``check_sparsity``), what the
functional backend runs (``forward``, ``backward``; ``nodes.photonic.backend``) and what the
cost engine counts for it (``stage_cost``, ``matmul_cost``, ``peak_flops``;
``nodes.photonic.engine``). A new method is one new class in the table.

- ``backprop``: the computer-designed baseline. Linear layers become ``MeshLinear`` phases;
  forward and backward run on the ideal digital twin (a computer: costed as digital work);
  evaluation runs on the physical node (deployment, fabrication errors included).
- ``ffm``: fully forward mode. The same phases; forward runs on the physical node, and the
  backward re-programs the layer, re-runs its forward to restore the stored field and sends
  the conjugated error through the same mesh (``ffm_error``). No twin.
- ``dfa``: direct feedback alignment. Weights stay digital (programmed onto an ideal mesh at
  every forward); the backward needs no weights: each hidden layer projects the output error
  through its fixed random matrix (``dfa_projection``, optical) and forms its weight gradient
  digitally.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.cost.engine import Tally
from nodes.backend import autograd_backward
from nodes.photonic.cost import PhotonicCost, num_unit_shifters
from nodes.photonic.dfa import DirectFeedbackAlignment
from nodes.photonic.layer import MeshLinear, convert_linears
from nodes.photonic.multipath import OpticalStage

if TYPE_CHECKING:
    from core.cost.engine import MatmulWork
    from core.cost.operation import Operation
    from core.cost.workload import OpticalPass
    from memoryx.sparsity import Sparsity
    from nodes.photonic.backend import PhotonicBackend
    from nodes.photonic.engine import PhotonicEngine

#: Elementwise activations DFA can differentiate locally (f'(a) from a alone).
_ELEMENTWISE = (nn.ReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.LeakyReLU, nn.ELU, nn.SiLU, nn.Identity)


@dataclass(frozen=True)
class Programming:
    """Setting every phase shifter of ``num_tiles`` mesh tiles from scratch."""

    time_s: float
    energy_j: float
    num_shifters: int


def program_tiles(
    cost: PhotonicCost, mesh_size: int, num_cores: int, num_tiles: int
) -> Programming:
    """Tiles tuned ``num_cores`` at a time, every heater at its mean setting (pi) meanwhile.

    The one count of a full programming: the DFA forward's counters and the engine's
    ``program`` both use it.
    """
    c = cost.config
    shifters = num_tiles * num_unit_shifters(mesh_size)
    heater_w = shifters * c.heater_power_per_pi_w
    return Programming(
        time_s=math.ceil(num_tiles / num_cores) * c.thermal_tuning_time_s,
        energy_j=heater_w * c.thermal_tuning_time_s,
        num_shifters=shifters,
    )


class TrainingMethod(ABC):
    """How a photonic node trains a layer, functionally and in the cost model."""

    name: ClassVar[str]
    #: False where the backward pass uses no weights, so none stream back in (DFA).
    needs_weights_in_backward: ClassVar[bool] = True

    # ---- What the method can train -------------------------------------------------------

    def check_sparsity(self, sparsity: Sparsity.Config | None) -> None:
        """ValueError if MemoryX's weight masks make no sense for this method (None: dense)."""
        # Phases, not weights: a phase pruned to 0 is a set rotation, not a missing
        # connection, and magnitude says nothing about it.
        if sparsity is not None:
            raise ValueError(
                f"sparsity with backend.training = {self.name!r} is not valid: its "
                "Linear layers train as MZI phases, and pruning phases does not remove "
                "weights; use backend.training = 'dfa' (digital weights, which sparsity "
                "prunes), or drop sparsity."
            )

    def prepare_layer(self, layer: nn.Module, mesh_size: int) -> nn.Module:
        """The layer as this method trains it (default: Linear weights become mesh phases)."""
        return convert_linears(layer, mesh_size)

    def check_layer(self, index: int, layer: nn.Module) -> None:
        """ValueError naming the module if this method cannot train layer ``index``."""
        return None

    def new_state(self) -> object | None:
        """What a node keeps between a layer's forward and backward for this method."""
        return None

    # ---- What the node runs --------------------------------------------------------------

    @abstractmethod
    def forward(
        self, backend: PhotonicBackend, layer: int, block: nn.Module, params, x: Tensor
    ) -> Tensor:
        """The layer's output (``Backend.forward``, under no_grad)."""

    @abstractmethod
    def backward(
        self, backend: PhotonicBackend, layer: int, block: nn.Module, params, x, grad_y
    ) -> tuple[Tensor | None, dict[str, Tensor]]:
        """The layer's gradients (``Backend.backward``)."""

    # ---- What the cost model counts ------------------------------------------------------

    def peak_flops(self, engine: PhotonicEngine) -> float:
        """Meshes and digital unit together (a method that trains on the mesh)."""
        optical = engine.num_cores * 2.0 * engine.mesh_size**2 * engine.cost.config.clock_hz
        return optical + engine.digital.config.flops_per_s

    @abstractmethod
    def stage_cost(
        self,
        engine: PhotonicEngine,
        op: Operation,
        stage: OpticalPass,
        num_vectors: int,
        tally: Tally,
    ) -> None:
        """One fixed optical stage (multi-path unit) of ``op``."""

    @abstractmethod
    def matmul_cost(
        self, engine: PhotonicEngine, op: Operation, works: list[MatmulWork], tally: Tally
    ) -> None:
        """The weight products of ``op`` and the digital rest, as the node counts them."""


class Backprop(TrainingMethod):
    """Twin-trained, deployed on the physical node: training is a computer's work."""

    name = "backprop"

    def forward(self, backend, layer, block, params, x):
        # Trains on the twin and deploys (evaluates) on the hardware.
        return backend.run(layer, block, params, x, physical=not block.training)

    def backward(self, backend, layer, block, params, x, grad_y):
        return autograd_backward(
            lambda b, p, xi: backend.run(layer, b, p, xi, physical=False),
            block,
            params,
            x,
            grad_y,
        )

    def peak_flops(self, engine) -> float:
        return engine.digital.config.flops_per_s  # training runs on the twin, a computer

    def stage_cost(self, engine, op, stage, num_vectors, tally) -> None:
        ops = stage.dense_ops * stage.num_paths * num_vectors
        forward = op.phase == "forward"
        engine.charge_digital(ops * (1 if forward else 2), tally)  # the twin, on a computer

    def matmul_cost(self, engine, op, works, tally) -> None:
        # The twin is a computer; nodes count mesh layers as no FLOPs, so the weight
        # products are added from their shapes.
        optical_flops = sum(w.flops for w in works)
        forward = op.phase == "forward"
        products = optical_flops * (1 if forward else 2 if op.has_input_gradient else 1)
        engine.charge_digital(max(op.flops_per_node, products), tally)


class _OnTheMesh(TrainingMethod):
    """A method whose forward runs on the physical meshes (programmed, then lit)."""

    def stage_cost(self, engine, op, stage, num_vectors, tally) -> None:
        engine.program_stage(stage, tally)
        engine.light_stage(stage, num_vectors, "optics", tally)
        if op.phase != "forward":  # the recomputed pass above, then the conjugated error
            engine.light_stage(stage, num_vectors, "ffm_error", tally)

    def forward_matmul_cost(self, engine, op, works, tally, backward: bool = False) -> None:
        optical_flops = sum(w.flops for w in works)
        for w in works:
            engine.program(w, tally)
            engine.mvms(w.num_outputs, w.num_inputs, w.num_vectors, "mvm", tally)
            if backward:
                engine.mvms(w.num_outputs, w.num_inputs, w.num_vectors, "ffm_error", tally)
        # Mesh layers count no FLOPs at the node; what is left is digital (biases, ...).
        engine.charge_digital(max(0.0, op.flops_per_node - optical_flops), tally)


class FullyForward(_OnTheMesh):
    """FFM: phase gradients measured on the physical node by a second, conjugated pass."""

    name = "ffm"

    def check_layer(self, index, layer) -> None:
        for module in layer.modules():
            own = list(module.parameters(recurse=False))
            if own and not isinstance(module, MeshLinear | OpticalStage):
                raise ValueError(
                    f"training = 'ffm' has no forward-only gradient for layer {index}'s "
                    f"{type(module).__name__}: only Linear layers (as MZI meshes), "
                    "multi-path optical stages and parameter-free modules can be trained "
                    "in situ; use 'backprop' or 'dfa', or a model of Linear layers and "
                    "activations."
                )

    def forward(self, backend, layer, block, params, x):
        return backend.run(layer, block, params, x, physical=True)

    def backward(self, backend, layer, block, params, x, grad_y):
        result = autograd_backward(
            lambda b, p, xi: backend.run(layer, b, p, xi, physical=True, ffm=True),
            block,
            params,
            x,
            grad_y,
        )
        # The conjugated error is one more optical pass through every mesh of the layer.
        num_vectors = x.reshape(-1, x.shape[-1]).shape[0]
        for module in block.modules():
            if isinstance(module, MeshLinear):
                backend.count_mvms(
                    module.out_features, module.in_features, num_vectors, prefix="ffm_error"
                )
        return result

    def matmul_cost(self, engine, op, works, tally) -> None:
        # Backward: re-programmed (later layers held the meshes), the forward re-run to
        # restore the stored field, and the conjugated error through the same mesh.
        self.forward_matmul_cost(engine, op, works, tally, backward=op.phase != "forward")


@dataclass
class _DfaState:
    """Per node: pre-activations kept from the forward, feedback matrices, the last layer."""

    pre_activations: dict[int, Tensor] = field(default_factory=dict)
    feedback: dict[int, DirectFeedbackAlignment] = field(default_factory=dict)
    last_layer: int = -1


class DirectFeedback(_OnTheMesh):
    """DFA: every layer's update from the output error through its own fixed random matrix.

    The last layer receives e = dL/dlogits as ``grad_y`` and hands e down unchanged as its
    "input gradient", so every lower layer receives e directly and computes
    delta_l = (B_l e) * f'(a_l) from the pre-activation a_l it kept in the forward pass.
    Limitation: the forward computes W x exactly (an ideal mesh programmed from W), because
    decomposing W onto the physical mesh at every step costs a Clements decomposition per
    tile; the photonic noise of DFA is on the feedback projection (``dfa.noise``).
    """

    name = "dfa"
    needs_weights_in_backward = False

    def check_sparsity(self, sparsity) -> None:
        return None  # W stays digital, so MemoryX's masks prune real weights

    def prepare_layer(self, layer, mesh_size) -> nn.Module:
        return layer  # weights stay digital

    def check_layer(self, index, layer) -> None:
        optical = [type(m).__name__ for m in layer.modules() if isinstance(m, OpticalStage)]
        if optical:
            raise ValueError(
                f"training = 'dfa' cannot train layer {index}'s {optical[0]}: DFA updates "
                "Linear weights from a feedback projection, and diffractive masks and MZI "
                "phases have no such update; use 'backprop' or 'ffm'."
            )
        dfa_parts(index, layer)

    def new_state(self) -> _DfaState:
        return _DfaState()

    def forward(self, backend, layer, block, params, x):
        linear, activations = dfa_parts(layer, block)
        prefix = "" if block is linear else "0."
        weight = params[f"{prefix}weight"].float()
        bias = params.get(f"{prefix}bias")
        a = F.linear(x, weight, None if bias is None else bias.float())
        c = backend.config
        n = c.mesh_size
        num_tiles = math.ceil(weight.shape[0] / n) * math.ceil(weight.shape[1] / n)
        # Each forward programs W: every shifter of every tile is set (mean phase pi).
        programming = program_tiles(backend.cost, n, c.num_cores, num_tiles)
        backend.count_program(
            layer, programming.time_s, programming.energy_j, programming.num_shifters
        )
        backend.count_mvms(weight.shape[0], weight.shape[1], x.shape[0])
        if block.training:
            state = backend.method_state
            state.pre_activations[layer] = a
            state.last_layer = max(state.last_layer, layer)
        for module in activations:
            a = module(a)
        return a

    def backward(self, backend, layer, block, params, x, grad_y):
        e, state = grad_y, backend.method_state
        linear, activations = dfa_parts(layer, block)
        a = state.pre_activations.pop(layer, None)
        if a is None:
            raise ValueError(f"DFA backward of layer {layer} without its forward pass.")
        if layer == state.last_layer:
            delta = e
        else:
            if layer not in state.feedback:
                state.feedback[layer] = backend.config.dfa.build(
                    [a.shape[-1]], e.shape[-1], backend.config.seed + 7919 * (layer + 1)
                )
            (projection,) = state.feedback[layer].project(e)
            a_in = a.detach().requires_grad_()
            with torch.enable_grad():
                y = a_in
                for module in activations:
                    y = module(y)
                # Elementwise f: the vector-Jacobian product with B e is (B e) * f'(a).
                torch.autograd.backward(y, projection, inputs=[a_in])
            delta = a_in.grad
            backend.count_mvms(a.shape[-1], e.shape[-1], e.shape[0], prefix="dfa_projection")
        prefix = "" if block is linear else "0."
        grads = {f"{prefix}weight": delta.T @ x.float()}
        if linear.bias is not None:
            grads[f"{prefix}bias"] = delta.sum(dim=0)
        # Every lower layer receives the output error itself, not a propagated gradient.
        return e, grads

    # stage_cost: the backend refuses optical stages under DFA (check_layer), so only
    # ``wafer simulate`` reaches it; it costs them as ffm does.

    def matmul_cost(self, engine, op, works, tally) -> None:
        if op.phase == "forward":
            self.forward_matmul_cost(engine, op, works, tally)
            return
        for w in works:
            if not op.is_last_layer:
                engine.mvms(w.num_outputs, op.output_width, w.num_vectors, "dfa_projection", tally)
            engine.charge_digital(w.flops, tally)  # delta^T x: the weight gradient


def dfa_parts(index: int, layer: nn.Module) -> tuple[nn.Linear, list[nn.Module]]:
    """The Linear of a DFA layer and its elementwise activations; ValueError for anything else."""
    if isinstance(layer, nn.Linear):
        return layer, []
    children = list(layer.children()) if isinstance(layer, nn.Sequential) else []
    if (
        children
        and isinstance(children[0], nn.Linear)
        and all(isinstance(m, _ELEMENTWISE) for m in children[1:])
    ):
        return children[0], children[1:]
    raise ValueError(
        f"training = 'dfa' needs every layer to be a Linear followed by elementwise activations; "
        f"layer {index} is {type(layer).__name__}({', '.join(type(m).__name__ for m in layer.children())}). "
        "Use 'backprop' for other models."
    )


#: Every training method by its config name.
TRAINING_METHODS: dict[str, TrainingMethod] = {
    m.name: m for m in (Backprop(), FullyForward(), DirectFeedback())
}

__all__ = [
    "TRAINING_METHODS",
    "Backprop",
    "DirectFeedback",
    "FullyForward",
    "Programming",
    "TrainingMethod",
    "dfa_parts",
    "program_tiles",
]
