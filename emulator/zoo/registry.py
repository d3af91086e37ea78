"""The named models of the zoo, each with the data set it trains on by default."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from emulator.data import DataConfig
from emulator.data.sources import TEXT_VOCAB_SIZE
from emulator.zoo.gpt import GPTShape, build_gpt
from emulator.zoo.taichi import taichi_digits, taichi_digits_fixed
from emulator.zoo.vision import cnn_digits, mlp_digits


@dataclass(frozen=True, kw_only=True)
class ZooEntry:
    """A zoo model: how to build it, what it trains on, and (GPT-style) its default sizes."""

    factory: Callable[..., nn.Sequential]  # called with the GPTShape for GPT-style entries
    data: DataConfig  # default data set; GPT entries take seq_len/vocab_size from their shape
    description: str
    gpt_shape: GPTShape | None = None  # None: not GPT-style, size overrides are rejected


ZOO: dict[str, ZooEntry] = {
    "mlp-digits": ZooEntry(
        factory=mlp_digits,
        data=DataConfig(name="digits"),
        description="64-256-256-10 ReLU MLP on the 8x8 digits (~85k parameters, 3 blocks)",
    ),
    "cnn-digits": ZooEntry(
        factory=cnn_digits,
        data=DataConfig(name="digits"),
        description="three 3x3 conv blocks and a linear head on the 8x8 digits (~15k parameters)",
    ),
    "taichi-digits": ZooEntry(
        factory=taichi_digits,
        data=DataConfig(name="digits"),
        description="Taichi multi-path diffractive classifier on the 8x8 digits: 20 paths of "
        "diffractive encoder, 8-mode MZI embedding and diffractive decoder (~16k phases, 3 blocks)",
    ),
    "taichi-digits-fixed": ZooEntry(
        factory=taichi_digits_fixed,
        data=DataConfig(name="digits"),
        description="taichi-digits behind fixed random encoder masks (~4.5k trainable phases, "
        "2 blocks)",
    ),
    "gpt-tiny": ZooEntry(
        factory=build_gpt,
        data=DataConfig(name="synthetic-tokens"),
        description="2-layer GPT (d_model 64) on Markov-chain tokens (~110k parameters); trains in seconds",
        gpt_shape=GPTShape(
            num_layers=2, d_model=64, num_heads=4, d_ff=256, seq_len=64, vocab_size=64
        ),
    ),
    "gpt-text": ZooEntry(
        factory=build_gpt,
        data=DataConfig(name="text"),
        description="2-layer GPT (d_model 128) on the byte-level English novel (~450k parameters)",
        gpt_shape=GPTShape(
            num_layers=2,
            d_model=128,
            num_heads=4,
            d_ff=512,
            seq_len=128,
            vocab_size=TEXT_VOCAB_SIZE,
        ),
    ),
    "gpt-10m": ZooEntry(
        factory=build_gpt,
        data=DataConfig(name="text"),
        description="6-layer GPT (d_model 384) on the English novel (~10.8M parameters), for benchmarks",
        gpt_shape=GPTShape(
            num_layers=6,
            d_model=384,
            num_heads=6,
            d_ff=1536,
            seq_len=256,
            vocab_size=TEXT_VOCAB_SIZE,
        ),
    ),
}
