"""The ``cpu-c`` ops backend: plain-C/OpenMP kernels for eager CPU float32, built on first use.

Implements `ssd_scan` (the whole op, forward and backward, in `ssd_chunks.c`),
`causal_conv1d_rows` (the conv with its SiLU, in `causal_conv.c`), the norms `rms_norm` and
`gated_rms_norm` (`norms.c`), `swiglu_product` (`swiglu.c`) and `rotary` (`rotary.c`); the
other ops keep their backend. The C files include no torch headers, so a build takes
about a second (`build`); tensors cross as `data_ptr()` of float32 buffers, contiguous or
with their strides passed along (`rotary`).
Off with ``BMOJO_CPU_C=0``; wherever the C core cannot run, the torch path runs, with
one warning naming why (docs/ops.md, "The cpu-c backend"). Chosen explicitly with
``BMOJO_OPS_BACKEND=cpu-c``; the default backend (`ops.auto`) calls these kernels only
for the inputs they take, without warnings.
"""

from __future__ import annotations

from collections.abc import Callable

from .causal_conv import causal_conv1d_rows
from .norms import gated_rms_norm, rms_norm
from .rotary import rotary as rotary_in_c  # the module keeps its name `rotary`
from .ssd import ssd_scan
from .swiglu import swiglu_product


def availability() -> tuple[bool, str]:
    """Always selectable: inputs the C core cannot take run the torch path (with a warning)."""
    return True, ("C/OpenMP kernels for eager CPU float32 (ssd_scan, causal_conv1d_rows, rms_norm, gated_rms_norm, "
                  "swiglu_product, rotary), built on first use; the torch path elsewhere")


def impls() -> dict[str, Callable]:
    return {"ssd_scan": ssd_scan, "causal_conv1d_rows": causal_conv1d_rows, "rms_norm": rms_norm,
            "gated_rms_norm": gated_rms_norm, "swiglu_product": swiglu_product, "rotary": rotary_in_c}
