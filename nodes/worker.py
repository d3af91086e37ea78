"""What one compute node does with a layer, in plain torch.

A node holds the model's structure but none of its weights: each layer's
weights arrive in a stream, are used once and are dropped. Between the
forward and backward passes the node keeps what each layer's backward needs
(``Backend.train_forward``): the forward's autograd graph without its weights
(``nodes.backend.KeptGraph``), or, for a backend whose backward must recompute
the layer (PCM, photonic), the layer's input activation. Training data never crosses
the fabric: the node builds the data set itself and reads its own shard of
every global batch.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from core.cost.profile import block_flops
from core.data import BatchSampler, Dataset, loss_sum, num_correct, num_targets
from nodes.backend import Backend, HeldForBackward, vector_jacobian

#: ``Backend.begin_pass`` kinds, in the order they run at one version: evaluation, then training.
EVAL_PASS, TRAIN_PASS = 0, 1

#: Held while a node seeds torch's process-wide RNG and computes, and while it counts FLOPs
#: (a process-wide dispatch mode): nodes that share a process (emulator.host) must not
#: interleave there, or a node would draw another's random numbers. Uncontended when a
#: process runs one node.
_PROCESS_LOCK = threading.Lock()


def process_computing() -> bool:
    """Whether a node of this process computes now (a compute started now would wait)."""
    return _PROCESS_LOCK.locked()


def _seed_cpu(seed: int) -> None:
    """Seed the CPU generator, the only one a node draws from (dropout masks), before a layer.

    Every draw of a node comes after its layer's seed, so the state a layer leaves behind is
    not restored (``torch.random.fork_rng`` would copy the 5 KB Mersenne state out and back
    in, about 40 us per layer: 0.24 ms of an mlp-digits node's 1.5 ms step).

    ``torch.manual_seed`` also queues a lazy seeding of every accelerator backend torch
    knows, and with it a ``traceback.format_stack()`` of the caller: about 0.1 ms per call
    on this CPU-only build, paid per node, layer and pass. The CPU numbers are the same.
    """
    torch.default_generator.manual_seed(seed)


class NodeStateError(Exception):
    """The node was asked for a pass out of order (e.g. backward before forward)."""


@dataclass
class LayerResult:
    loss_sum: float = 0.0
    num_targets: int = 0
    num_correct: int = 0
    flops: float = 0.0
    compute_seconds: float = 0.0
    #: CPU time of the thread that computed, s: unlike ``compute_seconds`` (wall time) it
    #: does not grow when a loaded machine deschedules the thread mid-layer, so it tells
    #: how long the layer holds the thread it runs on (``nodes.service``'s inline rule).
    cpu_seconds: float = 0.0


def strip_parameters(layer: nn.Module) -> nn.Module:
    """Replace a layer's parameters by shape-only meta tensors: the node keeps no weights.

    ``empty_strided``, not ``empty_like``: on a tensor that is already on the meta device
    (the driver strips the layers it ships) ``empty_like`` runs torch's Python meta
    kernel, whose first call imports ``torch._dynamo`` and sympy, about 1 s of CPU in
    every host process before its first node serves.
    """
    for module in layer.modules():
        for name, param in module._parameters.items():
            if param is not None:
                meta = torch.empty_strided(
                    param.shape, param.stride(), dtype=param.dtype, device="meta"
                )
                module._parameters[name] = nn.Parameter(meta, requires_grad=param.requires_grad)
    return layer


def layer_layout(layer: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(name, tuple(p.shape)) for name, p in layer.named_parameters()]


class NodeWorker:
    def __init__(
        self,
        *,
        rank: int,
        num_nodes: int,
        layers: list[nn.Module],
        dataset: Dataset,
        batch_size: int,
        seed: int,
        backend: Backend,
        max_eval_samples: int | None = None,
        share: tuple[int, int] | None = None,
    ):
        """``share`` is the span (start, stop) of the global batch this node trains on;
        None: the equal shard ``rank`` of ``num_nodes``."""
        # In training mode from now on (an evaluation sets eval mode for its layer and back).
        self.layers = [strip_parameters(layer).train() for layer in layers]
        self.layouts = [layer_layout(layer) for layer in self.layers]
        self.dataset = dataset
        self.seed = seed
        self.backend = backend
        self.sampler = BatchSampler(dataset.num_train, batch_size, seed=seed)
        self.batch_size = batch_size
        self.max_eval_samples = max_eval_samples
        self.reshard(rank, num_nodes)
        self.share = share
        self._flops: dict[tuple, float] = {}
        self._reset(step=-1)
        self.peak_activation_bytes = 0
        self.peak_layer_input_bytes = 0

    def reshard(self, rank: int, num_nodes: int) -> None:
        """Train and evaluate shard ``rank`` of ``num_nodes`` from now on (a cluster that shrank).

        A shrunk cluster splits the batch equally, so a node-group span no longer applies.
        """
        assert 0 <= rank < num_nodes
        self.rank = rank
        self.num_nodes = num_nodes
        self.share = None
        num_eval = len(self.dataset.test_inputs)
        if self.max_eval_samples is not None:
            num_eval = min(self.max_eval_samples, num_eval)
        self._eval_index = torch.tensor_split(torch.arange(num_eval), num_nodes)[rank]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def _reset(self, step: int) -> None:
        self._step = step
        #: Per layer of the current step's forward: what its backward needs.
        self._held: dict[int, HeldForBackward] = {}
        self._next_input: Tensor | None = None
        self._targets: Tensor | None = None
        self._logits: Tensor | None = None
        self._grad: Tensor | None = None

    @property
    def weight_bytes_held(self) -> int:
        """Weight state kept between layers: parameters (none: they are dropped) and what the
        backend keeps (PCM weight-stationary arrays and their pass-start records)."""
        return (
            self.backend.held_bytes
            + sum(
                p.numel() * p.element_size()
                for layer in self.layers
                for p in layer.parameters()
                if p.device.type != "meta"
            )
            + sum(held.weight_bytes() for held in self._held.values())
        )

    def _passed_on(self) -> list[Tensor]:
        return [t for t in (self._next_input, self._logits, self._grad) if t is not None]

    @property
    def activation_bytes(self) -> int:
        """Activation bytes this process holds for the step now: every tensor kept for a
        backward (saved by a kept graph, or a kept input) and the one passed on, each
        memory block counted once."""
        tensors = [t for held in self._held.values() for t in held.tensors()] + self._passed_on()
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        return sum(storages.values())

    @property
    def layer_input_bytes(self) -> int:
        """Activation bytes the modelled node holds now: each layer's input kept for its
        backward and the one passed on (what the emulated memory fit counts)."""
        return sum(held.input_bytes for held in self._held.values()) + sum(
            t.numel() * t.element_size() for t in self._passed_on()
        )

    def _rng_seed(self, step: int, layer: int) -> int:
        # Dropout masks must be the same in the forward pass and in a backward recompute.
        return hash((self.seed, self.rank, step, layer)) & 0x7FFF_FFFF_FFFF

    def _layer_flops(self, layer: int, x: Tensor) -> tuple[float, float]:
        """Forward and backward FLOPs of ``layer`` on inputs shaped like ``x``.

        Counted once per shape, on meta tensors, with the same convention as
        ``wafer simulate``: the backward pass counts the parameter gradients and
        the input gradient (none for the data input), not the recomputed forward.
        """
        key = (layer, tuple(x.shape), x.dtype)
        if key not in self._flops:
            forward, backward, _ = block_flops(self.layers[layer], x, differentiate_input=layer > 0)
            self._flops[key] = (forward, backward)
        return self._flops[key]

    def _timed_forward(
        self, layer: int, step: int, params: dict[str, Tensor], x: Tensor, *, train: bool
    ) -> tuple[Tensor, HeldForBackward | None, LayerResult]:
        block = self.layers[layer]
        held = None
        with _PROCESS_LOCK:
            started, started_cpu = time.perf_counter(), time.thread_time()
            _seed_cpu(self._rng_seed(step, layer))
            if train:
                y, held = self.backend.train_forward(layer, block, params, x)
            else:
                y = self.backend.forward(layer, block, params, x)
            flops, _ = self._layer_flops(layer, x)
        result = LayerResult(
            flops=flops,
            compute_seconds=time.perf_counter() - started,
            cpu_seconds=time.thread_time() - started_cpu,
        )
        return y, held, result

    def forward(self, layer: int, step: int, params: dict[str, Tensor]) -> LayerResult:
        if layer == 0:
            self._reset(step)
            self.backend.begin_pass(step, TRAIN_PASS)
            if self.share is None:
                index = self.sampler.shard(step, self.rank, self.num_nodes)
            else:
                index = self.sampler.span(step, *self.share)
            x = self.dataset.train_inputs[index]
            self._targets = self.dataset.train_targets[index]
        else:
            if self._step != step or self._next_input is None or layer - 1 not in self._held:
                raise NodeStateError(
                    f"node {self.rank} has no output of layer {layer - 1} for step {step}; "
                    "run the forward pass from layer 0"
                )
            x = self._next_input
        y, self._held[layer], result = self._timed_forward(layer, step, params, x, train=True)
        if layer == self.num_layers - 1:
            self._next_input = None
            self._logits = y
            task = self.dataset.task
            result.loss_sum = float(loss_sum(task, y, self._targets))
            result.num_targets = num_targets(task, self._targets)
            result.num_correct = (
                num_correct(task, y, self._targets) if task == "classification" else 0
            )
        else:
            self._next_input = y
        self.peak_activation_bytes = max(self.peak_activation_bytes, self.activation_bytes)
        self.peak_layer_input_bytes = max(self.peak_layer_input_bytes, self.layer_input_bytes)
        return result

    def backward(
        self, layer: int, step: int, params: dict[str, Tensor]
    ) -> tuple[dict[str, Tensor], LayerResult]:
        if self._step != step or layer not in self._held:
            raise NodeStateError(
                f"node {self.rank} holds no activation of layer {layer} for step {step}; "
                "the forward pass must run first"
            )
        started, started_cpu = time.perf_counter(), time.thread_time()
        if layer == self.num_layers - 1:
            self._grad = self._loss_gradient()
        elif self._grad is None:
            raise NodeStateError(
                f"node {self.rank}: backward of layer {layer} before layer {layer + 1}"
            )
        held = self._held.pop(layer)
        block = self.layers[layer]
        with _PROCESS_LOCK:
            _seed_cpu(self._rng_seed(step, layer))
            grad_x, grads = held.backward(self.backend, layer, block, params, self._grad)
            _, flops = self._layer_flops(layer, held.input_meta)
        self._grad = grad_x
        if layer == 0:
            self._reset(step)
        result = LayerResult(
            flops=flops,
            compute_seconds=time.perf_counter() - started,
            cpu_seconds=time.thread_time() - started_cpu,
        )
        return grads, result

    def _loss_gradient(self) -> Tensor:
        assert self._logits is not None and self._targets is not None
        task = self.dataset.task
        # Every node divides by the *global* number of targets, so the sum over
        # nodes that SwarmX forms is the gradient of the global mean loss. Every sample
        # has the same number of targets, so that count is exact for unequal shares too
        # (and the same integer as with equal shards: results stay bitwise equal).
        targets_per_sample = num_targets(task, self._targets) // len(self._targets)
        global_targets = targets_per_sample * self.batch_size
        logits = self._logits.detach().requires_grad_()
        with torch.enable_grad():
            loss = loss_sum(task, logits, self._targets) / global_targets
            # ``torch.autograd.grad(loss, logits)``'s engine call, without its Python layers.
            (grad,) = vector_jacobian(loss, [logits], torch.ones_like(loss))
        self._logits = None
        return grad

    def evaluate(self, layer: int, step: int, params: dict[str, Tensor]) -> LayerResult:
        if layer == 0:
            self.backend.begin_pass(step, EVAL_PASS)
            self._eval_x = self.dataset.test_inputs[self._eval_index]
        elif getattr(self, "_eval_x", None) is None:
            raise NodeStateError(
                f"evaluation of layer {layer} needs layer {layer - 1}'s output; "
                "an evaluation pass starts at layer 0"
            )
        block = self.layers[layer]
        block.eval()
        try:
            y, _, result = self._timed_forward(layer, step, params, self._eval_x, train=False)
        finally:
            block.train()
        if layer == self.num_layers - 1:
            targets = self.dataset.test_targets[self._eval_index]
            task = self.dataset.task
            result.loss_sum = float(loss_sum(task, y, targets))
            result.num_targets = num_targets(task, targets)
            result.num_correct = num_correct(task, y, targets) if task == "classification" else 0
            self._eval_x = None
        else:
            self._eval_x = y
        return result
