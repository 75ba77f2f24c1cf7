"""When a layer may take a shortcut that only an eager run allows, on any device.

Some layer paths compute less than the traced graph does, with the same result: the B
layer projects fading keys only where some query reads them and skips selecting a
memory no chunk reads (`layers/attention.py`). They are slices, pads and skipped ops,
not CPU kernels, so they do not need `fused_kernel_available` (CPU float32/float64
only); they need only that the run is eager: a traced graph (Neuron/XLA,
`torch.compile`, `torch.jit`, the step-graph export on fake tensors) must keep the
ops it is checked and compiled with at every length. Likewise the rotary tables of
positions 0..L-1 are kept between forwards only on an eager run (`keeps_eager_constants`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ..ops.reference.eager_cpu import shortcuts_allowed

__all__ = ["eager_untraced", "executes_eagerly", "keeps_eager_constants"]

_TRACED_DEVICES = ("xla", "meta")  # lazy-graph and shape-only devices: their programs are traced, not run op by op


def executes_eagerly(device_type: str) -> bool:
    """Whether tensors on this kind of device (``torch.device.type``) run op by op: CPU, CUDA, MPS, ...; not XLA
    (torch-xla records a lazy graph) and not meta (shapes only)."""
    return device_type not in _TRACED_DEVICES


def eager_untraced(*tensors: Tensor | None) -> bool:
    """Whether these tensors (None skipped) run op by op outside any trace.

    No `torch.compile` or `torch.jit` trace, no `fused_kernels_disabled` block (the CPU
    stand-in of a Neuron/XLA run), plain tensors (no fake, functional or proxy wrappers)
    on a device that `executes_eagerly`; any dtype.
    """
    if torch.jit.is_tracing() or not shortcuts_allowed():
        return False
    return all(type(t) in (torch.Tensor, nn.Parameter) and executes_eagerly(t.device.type)
               for t in tensors if t is not None)


def keeps_eager_constants(like: Tensor) -> bool:
    """Whether a constant made from shapes only (a rotary table) for `like`'s dtype and device may be kept and
    handed out again by later calls, instead of being made afresh each time.

    Stricter than `eager_untraced`: a kept tensor outlives the call, so besides traces and lazy devices it must
    not meet a dispatch mode (FakeTensorMode, `make_fx`), which would mix a kept real tensor with its own
    tensors, and it is kept only on CPU and CUDA, the devices this is tested on.
    """
    return (eager_untraced(like) and like.device.type in ("cpu", "cuda")
            and _get_current_dispatch_mode() is None)
