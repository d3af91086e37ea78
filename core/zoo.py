"""What a zoo model is: how to build it, what it trains on, and (GPT-style) its sizes.

The zoo itself (``emulator.zoo``) lists the models. A backend whose models are built
from its own physical elements (the photonic Taichi classifier) declares them beside
it as ``ZooEntry`` values, and the backend registry hands them to the zoo, so the zoo
imports no physics.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from core.config import doc
from core.data import DataConfig


@dataclass(frozen=True, kw_only=True)
class GPTShape:
    """Sizes of a GPT-style model: a zoo entry's defaults, after ModelConfig's overrides."""

    num_layers: int = doc("transformer blocks, blocks")
    d_model: int = doc("residual stream width, features; a multiple of num_heads")
    num_heads: int = doc("attention heads, heads")
    d_ff: int = doc("hidden width of each MLP, features")
    seq_len: int = doc("longest sequence (size of the position table), tokens")
    vocab_size: int = doc("vocabulary size, tokens")
    dropout: float = doc(
        "dropout probability; 0 keeps training deterministic, which the equivalence "
        "checks against the reference trainer rely on",
        default=0.0,
    )
    # GPT-2's normal init std (Radford et al. 2019, "Language Models are
    # Unsupervised Multitask Learners", and its released model code).
    init_std: float = doc("std of the normal weight init, dimensionless", default=0.02)


@dataclass(frozen=True, kw_only=True)
class ZooEntry:
    """A zoo model: how to build it, what it trains on, and (GPT-style) its default sizes."""

    factory: Callable[..., nn.Sequential]  # called with the GPTShape for GPT-style entries
    data: DataConfig  # default data set; GPT entries take seq_len/vocab_size from their shape
    description: str
    gpt_shape: GPTShape | None = None  # None: not GPT-style, size overrides are rejected
