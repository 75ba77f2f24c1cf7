"""`nki.tensor`: trace-time tensors, the constant data `nl.shared_constant` turns into a device tensor.

The 0.2.0 stub has no `nki.tensor` module; its `nl.shared_constant` docstring
(`nki/api/nki/language/__init__.py` lines 97-149) names `nki.tensor.zeros`, `identity` and
`arange` and uses them as `ntensor.identity(128, dtype=nl.int8)`, `ntensor.arange(0, 32, 1,
dtype=nl.int32)` and `ntensor.zeros((64, 64), dtype=nl.int8) + 1` (arithmetic on the result).
nki-library 0759719 calls `ntensor.identity(P_MAX, nl.int8)` (`core/subkernels/
find_nonzero_indices.py` line 138). A trace-time tensor is evaluated while the kernel is traced,
on the host, so here it is a NumPy array of the given dtype; only these three constructors, the
ones the sources show, exist.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import core


def zeros(shape: Any, dtype: Any) -> np.ndarray:
    """A trace-time tensor of zeros."""
    return np.zeros(shape, dtype=core.as_dtype(dtype))


def identity(n: int, dtype: Any) -> np.ndarray:
    """A trace-time n x n identity matrix."""
    return np.eye(n, dtype=core.as_dtype(dtype))


def arange(start: int, stop: int, step: int, dtype: Any) -> np.ndarray:
    """A trace-time 1-D tensor start, start + step, ... (stop excluded)."""
    return np.arange(start, stop, step).astype(core.as_dtype(dtype))


__all__ = ["arange", "identity", "zeros"]
