"""Bounds on the sizes a model folder's configs may ask for, checked before anything is allocated."""
from __future__ import annotations

from typing import Mapping

Bounds = Mapping[str, tuple[float, float]]  # field -> (lowest, highest); int bounds ask for an integer


def check_bounds(values: Mapping, bounds: Bounds, prefix: str = "") -> None:
    """ValueError naming the first field of `values` outside its `bounds` (or of the wrong type); absent fields pass."""
    for name, (low, high) in bounds.items():
        if name not in values:
            continue
        value = values[name]
        kind = int if isinstance(low, int) and isinstance(high, int) else (int, float)
        if isinstance(value, bool) or not isinstance(value, kind) or not low <= value <= high:
            wanted = "an integer" if kind is int else "a number"
            raise ValueError(f"{prefix}{name} must be {wanted} in [{low}, {high}]; got {value!r}")
