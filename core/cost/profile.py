"""Layer profiles of torch blocks: FLOPs counted by torch, nothing computed.

This is how the zoo's small models and a functional run's model get a
``Workload``: each block of the chain is one streamed layer. A block of standard
layers is counted from its shapes (``core.cost.flops``, the same figures without
torch's slow first meta computation); any other block by ``FlopCounterMode``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from core.cost.flops import analytic_block
from core.cost.workload import LayerProfile, Matmul, OpticalPass, Workload
from core.precision import Precision, precision_format


def _meta_state(block: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Meta copies of a block's parameters and buffers, so the caller's block is untouched."""
    state = {
        name: torch.empty_like(p, device="meta").requires_grad_(p.requires_grad)
        for name, p in block.named_parameters()
    }
    state.update({name: torch.empty_like(b, device="meta") for name, b in block.named_buffers()})
    return state


def block_flops(
    block: torch.nn.Module, x: torch.Tensor, *, differentiate_input: bool
) -> tuple[float, float, torch.Tensor]:
    """Forward FLOPs, backward FLOPs and a meta output of ``block`` on an input like ``x``.

    Counted on meta tensors, so nothing is computed. The backward counts the
    parameter gradients and, if ``differentiate_input``, the input gradient;
    not a recomputed forward. This is the one FLOP convention of the project:
    compute nodes count their layers with it too, so a functional run and
    ``wafer simulate`` see the same workload by construction.

    A block of standard layers is counted from shapes (``core.cost.flops``);
    ``counted_flops`` is the ``FlopCounterMode`` count, which is the reference.
    """
    known = analytic_block(block, tuple(x.shape), x.dtype, differentiate_input=differentiate_input)
    if known is not None:
        y = torch.empty(known.output_shape, dtype=known.output_dtype, device="meta")
        return float(known.forward_flops), float(known.backward_flops), y
    return counted_flops(block, x, differentiate_input=differentiate_input)


def shape_forward(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``block(x)`` for a meta ``x``, without gradients: a meta output of the right shape
    and dtype.

    A block of standard layers answers from shapes (``core.cost.flops``, the same output as
    torch's); any other block, or an input that does not fit it, runs on the meta tensors,
    so that a misfit raises torch's own error. A meta matmul goes through torch's Python
    meta kernels, whose first call imports ``torch._dynamo`` and sympy (about 1.5 s of
    CPU): the driver's shape checks of a zoo model need neither.
    """
    if x.device.type == "meta":
        known = analytic_block(block, tuple(x.shape), x.dtype, differentiate_input=False)
        if known is not None:
            return torch.empty(known.output_shape, dtype=known.output_dtype, device="meta")
    with torch.no_grad():
        return block(x)


def counted_flops(
    block: torch.nn.Module, x: torch.Tensor, *, differentiate_input: bool
) -> tuple[float, float, torch.Tensor]:
    """``block_flops`` as ``FlopCounterMode`` counts it on meta tensors (for any block)."""
    state = _meta_state(block)
    params = [t for t in state.values() if t.requires_grad]
    x_in = x.detach().to("meta").requires_grad_(differentiate_input and x.is_floating_point())
    with FlopCounterMode(display=False) as counter:
        y = torch.func.functional_call(block, state, (x_in,))
    forward_flops = float(counter.get_total_flops())
    backward_flops = 0.0
    if y.requires_grad:
        inputs = [t for t in (x_in, *params) if t.requires_grad]
        with FlopCounterMode(display=False) as counter:
            # .backward, not autograd.grad: the counter's module hooks support only the former.
            torch.autograd.backward(y, torch.ones_like(y), inputs=inputs)
        backward_flops = float(counter.get_total_flops())
    return forward_flops, backward_flops, y.detach()


def _matrix_of(module: torch.nn.Module) -> tuple[int, int] | None:
    """(outputs, inputs) of a module that multiplies its input by a weight matrix, else None.

    Linear-like modules (``nn.Linear``, the photonic ``MeshLinear``) expose
    ``in_features``/``out_features``; a convolution is a matmul over unfolded
    patches, ``C_out x (C_in / groups * kh * kw)``, as analog chips map it.
    """
    if isinstance(module, torch.nn.Conv1d | torch.nn.Conv2d | torch.nn.Conv3d):
        patch = module.in_channels // module.groups
        for size in module.kernel_size:
            patch *= size
        return module.out_channels, patch
    features = (getattr(module, "out_features", None), getattr(module, "in_features", None))
    if all(isinstance(f, int) for f in features):
        return features
    return None


def block_matmuls(block: torch.nn.Module, x: torch.Tensor) -> tuple[Matmul, ...]:
    """The weight products of ``block`` on an input like ``x``, per sample (meta tensors).

    The vectors through a matrix are its input's elements over the matrix
    width (tokens for a Linear on a sequence, output pixels for a conv).
    """
    known = analytic_block(block, tuple(x.shape), x.dtype, differentiate_input=False)
    if known is not None:
        return known.matmuls(x.shape[0])
    return hooked_matmuls(block, x)


def hooked_matmuls(block: torch.nn.Module, x: torch.Tensor) -> tuple[Matmul, ...]:
    """``block_matmuls`` found by forward hooks on a meta forward pass (for any block)."""
    found: list[Matmul] = []
    num_samples = x.shape[0]

    def hook(module, args, output) -> None:
        num_outputs, num_inputs = _matrix_of(module)
        if isinstance(module, torch.nn.Conv1d | torch.nn.Conv2d | torch.nn.Conv3d):
            vectors = output[0, 0].numel() * output.shape[0]
        else:
            vectors = args[0].numel() // num_inputs
        found.append(Matmul(num_outputs, num_inputs, vectors / num_samples))

    handles = [m.register_forward_hook(hook) for m in block.modules() if _matrix_of(m) is not None]
    try:
        with torch.no_grad():
            torch.func.functional_call(block, _meta_state(block), (x.detach().to("meta"),))
    finally:
        for handle in handles:
            handle.remove()
    return tuple(found)


def block_optical_passes(block: torch.nn.Module) -> tuple[OpticalPass, ...]:
    """The fixed optical stages of ``block``: modules that describe themselves by ``optical_pass()``.

    Diffraction is FFTs and complex products on a computer, which count no
    FLOPs, so such modules say what they are instead (nodes.photonic.multipath).
    """
    return tuple(
        m.optical_pass() for m in block.modules() if callable(getattr(m, "optical_pass", None))
    )


def profile_modules(
    name: str,
    blocks: Sequence[tuple[str, torch.nn.Module]],
    example_input: torch.Tensor,
    *,
    samples_per_step: int,
    precision: Precision = "fp16",
    tokens_per_sample: int = 1,
) -> Workload:
    """Profile a chain of blocks (each block is one streamed layer) on an example batch.

    FLOPs are counted by ``FlopCounterMode`` on meta tensors, so nothing is
    computed and any size works. Forward and backward are counted separately
    (backward includes the input gradient except for the first block, which
    has no trainable input). The activations kept for backward are taken as
    each block's input, as the wafer keeps the layer inputs in SRAM; FLOPs and
    bytes are divided by the example batch to give per-sample figures.
    """
    element_bytes = precision_format(precision).bytes_per_element
    num_examples = example_input.shape[0]
    x = example_input.to("meta").requires_grad_(False)
    layers = []
    for index, (block_name, block) in enumerate(blocks):
        forward_flops, backward_flops, y = block_flops(block, x, differentiate_input=index > 0)
        matmuls = block_matmuls(block, x)
        params = [p for p in block.parameters() if p.requires_grad]
        num_params = sum(p.numel() for p in params)
        layers.append(
            LayerProfile(
                name=block_name,
                num_params=num_params,
                weight_bytes=num_params * element_bytes,
                grad_bytes=num_params * element_bytes,
                forward_flops=forward_flops / num_examples,
                backward_flops=backward_flops / num_examples,
                activation_bytes=x.numel() * element_bytes / num_examples,
                matmuls=matmuls,
                optical_passes=block_optical_passes(block),
            )
        )
        x = y.detach()
    return Workload(
        name=name,
        layers=tuple(layers),
        samples_per_step=samples_per_step,
        tokens_per_sample=tokens_per_sample,
        precision=precision,
    )


__all__ = [
    "block_flops",
    "block_matmuls",
    "block_optical_passes",
    "counted_flops",
    "hooked_matmuls",
    "profile_modules",
    "shape_forward",
]
