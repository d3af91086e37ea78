"""Taichi's multi-path diffractive classifier on the 8x8 digits (``nodes/photonic/multipath.py``).

Three streamed layers: the diffractive encoders of every path, their MZI embeddings, and
the diffractive decoders with the digital combination. Parameters are phases (rad, float32);
the optics runs in complex128 on any backend (on ``cs2`` as a digital twin). With a fixed
encoder the random masks are part of the model's structure: they do not stream or train,
and the first streamed layer is encoder plus embedding.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from emulator.zoo.vision import DIGITS_CLASSES
from nodes.photonic.diffraction import TaichiUnit
from nodes.photonic.multipath import TaichiMultiPath

#: 2 paths per class: 93% after 300 plain-torch steps (1 path: 86%), at half the cost of 4.
TAICHI_DIGITS = TaichiMultiPath.Config(
    num_classes=DIGITS_CLASSES,
    paths_per_class=2,
    # Taichi's unit: 8 x 8 input couplers compressed to 8 channels; 3 x 3 pixels per coupler.
    unit=TaichiUnit.Config(input_side=8, pixels_per_input=3, num_channels=8),
)


def taichi_digits() -> nn.Sequential:
    """20 paths with trainable encoder masks (~16k parameters)."""
    return TAICHI_DIGITS.build()


def taichi_digits_fixed() -> nn.Sequential:
    """20 paths behind fixed random encoder masks (~4.5k trainable parameters)."""
    unit = dataclasses.replace(TAICHI_DIGITS.unit, trainable_encoder=False)
    return dataclasses.replace(TAICHI_DIGITS, unit=unit).build()
