"""Build a model on the meta device and materialize its weights one layer at a time.

A model beyond the driver's RAM must not be built whole to stream it to MemoryX.
``build_deferred`` runs the model's factory with every tensor on the meta device
(no memory), and records, per parameter and buffer, the operations that
initialized it: the factory call that created it, then the in-place ones
(``uniform_``, ``normal_``, ``fill_``, ``zero_`` ...). A random operation records
the global CPU generator's state before it and is run on a scratch CPU tensor
of the same shape, so the generator advances exactly as in a real build, and
the operations after it draw what they would have drawn.
``DeferredInit.materialize`` replays one layer's recipes on CPU, each random
operation from its recorded state: the tensors are bitwise those of the real
build, and only that layer is in memory.

What cannot be replayed this way (an initialization that reads another tensor,
writes through a view or draws from its own generator) makes ``build_deferred``
return None; the caller then builds the model whole, as before.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


@dataclass
class _Recipe:
    """How one tensor (one storage) came to hold its values."""

    create: tuple  # (func, args, kwargs, generator state or None)
    geometry: tuple  # (shape, stride, storage offset) every operation must write whole
    keep: Tensor  # holds the meta storage, so that its id is not reused during the build
    ops: list[tuple] = field(default_factory=list)  # (func, args after self, kwargs, state)
    replayable: bool = True


def _key(tensor: Tensor) -> int:
    return tensor.untyped_storage()._cdata


def _geometry(tensor: Tensor) -> tuple:
    return (tuple(tensor.shape), tuple(tensor.stride()), tensor.storage_offset())


def _has_tensor(values) -> bool:
    return any(isinstance(v, Tensor) for v in tree_flatten(values)[0])


def _is_meta(value) -> bool:
    return isinstance(value, Tensor) and value.device.type == "meta"


class _Recorder(TorchDispatchMode):
    """Records how meta tensors are initialized; advances the CPU generator as a real build."""

    def __init__(self) -> None:
        super().__init__()
        self.recipes: dict[int, _Recipe] = {}

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        """False: leave ``__torch_dispatch__`` as written. Torch otherwise wraps it in
        ``torch._disable_dynamo``, whose first call imports ``torch._dynamo`` (and sympy),
        about 1.5 s of CPU in the driver before its first step, to keep a ``torch.compile``
        from tracing into the mode; nothing is compiled while a model is built here."""
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        random = torch.Tag.nondeterministic_seeded in func.tags
        state = torch.default_generator.get_state() if random else None
        written = [
            args[i]
            for i, a in enumerate(func._schema.arguments)
            if i < len(args) and a.alias_info is not None and a.alias_info.is_write
        ]
        tracked_write = [t for t in written if _is_meta(t)]
        if tracked_write:
            self._record_write(func, args, kwargs, tracked_write, state)
        out = func(*args, **kwargs)
        if not tracked_write:
            self._record_new(func, args, kwargs, out, state, random)
        return out

    def _record_write(self, func, args, kwargs, written: list[Tensor], state) -> None:
        target = written[0]
        recipe = self.recipes.get(_key(target))
        if recipe is None:
            return  # not a tensor the build created on the meta device: nothing to replay
        ok = (
            len(written) == 1
            and args[0] is target
            and _geometry(target) == recipe.geometry
            and not _has_tensor((args[1:], kwargs))
            and kwargs.get("generator") is None
        )
        if not ok:
            recipe.replayable = False
            return
        recipe.ops.append((func, args[1:], kwargs, state))
        if state is not None:  # draw what the real build draws, on a scratch tensor
            func(
                torch.empty_strided(
                    target.shape, target.stride(), dtype=target.dtype, device="cpu"
                ),
                *args[1:],
                **kwargs,
            )

    def _record_new(self, func, args, kwargs, out, state, random: bool) -> None:
        outputs = [t for t in tree_flatten(out)[0] if _is_meta(t)]
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)]
        input_keys = {_key(t) for t in inputs if _is_meta(t)}
        factory = not inputs and kwargs.get("generator") is None
        for tensor in outputs:
            key = _key(tensor)
            if key in input_keys:
                continue  # a view of a tracked tensor: writes through it are checked above
            if factory and len(outputs) == 1:
                self.recipes[key] = _Recipe(
                    create=(func, args, kwargs, state), geometry=_geometry(tensor), keep=tensor
                )
            else:  # made from other tensors: its values cannot be replayed from a recipe
                self.recipes[key] = _Recipe(
                    create=(func, args, kwargs, state),
                    geometry=_geometry(tensor),
                    keep=tensor,
                    replayable=False,
                )
        if random and not inputs and outputs:  # a random factory: draw what it draws, on CPU
            func(*args, **{**kwargs, "device": torch.device("cpu")})


class DeferredInit:
    """The recorded initialization of a model built on the meta device."""

    def __init__(self, recipes: dict[int, _Recipe]) -> None:
        self._recipes = recipes

    def replayable(self, module: nn.Module) -> bool:
        """True if every parameter and buffer of ``module`` can be materialized exactly."""
        tensors = [*module.parameters(), *module.buffers()]
        return all(
            t.device.type == "meta"
            and (r := self._recipes.get(_key(t))) is not None
            and r.replayable
            and r.geometry == _geometry(t)
            for t in tensors
        )

    def tensor(self, meta: Tensor) -> Tensor:
        """The values the real build gives ``meta``, on CPU (the global RNG left as it was)."""
        recipe = self._recipes[_key(meta)]
        func, args, kwargs, state = recipe.create
        with torch.random.fork_rng(devices=[]):
            if state is not None:
                torch.default_generator.set_state(state)
            value = func(*args, **{**kwargs, "device": torch.device("cpu")})
            for op, rest, op_kwargs, op_state in recipe.ops:
                if op_state is not None:
                    torch.default_generator.set_state(op_state)
                op(value, *rest, **op_kwargs)
        return value.detach()

    def materialize(self, module: nn.Module) -> dict[str, Tensor]:
        """``module``'s parameters by name, with the values of the real build."""
        return {name: self.tensor(p) for name, p in module.named_parameters()}

    def materialize_buffers(self, module: nn.Module) -> None:
        """Give ``module``'s buffers (small: masks, statistics) their real values, in place."""
        for sub in module.modules():
            for name, buffer in sub._buffers.items():
                if buffer is not None and buffer.device.type == "meta":
                    sub._buffers[name] = self.tensor(buffer)


def build_deferred(factory: Callable[[], nn.Module]) -> tuple[nn.Module, DeferredInit] | None:
    """``factory()`` on the meta device and its recorded initialization; None if not replayable.

    The global CPU generator advances as in ``factory()`` itself.
    """
    recorder = _Recorder()
    with torch.device("meta"), recorder:
        module = factory()
    init = DeferredInit(recorder.recipes)
    if not isinstance(module, nn.Module) or not init.replayable(module):
        return None
    return module, init


__all__ = ["DeferredInit", "build_deferred"]
