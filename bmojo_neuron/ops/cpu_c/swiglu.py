"""The op `swiglu_product`, SwiGLU's ``silu(gate) * up``, in C (`swiglu.c`), forward and backward, on float32
CPU tensors.

One pass each way; the backward recomputes ``sigmoid(gate)`` from the two saved inputs, so
nothing else is kept for it (autograd's plain form also keeps ``silu(gate)``). Where the
C kernels cannot run (`common.c_unavailable`, or two shapes that would broadcast) the
torch implementation runs, with one warning per reason.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..reference import elementwise as reference
from . import build, common

__all__ = ["CSwiGLUProduct", "swiglu_product"]

P, LONG, INT = build.FLOAT_P, build.LONG, build.INT
_FORWARD = [P] * 3 + [LONG, INT]
_BACKWARD = [P] * 5 + [LONG, INT]


def _forward(gate: Tensor, up: Tensor) -> Tensor:
    out = torch.empty_like(gate)
    build.function("swiglu_forward", _FORWARD)(gate.data_ptr(), up.data_ptr(), out.data_ptr(), gate.numel(),
                                               common.threads())
    return out


class CSwiGLUProduct(torch.autograd.Function):
    """``silu(gate) * up`` element by element: gate, up contiguous float32 of one shape."""

    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor) -> Tensor:
        ctx.save_for_backward(gate, up)
        return _forward(gate, up)

    @staticmethod
    def backward(ctx, grad: Tensor):
        gate, up = ctx.saved_tensors
        grad = grad.contiguous()
        d_gate, d_up = torch.empty_like(gate), torch.empty_like(up)
        build.function("swiglu_backward", _BACKWARD)(gate.data_ptr(), up.data_ptr(), grad.data_ptr(),
                                                     d_gate.data_ptr(), d_up.data_ptr(), gate.numel(),
                                                     common.threads())
        return d_gate, d_up


def swiglu_product(gate: Tensor, up: Tensor) -> Tensor:
    """The `swiglu_product` op (signature of `ops.reference.elementwise.swiglu_product`) in C where it can run."""
    reason = common.c_unavailable(gate, up)
    if not reason and gate.shape != up.shape:
        reason = "gate and up of different shapes (broadcasting)"
    if reason:
        common.warn_once("swiglu_product", reason)
        return reference.swiglu_product(gate, up)
    gate, up = gate.contiguous(), up.contiguous()
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return CSwiGLUProduct.apply(gate, up)
    return _forward(gate, up)
