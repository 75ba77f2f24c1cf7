"""Kernel launches in NKI 0.2.0: the launch grid of `kernel[n](...)` and what a kernel asks of it.

The rules come from aws-neuron-sdk 3c46990d:

* `nki/get-started/about/lnc.rst`, "Launching a kernel on multiple cores": the number in
  brackets is the count of logical NeuronCores to run the kernel on, 1 or 2; "The bracket
  syntax must contain only one number"; no brackets means 1 core; "If the number is too
  large for the current architecture, then you will receive an error".
* the same page, "Programming for multiple cores": without LNC, `num_programs()` returns 1
  and `program_id(0)` returns 0.
* `compiler/error-codes/EARG001.rst` (NCC_EARG001): "On trn1, only lnc=1 is supported", so
  the NeuronCore-v2 this emulator models launches one program at most.
* the `nki.language` stub: `program_id(axis)`, `num_programs(axes=None)`, `program_ndim()`.
* nki-library 0759719 `core/utils/kernel_helpers.py` (`get_program_sharding_info`: "Returns
  (0, 1, 0) for non-SPMD execution", read as `program_ndim() == 0`): a launch without
  brackets has no grid axes; `kernel[1]` has one.

The multi-axis grids and `nl.spmd_dim` / `nl.nc` of the SDK's SPMD tutorials belong to the
`neuronxcc.nki` beta those tutorials import (with `nl.load` / `nl.store`); the 0.2.0 stub
defines neither name, and lnc.rst allows one number.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import core

# NCC_EARG001: "On trn1, only lnc=1 is supported" (lnc.rst: the limit is the architecture's)
MAX_LOGICAL_CORES = 1

ONE_NUMBER = "the launch grid is one number, the count of logical NeuronCores (get-started/about/lnc.rst)"
TRN1_LNC = ("Trn1 (NeuronCore-v2) runs a kernel on 1 logical NeuronCore only: only lnc=1 is supported on trn1 "
            "(NCC_EARG001; lnc.rst: a number too large for the architecture is an error)")
GRID_AXIS = ("a launch grid has one axis, 0 (lnc.rst: the bracket holds one number); "
             "without a grid, axis 0 reads as one program (lnc.rst)")
NOT_IN_0_2 = ("nl.{name} is not in the NKI 0.2.0 nki.language stub: a 0.2.0 launch takes one number, "
              "kernel[n] (get-started/about/lnc.rst)")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def launch_grid(name: str, subscript: Any) -> tuple[int, ...]:
    """The grid of ``name[subscript]``: one count of logical cores, which a Trn1 allows only as 1."""
    inside = (", ".join(map(repr, subscript)) + ("," if len(subscript) == 1 else "")
              if isinstance(subscript, tuple) else repr(subscript))
    shown = f"{name}[{inside}]"
    if isinstance(subscript, tuple) or not _is_int(subscript):
        raise core.rule_error(f"{name}[...]", ONE_NUMBER, f"got {shown}")
    count = int(subscript)
    if not 1 <= count <= MAX_LOGICAL_CORES:
        raise core.rule_error(f"{name}[...]", TRN1_LNC, f"got {shown}")
    return (count,)


def _grid() -> tuple[int, ...]:
    return core.state().grid


def _axis(instr: str, axis: Any) -> int:
    """Check `axis` names an axis of the running launch (axis 0 also without a grid)."""
    grid = _grid()
    if not _is_int(axis) or not 0 <= int(axis) < max(len(grid), 1):
        raise core.rule_error(instr, GRID_AXIS, f"axis={axis!r}, grid {list(grid) or 'none'}")
    return int(axis)


def program_id(axis: Any) -> int:
    """Index of the running program along `axis`: 0, the only program a Trn1 launch runs (and without a grid,
    lnc.rst)."""
    _axis("nl.program_id", axis)
    return 0


def num_programs(axes: Any = None) -> int:
    """Programs along `axes` (an axis or a sequence of axes), all of them when None: 1 without a grid."""
    grid = _grid()
    if axes is None:
        return math.prod(grid)
    chosen = axes if isinstance(axes, (tuple, list)) else (axes,)
    indices = [_axis("nl.num_programs", a) for a in chosen]
    return math.prod(grid[i] for i in indices) if grid else 1


def program_ndim() -> int:
    """Axes of the launch grid: 0 for a launch without brackets."""
    return len(_grid())
