"""Zoo models built from photonic elements: Taichi's multi-path classifier on the 8x8 digits.

Three streamed layers: the diffractive encoders of every path, their MZI embeddings, and
the diffractive decoders with the digital combination. Parameters are phases (rad, float32);
the optics runs in complex128 on any backend (on ``cs2`` as a digital twin). With a fixed
encoder the random masks are part of the model's structure: they do not stream or train,
and the first streamed layer is encoder plus embedding.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from core.data import DataConfig
from core.zoo import ZooEntry
from nodes.photonic.diffraction import TaichiUnit
from nodes.photonic.multipath import TaichiMultiPath

#: 2 paths per class: 93% after 300 plain-torch steps (1 path: 86%), at half the cost of 4.
TAICHI_DIGITS = TaichiMultiPath.Config(
    num_classes=10,  # the digits data set
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


#: Registered in the zoo through ``nodes.registry.BACKEND_ZOO_MODELS``.
ZOO_MODELS: dict[str, ZooEntry] = {
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
}
