"""FLOPs of standard torch blocks counted from their shapes, as ``FlopCounterMode`` counts them.

``FlopCounterMode`` on meta tensors is the project's FLOP convention (``core.cost.profile``),
but it is slow to start: a meta matmul goes through torch's Python decompositions, whose
first call imports ``torch._dynamo`` (about 3 s of CPU in every process that counts). A block
made only of standard layers is counted here instead, from the shapes alone, with torch's
own formulas (``torch.utils.flop_counter``) for the ops that counter counts: matrix products
and convolutions. Everything else (norms, activations, pooling, reshapes, embeddings)
counts 0 FLOPs there, and so here.

A block qualifies when it is one of the exactly-typed leaves below or an exactly-typed
``nn.Sequential`` of such blocks, without hooks; a subclass may compute anything in its
``forward``, so it does not. ``analytic_block`` returns None for any other block, and the
caller counts it with ``FlopCounterMode``. ``tests/core/test_flops.py`` checks both counts
agree on every zoo model and on each layer kind here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import conv_flop_count, mm_flop

from core.cost.workload import Matmul

#: Layers that keep the input's shape and dtype and count no FLOPs (forward or backward).
_SHAPE_KEEPING = (
    nn.Identity,
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Tanh,
    nn.Sigmoid,
    nn.LeakyReLU,
    nn.ELU,
    nn.Softplus,
    nn.Hardswish,
    nn.Hardtanh,
    nn.Softmax,
    nn.LogSoftmax,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
)
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
_CONVS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_MAX_POOLS = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}
_AVG_POOLS = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}
_ADAPTIVE_POOLS = {
    nn.AdaptiveAvgPool1d: 1,
    nn.AdaptiveAvgPool2d: 2,
    nn.AdaptiveAvgPool3d: 3,
    nn.AdaptiveMaxPool1d: 1,
    nn.AdaptiveMaxPool2d: 2,
    nn.AdaptiveMaxPool3d: 3,
}


class _NotAnalytic(Exception):
    """This block (or an input to it) is outside what is counted here."""


@dataclass(frozen=True)
class AnalyticCount:
    """What ``block_flops`` and ``block_matmuls`` find for a block, from shapes alone."""

    forward_flops: int
    backward_flops: int  # 0 when the output needs no gradient
    output_shape: tuple[int, ...]
    output_dtype: torch.dtype
    #: (rows, columns, vectors) of each weight product, in forward order (``block_matmuls``).
    matrices: tuple[tuple[int, int, int], ...]

    def matmuls(self, num_samples: int) -> tuple[Matmul, ...]:
        return tuple(
            Matmul(rows, cols, vectors / num_samples) for rows, cols, vectors in self.matrices
        )


@dataclass
class _Walk:
    forward: int = 0
    backward: int = 0
    matrices: list = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.matrices = []


def _tuple(value, n: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, tuple | list) else (value,) * n


def _window_out(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    out = (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    if out < 1:
        raise _NotAnalytic
    return out


def _in_range(dim: int | None, ndim: int) -> bool:
    """Whether ``dim`` (None: none given) names a dimension of an ``ndim``-dimensional input;
    torch raises for one that does not, so such a block is left to torch."""
    return dim is None or (ndim > 0 and -ndim <= dim < ndim)


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters(recurse=False))


def _leaf(
    module: nn.Module, shape: tuple[int, ...], dtype: torch.dtype, grad_in: bool, walk: _Walk
) -> tuple[tuple[int, ...], torch.dtype, bool]:
    """Output shape, dtype and requires-grad of one leaf; its FLOPs go into ``walk``."""
    kind = type(module)
    floating = dtype.is_floating_point
    if kind in _SHAPE_KEEPING:
        if not floating or not _in_range(getattr(module, "dim", None), len(shape)):
            raise _NotAnalytic  # (a softmax over a dimension the input lacks: torch raises)
        return shape, dtype, grad_in
    if kind in _NORMS:
        if not floating:
            raise _NotAnalytic
        if kind is nn.GroupNorm:
            if len(shape) < 2 or shape[1] != module.num_channels:
                raise _NotAnalytic
        elif shape[len(shape) - len(module.normalized_shape) :] != tuple(module.normalized_shape):
            raise _NotAnalytic
        return shape, dtype, grad_in or _trainable(module)
    if kind is nn.Linear:
        weight = module.weight
        if not floating or dtype != weight.dtype or len(shape) < 2:
            raise _NotAnalytic
        if shape[-1] != module.in_features:
            raise _NotAnalytic
        rows = math.prod(shape[:-1])
        product = mm_flop((rows, module.in_features), (module.in_features, module.out_features))
        walk.forward += product
        walk.backward += product * (int(grad_in) + int(weight.requires_grad))
        walk.matrices.append((module.out_features, module.in_features, rows))
        return (*shape[:-1], module.out_features), dtype, grad_in or _trainable(module)
    if kind in _CONVS:
        return _conv(module, _CONVS[kind], shape, dtype, grad_in, walk)
    if kind in _MAX_POOLS or kind in _AVG_POOLS:
        n = _MAX_POOLS.get(kind) or _AVG_POOLS[kind]
        if not floating or module.ceil_mode or getattr(module, "return_indices", False):
            raise _NotAnalytic
        if len(shape) not in (n + 1, n + 2):
            raise _NotAnalytic
        kernel = _tuple(module.kernel_size, n)
        stride = _tuple(module.stride or module.kernel_size, n)
        padding = _tuple(module.padding, n)
        dilation = _tuple(getattr(module, "dilation", 1), n)
        spatial = tuple(
            _window_out(size, *args)
            for size, *args in zip(shape[-n:], kernel, stride, padding, dilation, strict=True)
        )
        return (*shape[:-n], *spatial), dtype, grad_in
    if kind in _ADAPTIVE_POOLS:
        n = _ADAPTIVE_POOLS[kind]
        if not floating or getattr(module, "return_indices", False):
            raise _NotAnalytic
        if len(shape) not in (n + 1, n + 2):
            raise _NotAnalytic
        sizes = _tuple(module.output_size, n)
        spatial = tuple(s if o is None else o for s, o in zip(shape[-n:], sizes, strict=True))
        return (*shape[:-n], *spatial), dtype, grad_in
    if kind is nn.Flatten:
        ndim = len(shape)
        if not (_in_range(module.start_dim, ndim) and _in_range(module.end_dim, ndim)):
            raise _NotAnalytic
        start, end = module.start_dim % ndim, module.end_dim % ndim
        if start > end:
            raise _NotAnalytic
        merged = math.prod(shape[start : end + 1])
        return (*shape[:start], merged, *shape[end + 1 :]), dtype, grad_in
    if kind is nn.Unflatten:
        if not isinstance(module.dim, int) or not _in_range(module.dim, len(shape)):
            raise _NotAnalytic
        dim = module.dim % len(shape)
        sizes = list(module.unflattened_size)
        if sizes.count(-1) > 1:
            raise _NotAnalytic
        if -1 in sizes:
            known = math.prod(s for s in sizes if s != -1)
            if known == 0 or shape[dim] % known:
                raise _NotAnalytic
            sizes[sizes.index(-1)] = shape[dim] // known
        if math.prod(sizes) != shape[dim]:
            raise _NotAnalytic
        return (*shape[:dim], *sizes, *shape[dim + 1 :]), dtype, grad_in
    if kind is nn.Embedding:
        if floating or dtype == torch.bool or module.max_norm is not None:
            raise _NotAnalytic
        weight = module.weight
        return (*shape, module.embedding_dim), weight.dtype, weight.requires_grad
    raise _NotAnalytic


def _conv(
    module: nn.Module,
    n: int,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    grad_in: bool,
    walk: _Walk,
) -> tuple[tuple[int, ...], torch.dtype, bool]:
    weight, bias = module.weight, module.bias
    # Batched input only: an unbatched conv runs as a batch of one and is counted so.
    if not dtype.is_floating_point or dtype != weight.dtype or len(shape) != n + 2:
        raise _NotAnalytic
    if shape[1] != module.in_channels:
        raise _NotAnalytic
    kernel, stride = _tuple(module.kernel_size, n), _tuple(module.stride, n)
    dilation = _tuple(module.dilation, n)
    if module.padding == "same":
        spatial = shape[2:]
    else:
        padding = (0,) * n if module.padding == "valid" else _tuple(module.padding, n)
        spatial = tuple(
            _window_out(size, *args)
            for size, *args in zip(shape[2:], kernel, stride, padding, dilation, strict=True)
        )
    out_shape = (shape[0], module.out_channels, *spatial)
    w_shape = tuple(weight.shape)
    forward = conv_flop_count(list(shape), list(w_shape), list(out_shape), transposed=False)
    # convolution_backward as torch's counter counts it: the input gradient as a transposed
    # convolution, the weight gradient as a convolution of the input by the output gradient.
    backward = 0
    if grad_in:
        backward += conv_flop_count(list(out_shape), list(w_shape), list(shape), transposed=True)
    if weight.requires_grad:

        def t(s):
            return [s[1], s[0], *s[2:]]

        backward += conv_flop_count(t(shape), t(out_shape), t(w_shape), transposed=False)
    walk.forward += forward
    walk.backward += backward
    patch = module.in_channels // module.groups * math.prod(kernel)
    walk.matrices.append((module.out_channels, patch, math.prod(spatial) * shape[0]))
    trainable = weight.requires_grad or (bias is not None and bias.requires_grad)
    return out_shape, dtype, grad_in or trainable


def _walk(
    block: nn.Module, shape: tuple[int, ...], dtype: torch.dtype, grad_in: bool, walk: _Walk
) -> tuple[tuple[int, ...], torch.dtype, bool]:
    if block._forward_hooks or block._forward_pre_hooks:
        raise _NotAnalytic
    if type(block) is nn.Sequential:
        for child in block:
            shape, dtype, grad_in = _walk(child, shape, dtype, grad_in, walk)
        return shape, dtype, grad_in
    return _leaf(block, shape, dtype, grad_in, walk)


def analytic_block(
    block: nn.Module, shape: tuple[int, ...], dtype: torch.dtype, *, differentiate_input: bool
) -> AnalyticCount | None:
    """FLOPs, output and weight products of ``block`` on an input of ``shape`` and ``dtype``,
    counted as ``core.cost.profile.block_flops`` counts them; None if the block is not made
    of the standard layers counted here (or its input does not fit them)."""
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return None
    walk = _Walk()
    grad_in = differentiate_input and dtype.is_floating_point
    try:
        out_shape, out_dtype, needs_grad = _walk(block, tuple(shape), dtype, grad_in, walk)
    except _NotAnalytic:
        return None
    return AnalyticCount(
        forward_flops=walk.forward,
        backward_flops=walk.backward if needs_grad else 0,
        output_shape=tuple(out_shape),
        output_dtype=out_dtype,
        matrices=tuple(walk.matrices),
    )


__all__ = ["AnalyticCount", "analytic_block"]
