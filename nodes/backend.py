"""The compute-node backend interface.

A backend decides how a node computes one streamed layer: the digital wafer
(``cs2``), PCM analog crossbars, or photonic engines. The node itself (what
it keeps, what it streams, when) is the same for every backend; only the
numerics of a layer's forward and backward differ, plus what the backend
needs on the wire.

Each backend is a subclass with a nested ``Config`` whose ``kind`` names it;
``Backend.Config.variants()`` maps kinds to config classes, so nothing ever
branches on the backend's name.
"""

from __future__ import annotations

import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.utils import parametrize

try:  # what torch.autograd.grad calls once it has checked its arguments (vector_jacobian)
    from torch.autograd.graph import _engine_run_backward
except ImportError:  # pragma: no cover - another torch
    _engine_run_backward = None

if TYPE_CHECKING:
    from memoryx.sparsity import Sparsity

from core.cost.engine import NodeEngine
from core.cost.hardware import Hardware
from core.precision import Precision, precision_format


class Backend(ABC):
    @dataclass(kw_only=True)
    class Config:
        kind: str
        default_kind: ClassVar[str] = "cs2"

        @classmethod
        def variants(cls) -> dict[str, type[Backend.Config]]:
            from nodes.registry import BACKEND_CONFIGS

            return BACKEND_CONFIGS

        def build(self) -> Backend:
            raise NotImplementedError(f"{type(self).__name__} must build its backend")

        def check_sparsity(self, sparsity: Sparsity.Config | None) -> None:
            """ValueError (naming the fields) if MemoryX's weight masks make no sense here.

            MemoryX prunes the parameters the layers train by magnitude; that means something
            only where those parameters are weights. None is a dense run. Digital and analog
            weights (cs2, pcm) take any sparsity.
            """
            return None

        # ---- Static facts: read from the config, so the driver never builds a backend for them.

        @property
        def wire_precision(self) -> Precision:
            """Precision the layer's weights travel in from MemoryX to the node."""
            return "fp32"

        @property
        def wire_dtype(self) -> str:
            """``wire_precision`` as the dtype name of the wire's tensor messages."""
            return precision_format(self.wire_precision).wire_name

        @property
        def needs_weights_in_backward(self) -> bool:
            """False for training methods (such as DFA) whose backward needs no weights."""
            return True

        @property
        def keeps_state_between_passes(self) -> bool:
            """True if a node's numerics depend on what earlier passes left in it (PCM
            weight-stationary arrays): its replacement then needs ``Backend.pass_state``."""
            return False

        def drift_eval_config(self, compensated: bool) -> Backend.Config:
            """This backend as ``wafer eval`` runs it: programmed once, read later, with or
            without drift compensation. ValueError for a backend whose arrays do not drift."""
            raise ValueError(
                f"backend.kind = {self.kind!r} has no analog arrays that drift; "
                "wafer eval needs --backend pcm."
            )

        def check_drift_eval(self) -> None:
            """ValueError unless this backend has analog arrays whose conductances drift."""
            self.drift_eval_config(compensated=True)

        def engine(self, hardware: Hardware.Config) -> NodeEngine:
            """The cost model of one node's compute, for the emulated clock and ``simulate``.

            Each backend's engine lives beside it (``nodes/<kind>/engine.py``).
            """
            raise NotImplementedError(f"{type(self).__name__} must name its cost engine")

    config: Config

    @property
    def wire_dtype(self) -> str:
        """dtype the layer's weights travel in from MemoryX to this node (its config's)."""
        return self.config.wire_dtype

    @property
    def needs_weights_in_backward(self) -> bool:
        """False for training methods (such as DFA) whose backward needs no weights."""
        return self.config.needs_weights_in_backward

    @abstractmethod
    def forward(self, layer: int, block: nn.Module, params: dict[str, Tensor], x: Tensor) -> Tensor:
        """Layer output for input ``x`` (training or evaluation numerics), without autograd."""

    @abstractmethod
    def backward(
        self,
        layer: int,
        block: nn.Module,
        params: dict[str, Tensor],
        x: Tensor,
        grad_y: Tensor,
    ) -> tuple[Tensor | None, dict[str, Tensor]]:
        """Gradient w.r.t. the layer input (None for integer inputs) and w.r.t. each parameter."""

    #: Whether the node keeps a training forward's autograd graph (without its weights) for the
    #: backward pass instead of recomputing the forward there. Only a backend whose backward
    #: differentiates exactly the forward it ran may keep it: not one whose backward re-reads
    #: noisy arrays (PCM), runs other numerics than its forward or needs no weights (photonic).
    keeps_forward_graph: ClassVar[bool] = False

    def differentiable_run(self, layer: int) -> Callable[[nn.Module, dict, Tensor], Tensor]:
        """``run(block, params, x)``: the layer's training numerics under autograd, for a
        backend that ``keeps_forward_graph``."""
        raise NotImplementedError(f"{type(self).__name__} keeps no forward graph")

    def train_forward(
        self, layer: int, block: nn.Module, params: dict[str, Tensor], x: Tensor
    ) -> tuple[Tensor, HeldForBackward]:
        """A training forward: the layer output (no autograd history) and what the node keeps
        of the layer for its backward (the forward's graph, or the input to recompute from)."""
        if self.keeps_forward_graph:
            # Layer 0's input is the data: no gradient of it is needed (none is counted).
            return keep_forward_graph(
                self.differentiable_run(layer), block, params, x, differentiate_input=layer > 0
            )
        return self.forward(layer, block, params, x), KeptInput(x)

    def begin_pass(self, step: int, kind: int) -> None:
        """A pass over the layers starts: ``kind`` 0 is an evaluation at version ``step``, 1 the
        forward of training step ``step`` (an evaluation at version k runs before step k).

        A pass that does not come after the last one begun is a re-run (a step retried after a
        failure, or a run rewound to a checkpoint): a backend with state between passes (PCM
        weight-stationary arrays) goes back to what it held when that pass first began, so the
        re-run is bit-identical. Stateless backends ignore it.
        """
        return None

    def pass_state(self) -> object | None:
        """What a replacement of this node needs to compute as it would have, taken between
        passes (picklable, small); None for a backend whose state is a function of its config
        and seeds alone. The driver keeps it and gives it to the replacement."""
        return None

    def adopt_pass_state(self, state: object) -> None:
        """Continue from ``state``, another node's ``pass_state()`` (this node replaces it)."""
        raise NotImplementedError(f"{type(self).__name__} keeps no state between passes")

    @property
    def held_bytes(self) -> int:
        """Bytes of weight state the backend keeps between layers (0: it keeps none)."""
        return 0

    def stats(self) -> dict[str, float]:
        """Named backend counters since the node started (e.g. programming energy), for reports.

        Names are dotted and carry their unit as a suffix (``_s``, ``_j``); a backend with
        nothing to report returns {}.
        """
        return {}

    def prepare_layers(self, layers: list[nn.Module]) -> list[nn.Module]:
        """The streamed layers as this backend trains them, before their weights reach MemoryX.

        Called once by the driver. A backend may re-parameterize layers (the photonic one
        turns Linear weights into mesh phases); the default keeps them as they are.
        """
        return layers

    def check_layers(self, layers: list[nn.Module]) -> None:
        """ValueError (naming the numbers) if this backend cannot hold the model at all."""
        return None  # a digital node holds one streamed layer at a time: any model fits


class HeldForBackward(ABC):
    """What a node keeps of one layer between its training forward and its backward."""

    #: Bytes of the layer's input: what the modelled node keeps for the layer (its activation
    #: memory, which the emulated memory fit counts), whatever the emulator itself holds.
    input_bytes: int
    #: The layer input as a meta tensor (its shape and dtype, for FLOP counting).
    input_meta: Tensor

    @abstractmethod
    def tensors(self) -> list[Tensor]:
        """The activations really held for this layer in the emulator's memory."""

    def weight_bytes(self) -> int:
        """Bytes of weights held for this layer between passes (0: none)."""
        return 0

    @abstractmethod
    def backward(
        self,
        backend: Backend,
        layer: int,
        block: nn.Module,
        params: dict[str, Tensor],
        grad_y: Tensor,
    ) -> tuple[Tensor | None, dict[str, Tensor]]:
        """``Backend.backward``'s result, from what was kept and the re-streamed ``params``."""


class KeptInput(HeldForBackward):
    """The layer's input only: the backward recomputes the layer (``Backend.backward``)."""

    def __init__(self, x: Tensor):
        self.x = x
        self.input_bytes = x.numel() * x.element_size()
        self.input_meta = torch.empty_like(x, device="meta")

    def tensors(self) -> list[Tensor]:
        return [self.x]

    def backward(self, backend, layer, block, params, grad_y):
        return backend.backward(layer, block, params, self.x, grad_y)


@dataclass(frozen=True)
class _WeightView:
    """A saved tensor that is (a view of) a weight, kept as where it lies in that weight."""

    name: str
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int  # elements from the weight's own storage offset


class KeptGraph(HeldForBackward):
    """The forward's autograd graph of one layer, holding its activations but no weights.

    Every tensor autograd saves for the backward goes through ``saved_tensors_hooks``: one
    that lies in a weight's memory is kept as a ``_WeightView`` (name, shape, strides) and
    read back from the weights streamed in again for the backward; the rest (activations,
    dropout masks) are held, as a wafer holds them in SRAM. The graph's leaves keep no data
    between the passes. Same weights, same saved activations: the backward computes exactly
    what a recomputed forward's autograd would, without recomputing the forward.
    """

    def __init__(
        self,
        x: Tensor,
        run: Callable,
        block: nn.Module,
        params: dict[str, Tensor],
        differentiate_input: bool = True,
    ):
        self.input_bytes = x.numel() * x.element_size()
        self.input_meta = torch.empty_like(x, device="meta")
        # ``differentiate_input`` False (the data): the backward computes no gradient of
        # the input, and autograd keeps nothing it would need for one.
        self._x_in = x.detach().requires_grad_(x.is_floating_point() and differentiate_input)
        self._leaves = {name: p.detach().float().requires_grad_() for name, p in params.items()}
        self._shapes = {name: leaf.shape for name, leaf in self._leaves.items()}
        self._held: list[Tensor] = []
        spans = [
            (name, leaf.untyped_storage().data_ptr(), leaf.storage_offset(), leaf.numel())
            for name, leaf in self._leaves.items()
            if leaf.numel()
        ]

        def pack(t: Tensor) -> Tensor | _WeightView:
            ptr = t.untyped_storage().data_ptr()
            for name, leaf_ptr, start, numel in spans:
                if ptr == leaf_ptr and start <= t.storage_offset() < start + numel:
                    return _WeightView(name, tuple(t.shape), t.stride(), t.storage_offset() - start)
            t = t.detach()  # no grad_fn: no reference cycle through the graph
            self._held.append(t)
            return t

        def unpack(saved: Tensor | _WeightView) -> Tensor:
            if not isinstance(saved, _WeightView):
                return saved
            leaf = self._leaves[saved.name].detach()
            return leaf.as_strided(saved.size, saved.stride, leaf.storage_offset() + saved.offset)

        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            self._y = run(block, self._leaves, self._x_in)
        for leaf in self._leaves.values():
            leaf.data = torch.empty(0, dtype=leaf.dtype)  # the weights are dropped

    @property
    def output(self) -> Tensor:
        return self._y.detach()

    def tensors(self) -> list[Tensor]:
        return self._held

    def weight_bytes(self) -> int:
        return sum(leaf.numel() * leaf.element_size() for leaf in self._leaves.values())

    def backward(self, backend, layer, block, params, grad_y):
        for name, leaf in self._leaves.items():
            weight = params[name].detach().float()
            if weight.shape != self._shapes[name]:
                raise ValueError(
                    f"layer {layer}: {name} streamed for the backward has shape "
                    f"{tuple(weight.shape)}, the forward's {tuple(self._shapes[name])}"
                )
            leaf.data = weight
        inputs = ([self._x_in] if self._x_in.requires_grad else []) + list(self._leaves.values())
        with torch.enable_grad():
            grads = vector_jacobian(self._y, inputs, grad_y)
        grad_x = grads[0] if self._x_in.requires_grad else None
        weight_grads = grads[len(inputs) - len(self._leaves) :]
        result = {
            name: torch.zeros_like(leaf) if g is None else g.contiguous()
            for (name, leaf), g in zip(self._leaves.items(), weight_grads, strict=True)
        }
        self._y = None  # the graph and its activations go
        self._held = []
        for leaf in self._leaves.values():
            leaf.data = torch.empty(0, dtype=leaf.dtype)
        return grad_x, result


def keep_forward_graph(
    run: Callable,
    block: nn.Module,
    params: dict[str, Tensor],
    x: Tensor,
    *,
    differentiate_input: bool = True,
) -> tuple[Tensor, KeptGraph]:
    """The layer's output and its forward graph kept for the backward (``KeptGraph``);
    ``differentiate_input`` False: its backward gives no input gradient (None)."""
    kept = KeptGraph(x, run, block, params, differentiate_input)
    return kept.output, kept


def keeps_layers(backend: Backend) -> bool:
    """True if ``backend`` trains the layers as they are (its ``prepare_layers`` is the default).

    The driver may then build the model on the meta device and make each layer's weights
    as it streams them (emulator.prepare.prepare_streamed_layers).
    """
    return type(backend).prepare_layers is Backend.prepare_layers


def call_block(block: nn.Module, params: dict[str, Tensor], x: Tensor) -> Tensor:
    """Run ``block`` with streamed ``params`` in place of its own (dropped) parameters.

    ``functional_call(block, params, (x,), strict=True)``, computing the same bits. For a
    block whose tensors each have one name and no parametrization, and ``params`` naming
    each of them, the tensors are put in the block's tables directly for the call and put
    back after it: ``functional_call`` walks the module tree and checks ties on every call,
    about 25 us, as much as a small layer's compute (an mlp-digits layer at batch 32: 45 us
    called directly, 70 through ``functional_call``).
    """
    slots = _tensor_slots(block)
    if slots is None or params.keys() != slots.keys():
        return functional_call(block, params, (x,), strict=True)
    swapped = []
    try:
        for name, tensor in params.items():
            table, key = slots[name]
            swapped.append((table, key, table[key]))
            table[key] = tensor
        return block(x)
    finally:
        for table, key, own in swapped:
            table[key] = own


# block -> {name: (the owning module's _parameters or _buffers, key)}, or None.
_SLOTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _tensor_slots(block: nn.Module) -> dict[str, tuple[dict, str]] | None:
    """Where each parameter and buffer of ``block`` lives, by its name; None for a block
    that ``call_block`` leaves to ``functional_call`` (a tensor under two names, a
    parametrized module)."""
    if block not in _SLOTS:
        _SLOTS[block] = _find_slots(block)
    return _SLOTS[block]


def _find_slots(block: nn.Module) -> dict[str, tuple[dict, str]] | None:
    slots: dict[str, tuple[dict, str]] = {}
    seen: set[int] = set()
    for prefix, module in block.named_modules(remove_duplicate=False):
        if parametrize.is_parametrized(module):
            return None
        for table in (module._parameters, module._buffers):
            for key, tensor in table.items():
                if tensor is None:
                    continue  # (no such tensor: Linear(bias=False)'s bias)
                if id(tensor) in seen:
                    return None  # tied: functional_call decides which name counts
                seen.add(id(tensor))
                slots[f"{prefix}.{key}" if prefix else key] = (table, key)
    return slots


def autograd_backward(
    run: callable, block: nn.Module, params: dict[str, Tensor], x: Tensor, grad_y: Tensor
) -> tuple[Tensor | None, dict[str, Tensor]]:
    """Recompute the layer from its kept input with autograd and pull ``grad_y`` through it.

    The backward of a backend that does not keep its forward graph (``KeptGraph``): the
    node kept only the layer's input, and recomputing from it reproduces the forward
    exactly (the node seeds the RNG as it did for the forward), then autograd runs on it.
    """
    x_in = x.detach().requires_grad_(x.is_floating_point())
    leaves = {name: p.detach().float().requires_grad_() for name, p in params.items()}
    with torch.enable_grad():
        y = run(block, leaves, x_in)
        inputs = ([x_in] if x_in.requires_grad else []) + list(leaves.values())
        grads = vector_jacobian(y, inputs, grad_y)
    grad_x = grads[0] if x_in.requires_grad else None
    weight_grads = grads[len(inputs) - len(leaves) :]
    return grad_x, {
        name: torch.zeros_like(p) if g is None else g
        for (name, p), g in zip(leaves.items(), weight_grads, strict=True)
    }


def vector_jacobian(y: Tensor, inputs: list[Tensor], grad_y: Tensor) -> tuple[Tensor | None, ...]:
    """``torch.autograd.grad(y, inputs, grad_y, allow_unused=True)``, the same engine call.

    torch's own shape check of ``grad_y`` imports ``torch.fx.experimental.symbolic_shapes``
    (and sympy) on a process's first backward: about 0.5 CPU s in every node process, on
    the way to the first step. The check is made here instead, and the engine is called
    as ``torch.autograd.grad`` calls it (falling back to that where torch lacks the hook).
    """
    if grad_y.shape != y.shape:
        raise ValueError(
            f"the gradient streamed for the backward has shape {tuple(grad_y.shape)}, "
            f"the layer's output {tuple(y.shape)}"
        )
    if _engine_run_backward is None or grad_y.dtype.is_complex != y.dtype.is_complex:
        return torch.autograd.grad(y, inputs, grad_y, allow_unused=True)
    return _engine_run_backward(
        (y,), (grad_y,), False, False, tuple(inputs), True, accumulate_grad=False
    )
