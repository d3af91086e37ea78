"""Small classifiers for the 8x8 digits (inputs ``[N, 64]`` floats in [0, 1])."""

from __future__ import annotations

from torch import nn

DIGITS_PIXELS = 64
DIGITS_CLASSES = 10


def mlp_digits(hidden: int = 256) -> nn.Sequential:
    """64-256-256-10 MLP; each block is one Linear (with its ReLU)."""
    return nn.Sequential(
        nn.Sequential(nn.Linear(DIGITS_PIXELS, hidden), nn.ReLU()),
        nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU()),
        nn.Linear(hidden, DIGITS_CLASSES),
    )


def cnn_digits(channels: int = 32) -> nn.Sequential:
    """Three 3x3 conv blocks and a linear head; no BatchNorm (see check_blocks).

    The first block reshapes the flat ``[N, 64]`` input to ``[N, 1, 8, 8]``, so
    the digits data set serves the MLP and the CNN alike.
    """
    return nn.Sequential(
        nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)),
            nn.Conv2d(1, channels // 2, kernel_size=3, padding=1),
            nn.ReLU(),
        ),
        nn.Sequential(
            nn.Conv2d(channels // 2, channels, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
        ),
        nn.Sequential(
            nn.Conv2d(channels, channels, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 4x4 -> 2x2
        ),
        nn.Sequential(nn.Flatten(), nn.Linear(channels * 2 * 2, DIGITS_CLASSES)),
    )
