"""Every backend's config class by its ``kind``, and the zoo models backends contribute."""

from __future__ import annotations

from nodes.cs2 import Cs2Backend
from nodes.pcm.backend import PcmBackend
from nodes.photonic.backend import PhotonicBackend
from nodes.photonic.zoo import ZOO_MODELS as PHOTONIC_ZOO_MODELS

BACKEND_CONFIGS = {
    "cs2": Cs2Backend.Config,
    "pcm": PcmBackend.Config,
    "photonic": PhotonicBackend.Config,
}

#: Zoo models built from a backend's own physical elements, by name.
BACKEND_ZOO_MODELS = {**PHOTONIC_ZOO_MODELS}
