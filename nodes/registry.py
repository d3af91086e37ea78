"""Every backend's config class by its ``kind``: the one place that lists them."""

from __future__ import annotations

from nodes.cs2 import Cs2Backend
from nodes.pcm.backend import PcmBackend
from nodes.photonic.backend import PhotonicBackend

BACKEND_CONFIGS = {
    "cs2": Cs2Backend.Config,
    "pcm": PcmBackend.Config,
    "photonic": PhotonicBackend.Config,
}
