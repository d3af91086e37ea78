"""Human-readable numbers for tables and error messages."""

from __future__ import annotations


def _scaled(value: float, units: tuple[tuple[str, float], ...], digits: int) -> str | None:
    for unit, scale in units:
        if abs(value) >= scale:
            return f"{value / scale:.{digits}g} {unit}"
    return None


def format_bytes(num_bytes: float) -> str:
    units = (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3))
    return _scaled(num_bytes, units, 3) or f"{num_bytes:.3g} B"


def format_count(count: float) -> str:
    """Parameter counts the way model names write them: 85k, 1.3B, 175B, 1.01T."""
    units = (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3))
    text = _scaled(count, units, 4)
    return text.replace(" ", "") if text else f"{count:g}"


def format_seconds(seconds: float) -> str:
    units = (("s", 1.0), ("ms", 1e-3), ("us", 1e-6))
    return _scaled(seconds, units, 4) or f"{seconds * 1e9:.4g} ns"


def format_energy(joules: float) -> str:
    units = (("GJ", 1e9), ("MJ", 1e6), ("kJ", 1e3))
    return _scaled(joules, units, 3) or f"{joules:.3g} J"


__all__ = ["format_bytes", "format_count", "format_energy", "format_seconds"]
