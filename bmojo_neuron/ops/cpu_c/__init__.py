"""The ``cpu-c`` ops backend: plain-C/OpenMP kernels for eager CPU float32, built on first use.

Implements `ssd_scan` (its chunked core, forward and backward, in `ssd_chunks.c`) and
`rotary` (`rotary.c`); the other ops keep their backend. The C files include no torch
headers, so a build takes under a second (`build`); tensors cross as `data_ptr()` of
float32 buffers, contiguous or with their strides passed along (`rotary`).
Off with ``BMOJO_CPU_C=0``; wherever the C core cannot run, the torch path runs, with
one warning naming why (docs/ops.md, "The cpu-c backend").
"""

from __future__ import annotations

from collections.abc import Callable

from .rotary import rotary as rotary_in_c  # the module keeps its name `rotary`
from .ssd import ssd_scan


def availability() -> tuple[bool, str]:
    """Always selectable: inputs the C core cannot take run the torch path (with a warning)."""
    return True, ("C/OpenMP kernels for eager CPU float32 (ssd_scan, rotary), built on first use; "
                  "the torch path elsewhere")


def impls() -> dict[str, Callable]:
    return {"ssd_scan": ssd_scan, "rotary": rotary_in_c}
