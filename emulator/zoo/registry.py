"""The named models of the zoo, each with the data set it trains on by default."""

from __future__ import annotations

from core.data import DataConfig
from core.data.sources import TEXT_VOCAB_SIZE
from core.zoo import GPTShape, ZooEntry
from emulator.zoo.gpt import build_gpt
from emulator.zoo.vision import cnn_digits, mlp_digits
from nodes.registry import BACKEND_ZOO_MODELS

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
# Models built from a backend's own elements (e.g. photonic Taichi), declared beside it.
ZOO.update(BACKEND_ZOO_MODELS)
