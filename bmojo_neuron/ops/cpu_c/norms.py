"""The ops `rms_norm` and `gated_rms_norm` in C (`norms.c`), forward and backward, on float32 CPU tensors.

Same math as the torch implementations (`ops.reference.elementwise`, whose eager-CPU form is
`elementwise_fused`'s row-sliced Functions), one row at a time in C: the forward saves
one inverse RMS per row (and group), the backward recomputes the rest. Where the C kernels
cannot run (`common.c_unavailable`; no gate for the gated norm) the torch implementation
runs, with one warning per reason.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..reference import elementwise as reference
from . import build, common

__all__ = ["CGatedRMSNorm", "CRMSNorm", "gated_rms_norm", "rms_norm"]

P, LONG, FLOAT, INT = build.FLOAT_P, build.LONG, build.FLOAT, build.INT
# norms.c's parameters: pointers, sizes, eps (forwards only), the thread count.
_RMS_FORWARD = [P] * 4 + [LONG] * 2 + [FLOAT, INT]
_RMS_BACKWARD = [P] * 6 + [LONG] * 2 + [INT]
_GATED_FORWARD = [P] * 5 + [LONG] * 3 + [FLOAT, INT]
_GATED_BACKWARD = [P] * 8 + [LONG] * 3 + [INT]


def _check(status: int, name: str) -> None:
    if status:
        raise MemoryError(f"{name}: out of memory for its scratch buffers")


def _rms_forward(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    n, dim = x.shape
    out, inv_rms = torch.empty_like(x), x.new_empty(n)
    build.function("norms_rms_forward", _RMS_FORWARD)(
        x.data_ptr(), weight.data_ptr(), out.data_ptr(), inv_rms.data_ptr(), n, dim, eps, common.threads())
    return out, inv_rms


class CRMSNorm(torch.autograd.Function):
    """``x / rms(x) * weight`` over rows: x (n, dim), weight (dim,), contiguous float32."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        out, inv_rms = _rms_forward(x, weight, eps)
        ctx.save_for_backward(x, weight, inv_rms)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, inv_rms = ctx.saved_tensors
        grad = grad.contiguous()
        dx, d_weight = torch.empty_like(x), torch.empty_like(weight)
        _check(build.function("norms_rms_backward", _RMS_BACKWARD)(
            x.data_ptr(), weight.data_ptr(), inv_rms.data_ptr(), grad.data_ptr(), dx.data_ptr(),
            d_weight.data_ptr(), *x.shape, common.threads()), "norms_rms_backward")
        return dx, d_weight, None


def _gated_forward(x: Tensor, z: Tensor, weight: Tensor, groups: int, eps: float) -> tuple[Tensor, Tensor]:
    n, dim = x.shape
    out, inv_rms = torch.empty_like(x), x.new_empty(n, groups)
    build.function("norms_gated_forward", _GATED_FORWARD)(
        x.data_ptr(), z.data_ptr(), weight.data_ptr(), out.data_ptr(), inv_rms.data_ptr(), n, groups,
        dim // groups, eps, common.threads())
    return out, inv_rms


class CGatedRMSNorm(torch.autograd.Function):
    """``rmsnorm_per_group(x * silu(z)) * weight`` over rows: x, z (n, dim), weight (dim,), contiguous
    float32, `groups` groups of ``dim // groups`` channels."""

    @staticmethod
    def forward(ctx, x: Tensor, z: Tensor, weight: Tensor, groups: int, eps: float) -> Tensor:
        out, inv_rms = _gated_forward(x, z, weight, groups, eps)
        ctx.save_for_backward(x, z, weight, inv_rms)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, z, weight, inv_rms = ctx.saved_tensors
        n, dim = x.shape
        groups = inv_rms.shape[1]
        grad = grad.contiguous()
        dx, dz, d_weight = torch.empty_like(x), torch.empty_like(z), torch.empty_like(weight)
        _check(build.function("norms_gated_backward", _GATED_BACKWARD)(
            x.data_ptr(), z.data_ptr(), weight.data_ptr(), inv_rms.data_ptr(), grad.data_ptr(), dx.data_ptr(),
            dz.data_ptr(), d_weight.data_ptr(), n, groups, dim // groups, common.threads()), "norms_gated_backward")
        return dx, dz, d_weight, None, None


def _shape_problem(x: Tensor, z: Tensor | None, weight: Tensor, group_size: int) -> str:
    """Why the C kernels would misread these shapes ("" when they fit); the torch path then raises its error."""
    dim = x.shape[-1] if x.dim() else 0
    if weight.shape != (dim,) or (z is not None and z.shape != x.shape) or group_size < 1 or dim % group_size:
        return "shapes that do not fit the norm (the torch path names the problem)"
    return ""


def _needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """The `rms_norm` op (signature of `ops.reference.elementwise.rms_norm`) in C where it can run."""
    reason = common.c_unavailable(x, weight) or _shape_problem(x, None, weight, 1)
    if reason:
        common.warn_once("rms_norm", reason)
        return reference.rms_norm(x, weight, eps)
    shape = x.shape
    rows, weight = x.reshape(-1, shape[-1]).contiguous(), weight.contiguous()
    if _needs_grad(x, weight):
        return CRMSNorm.apply(rows, weight, eps).view(shape)
    return _rms_forward(rows, weight, eps)[0].view(shape)


def gated_rms_norm(x: Tensor, z: Tensor | None, weight: Tensor, group_size: int, eps: float) -> Tensor:
    """The `gated_rms_norm` op (signature of `ops.reference.elementwise.gated_rms_norm`) in C where it can run."""
    reason = "no gate (z is None)" if z is None else common.c_unavailable(x, z, weight)
    reason = reason or _shape_problem(x, z, weight, group_size)
    if reason:
        common.warn_once("gated_rms_norm", reason)
        return reference.gated_rms_norm(x, z, weight, group_size, eps)
    shape = x.shape
    groups = shape[-1] // group_size
    rows_x, rows_z = x.reshape(-1, shape[-1]).contiguous(), z.reshape(-1, shape[-1]).contiguous()
    weight = weight.contiguous()
    if _needs_grad(x, z, weight):
        return CGatedRMSNorm.apply(rows_x, rows_z, weight, groups, eps).view(shape)
    return _gated_forward(rows_x, rows_z, weight, groups, eps)[0].view(shape)
