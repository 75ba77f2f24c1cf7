"""When the eager-CPU fast paths may run: the one gate they all share.

Several reference ops and layer chains have a second implementation for eager CPU
tensors: the fused attention kernels (`eidetic_attention_fused`), the SSD core with a
hand-written backward (`ssd_fused`), the row-sliced norms and convs
(`elementwise_fused`) and the rotary's in-place form (`layers.rope`). They give the same
numbers as the plain expressions up to round-off, but a traced graph must never take
them: a Neuron/XLA graph is traced from the plain expressions, and so is a
`torch.compile` graph. `fused_kernel_available` is the test every such path asks;
`fused_kernels_disabled` turns them all off for a block of code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = ["cpu_cache_slicing", "fused_kernel_available", "fused_kernels_disabled", "shortcuts_allowed"]

_disabled = False  # process-wide, not per thread: NxD may run pipeline stages on other threads


@contextlib.contextmanager
def fused_kernels_disabled() -> Iterator[None]:
    """Run the block on the plain expressions only, as an XLA (Neuron) graph would run it.

    Real XLA tensors never reach the fast paths (their device is not CPU); a CPU
    stand-in of the XLA device (the torch-xla test double) would, so the Neuron
    backend enters this for its whole run and the stand-in runs the ops a Neuron graph
    is traced from.
    """
    global _disabled
    previous, _disabled = _disabled, True
    try:
        yield
    finally:
        _disabled = previous


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
_WIDE_FLOATS = (torch.float32, torch.float64)


def shortcuts_allowed() -> bool:
    """Whether code may leave the traced graph's ops for an eager shortcut at all: not inside a
    `torch.compile` trace and not inside `fused_kernels_disabled`. What the tensors themselves must
    be (device, dtype, plain type) is each caller's own check."""
    return not _disabled and not torch.compiler.is_compiling()


def fused_kernel_available(*tensors: Tensor | None) -> bool:
    """Whether the eager-CPU fast paths may run these inputs (None entries are skipped).

    True for plain CPU tensors that are float32, float64 or not floating point (masks,
    indices), outside tracing and outside `fused_kernels_disabled`. Lower-precision
    floats keep the plain expressions, which autocast and the dtype rules already cover.
    Asked by several ops per layer: a plain loop (no generator) keeps it cheap at short lengths.
    """
    if not shortcuts_allowed():
        return False
    for t in tensors:
        # The type first: no fake/functional wrappers, and no FX proxy, whose attributes are proxies too.
        if t is not None and not (type(t) in _PLAIN_TENSORS and t.device.type == "cpu"
                                  and (t.dtype in _WIDE_FLOATS or not t.is_floating_point())):
            return False
    return True


def cpu_cache_slicing(x: Tensor) -> bool:
    """Whether a plain expression should walk its input a cache-sized slice at a time.

    Slicing pays on a CPU, whose caches are small; elsewhere it only multiplies the ops:
    a Neuron/XLA graph (or its CPU stand-in, `fused_kernels_disabled`) would be traced
    with one copy of the sliced code per slice, and a GPU would launch each slice's
    kernels separately. So: CPU tensors only, and never inside `fused_kernels_disabled`.
    """
    return not _disabled and x.device.type == "cpu"
