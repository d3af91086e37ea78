"""The digital wafer (CS-2, CS-3): the backend and its cost engine."""

from nodes.cs2.backend import Cs2Backend
from nodes.cs2.engine import WaferEngine

__all__ = ["Cs2Backend", "WaferEngine"]
