"""Sizes, ages and counts as people type and read them: ``50G`` in, ``1.5 GiB``, ``3d`` and ``1 entry`` out."""

from __future__ import annotations

import re

_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4, "P": 1024**5}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes in ``text``: a number with an optional K/M/G/T/P suffix (binary: G = 2**30; "GB", "GiB" alike)."""
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"size {text!r}: expected a number with an optional K, M, G, T or P suffix, e.g. 50G")
    number, unit = match.groups()
    return int(float(number) * _UNITS[unit.upper()])


def format_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_age(seconds: float) -> str:
    """Whole seconds, minutes, hours or days, e.g. ``45s``, ``12m``, ``5h``, ``3d``."""
    seconds = max(0.0, seconds)
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= length:
            return f"{int(seconds // length)}{unit}"
    return f"{int(seconds)}s"


def format_entries(count: int) -> str:
    """``1 entry``, ``0 entries``, ``3 entries``."""
    return f"{count} {'entry' if count == 1 else 'entries'}"
