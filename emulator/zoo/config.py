"""ModelConfig: a zoo name or a user's factory, with optional GPT size overrides."""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass

import torch
from torch import nn

from core.config import doc
from core.data import DataConfig
from core.data.sources import TEXT_VOCAB_SIZE
from core.zoo import GPTShape
from emulator.zoo.blocks import model_blocks
from emulator.zoo.deferred import DeferredInit, build_deferred
from emulator.zoo.registry import ZOO

GPT_OVERRIDES = ("num_layers", "d_model", "num_heads", "d_ff", "seq_len", "vocab_size", "dropout")


@dataclass(kw_only=True)
class ModelConfig:
    """Which model to train; GPT size fields left at None keep the zoo entry's value."""

    name: str = doc(
        "zoo name (see emulator.zoo.ZOO) or 'package.module:factory' returning an nn.Module",
        default="mlp-digits",
    )
    num_layers: int | None = doc("transformer blocks, blocks (GPT only)", default=None)
    d_model: int | None = doc("residual stream width, features (GPT only)", default=None)
    num_heads: int | None = doc(
        "attention heads, heads; must divide d_model (GPT only)", default=None
    )
    d_ff: int | None = doc("MLP hidden width, features (GPT only)", default=None)
    seq_len: int | None = doc("longest sequence, tokens (GPT only)", default=None)
    vocab_size: int | None = doc("vocabulary size, tokens (GPT only)", default=None)
    dropout: float | None = doc("dropout probability in [0, 1) (GPT only)", default=None)

    def __post_init__(self) -> None:
        if self.name not in ZOO and not _is_factory_path(self.name):
            raise ValueError(
                f"name = {self.name!r} is neither a zoo model ({', '.join(sorted(ZOO))}) nor a "
                "user factory written as 'package.module:factory'."
            )
        overrides = self._overrides()
        if overrides and self.gpt_shape is None:
            field = next(iter(overrides))
            raise ValueError(
                f"{field} = {overrides[field]!r} is a GPT size, but {self.name!r} is not a GPT-style "
                f"model; leave {field} unset or pick one of "
                f"{', '.join(n for n, e in ZOO.items() if e.gpt_shape is not None)}."
            )
        for field, value in overrides.items():
            if field != "dropout" and value < 1:
                raise ValueError(f"{field} = {value} must be a positive integer.")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout = {self.dropout} must lie in [0, 1).")
        shape = self.gpt_shape
        if shape is not None and shape.d_model % shape.num_heads != 0:
            raise ValueError(
                f"d_model = {shape.d_model} must be a multiple of num_heads = {shape.num_heads}."
            )

    def _overrides(self) -> dict[str, int | float]:
        return {f: getattr(self, f) for f in GPT_OVERRIDES if getattr(self, f) is not None}

    @property
    def gpt_shape(self) -> GPTShape | None:
        """The GPT sizes after overrides, or None for a model that is not GPT-style."""
        entry = ZOO.get(self.name)
        if entry is None or entry.gpt_shape is None:
            return None
        return dataclasses.replace(entry.gpt_shape, **self._overrides())

    def _zoo_model(self) -> nn.Module:
        entry = ZOO[self.name]
        shape = self.gpt_shape
        return entry.factory(shape) if shape is not None else entry.factory()

    def build(self, *, seed: int) -> nn.Sequential:
        """The model, initialized from ``seed`` (the global random state is left untouched)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if self.name in ZOO:
                return self._zoo_model()
            module = _import_factory(self.name)()
        if not isinstance(module, nn.Module):
            raise ValueError(
                f"model.name = {self.name!r}: the factory returned a {type(module).__name__}, not an nn.Module."
            )
        return module if isinstance(module, nn.Sequential) else nn.Sequential(*model_blocks(module))

    def build_deferred(self, *, seed: int) -> tuple[nn.Sequential, DeferredInit] | None:
        """A zoo model on the meta device and its recorded initialization from ``seed``.

        ``init.materialize(layer)`` gives a layer's weights bitwise as ``build(seed=seed)``
        does, one layer at a time (emulator.zoo.deferred). None for a user's factory (it
        may do anything) and for a model whose initialization cannot be replayable.
        """
        if self.name not in ZOO:
            return None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return build_deferred(self._zoo_model)


def _is_factory_path(name: str) -> bool:
    module, sep, factory = name.partition(":")
    return bool(sep and module and factory.isidentifier())


def _import_factory(name: str):
    module_name, _, factory_name = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(
            f"model.name = {name!r}: cannot import module {module_name!r} ({exc})."
        ) from exc
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise ValueError(
            f"model.name = {name!r}: module {module_name!r} has no callable {factory_name!r}."
        )
    return factory


def default_data_config(model: ModelConfig) -> DataConfig:
    """The data set ``model`` trains on unless told otherwise.

    GPT-style models get sequences of their own ``seq_len`` (and, on synthetic
    tokens, their ``vocab_size``). A user's factory gets the digits, the
    default ``DataConfig``.
    """
    entry = ZOO.get(model.name)
    if entry is None:
        return DataConfig()
    shape = model.gpt_shape
    if shape is None:
        return dataclasses.replace(entry.data)
    if entry.data.name == "synthetic-tokens":
        return dataclasses.replace(entry.data, seq_len=shape.seq_len, vocab_size=shape.vocab_size)
    if shape.vocab_size < TEXT_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size = {shape.vocab_size} is too small for {model.name!r}: its text data "
            f"has {TEXT_VOCAB_SIZE} byte tokens; use vocab_size >= {TEXT_VOCAB_SIZE}."
        )
    return dataclasses.replace(entry.data, seq_len=shape.seq_len)
