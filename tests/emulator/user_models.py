"""User models for CLI tests: importable as ``tests.emulator.user_models:<factory>``."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset


class TinyNet(nn.Module):
    """A user's module in the ``blocks`` form the emulator accepts."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [nn.Sequential(nn.Linear(64, 32), nn.Tanh()), nn.Linear(32, 10)]
        )

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def tiny_net() -> nn.Module:
    return TinyNet()


def broken_chain() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(16, 10))


def narrow_head() -> nn.Module:
    """A head with 8 outputs: too few for the 10 digit classes."""
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 8))


# A user's own data, as ``--data tests.emulator.user_models:<factory>`` names it.


def _blobs(num_samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Four Gaussian blobs in 64 dimensions, one class each: learnable in a few steps."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_samples) % 4
    centres = torch.randn(4, 64, generator=torch.Generator().manual_seed(1234))
    return centres[labels] + 0.5 * torch.randn(num_samples, 64, generator=generator), labels


def blob_data() -> tuple[Dataset, Dataset]:
    """``(train, test)`` torch Datasets whose items are ``(x, y)``."""
    return TensorDataset(*_blobs(96, seed=0)), TensorDataset(*_blobs(20, seed=1))


def not_a_pair() -> Dataset:
    return TensorDataset(*_blobs(8, seed=0))
