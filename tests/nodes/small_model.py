"""The two-layer model and the digits data that the compute-node service tests train."""

from __future__ import annotations

import torch
from torch import nn

from core.data import DataConfig, Dataset
from tests.nodes.in_process_cluster import SEED, layer_weights


def small_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))


def streamed_layers(model: nn.Sequential) -> list[nn.Module]:
    """The streamed layers: [Sequential(Linear, ReLU), Linear]."""
    return [nn.Sequential(model[0], model[1]), model[2]]


def nbytes(tensors, itemsize: int = 4) -> int:
    return sum(t.numel() * itemsize for t in tensors.values())


MODEL_BYTES = sum(nbytes(layer_weights(layer)) for layer in streamed_layers(small_model()))


def digits() -> Dataset:
    return DataConfig(name="digits").build(seed=SEED)
