"""Routing a block's ``F.linear`` / ``F.conv2d`` on streamed weights to the PCM arrays.

``AnalogLayer`` is a ``TorchFunctionMode``: inside ``call_block`` it swaps the calls whose
weight *is* one of the streamed tensors for ``PcmBackend.matmul``, so the node and the model
stay unaware of the backend. A Conv2d is a matmul over unfolded patches (``F.unfold``: rows =
``C_in * kh * kw``, one input vector per output pixel), as the IBM chip maps convolutions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import _disable_current_modes

if TYPE_CHECKING:
    from nodes.pcm.backend import PcmBackend


def shaped_by_parameters(x: Tensor, data: Tensor) -> bool:
    """Whether ``x``'s autograd history reaches a leaf other than ``data`` (a parameter).

    Only then does a matmul on ``x`` need its input gradient in the first layer: the data's
    own gradient is dropped, a parameter's (a norm before the matmul, an earlier matmul) is not.
    """
    pending, seen = [x.grad_fn], set()
    while pending:
        node = pending.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        leaf = getattr(node, "variable", None)  # AccumulateGrad nodes hold their leaf
        if leaf is not None and leaf is not data:
            return True
        pending.extend(child for child, _ in node.next_functions)
    return False


class uncounted:
    """Keep the physics emulation out of the node's FLOP count (a dispatch mode).

    The node counts the layer's arithmetic; the emulation of noise, tiling and converters is
    not work the chip does in FLOPs. ``_count_logical_op`` records the layer's own op instead.
    """

    def __enter__(self):
        self._context = _disable_current_modes()
        self._context.__enter__()

    def __exit__(self, *exc):
        return self._context.__exit__(*exc)


def _count_logical_op(func, *args, **kwargs) -> None:
    """Run ``func`` on meta copies: shape-only, free, but seen by an active FLOP counter."""
    meta = [a.to("meta") if isinstance(a, Tensor) else a for a in args]
    func(*meta, **{k: v.to("meta") if isinstance(v, Tensor) else v for k, v in kwargs.items()})


_LINEAR_ARGS = ("input", "weight", "bias")
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


def _bind(names: tuple[str, ...], args: tuple, kwargs: dict) -> dict:
    bound = dict(zip(names, args, strict=False))
    bound.update(kwargs)
    return bound


class AnalogLayer(TorchFunctionMode):
    """Routes ``F.linear`` / ``F.conv2d`` on the streamed weights to the PCM arrays."""

    def __init__(
        self,
        backend: PcmBackend,
        layer: int,
        params: dict[str, Tensor],
        gen: torch.Generator,
        autograd: bool,
        data: Tensor | None = None,
    ):
        super().__init__()
        self.backend = backend
        self.layer = layer
        self.names = {id(tensor): name for name, tensor in params.items()}
        self.gen = gen
        self.autograd = autograd
        self.data = data

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            bound = _bind(_LINEAR_ARGS, args, kwargs)
            if id(bound["weight"]) in self.names:
                return self._linear(func, args, kwargs, bound)
        elif func is F.conv2d:
            bound = _bind(_CONV_ARGS, args, kwargs)
            if id(bound["weight"]) in self.names:
                return self._conv2d(func, args, kwargs, bound)
        # Calls nested inside another intercepted function (e.g. the projections inside
        # F.multi_head_attention_forward) run with this mode off, so they stay digital;
        # nn.Linear and nn.Conv2d call F.linear / F.conv2d directly and are caught.
        return func(*args, **kwargs)

    def _matmul(self, weight: Tensor, x_BI: Tensor, w_OI: Tensor) -> Tensor:
        name = self.names[id(weight)]
        return self.backend.matmul(self.layer, name, x_BI, w_OI, self.gen, self.autograd, self.data)

    def _linear(self, func, args, kwargs, bound) -> Tensor:
        x, weight, bias = bound["input"], bound["weight"], bound.get("bias")
        _count_logical_op(func, *args, **kwargs)
        y_BO = self._matmul(weight, x.reshape(-1, x.shape[-1]), weight)
        y = y_BO.reshape(*x.shape[:-1], weight.shape[0])
        return y if bias is None else y + bias

    def _conv2d(self, func, args, kwargs, bound) -> Tensor:
        x, weight, bias = bound["input"], bound["weight"], bound.get("bias")
        stride, padding = bound.get("stride", 1), bound.get("padding", 0)
        dilation, groups = bound.get("dilation", 1), bound.get("groups", 1)
        if groups != 1 or isinstance(padding, str):
            raise ValueError(
                f"layer {self.layer}: PCM maps Conv2d with groups = 1 and numeric padding; got "
                f"groups = {groups}, padding = {padding!r}."
            )
        _count_logical_op(func, *args, **kwargs)
        unbatched = x.ndim == 3
        x_NCHW = x[None] if unbatched else x
        out_channels, _, kh, kw = weight.shape
        cols_NKL = F.unfold(x_NCHW, (kh, kw), dilation=dilation, padding=padding, stride=stride)
        num, patch, num_pixels = cols_NKL.shape
        x_BK = cols_NKL.transpose(1, 2).reshape(num * num_pixels, patch)
        y_BO = self._matmul(weight, x_BK, weight.reshape(out_channels, patch))
        h_out, w_out = _conv_output_size(x_NCHW.shape[-2:], (kh, kw), stride, padding, dilation)
        y = y_BO.reshape(num, h_out, w_out, out_channels).permute(0, 3, 1, 2)
        if bias is not None:
            y = y + bias[:, None, None]
        return y[0] if unbatched else y


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def _conv_output_size(size, kernel, stride, padding, dilation) -> tuple[int, int]:
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    return tuple(
        (size[i] + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1
        for i in range(2)
    )


__all__ = ["AnalogLayer", "shaped_by_parameters", "uncounted"]
