"""User models for CLI tests: importable as ``tests.emulator.user_models:<factory>``."""

from __future__ import annotations

from torch import nn


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
