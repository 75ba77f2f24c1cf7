"""The `rotary` op in C (`rotary.c`), forward and backward, on float32 CPU tensors.

Same numbers as the torch op (`ops.reference.rotary`): the forward bit for bit, the
backward within a rounding of each sum. What it changes is the layouts, in the same pass
as the rotation: the output is contiguous whatever the input's strides (the attention
op then reads queries and keys without its own contiguous copy), and the gradient is
written in the input's memory layout (the projection's view takes it without a copy),
where the torch path follows its operand's layout each time. Where the C kernel cannot
run (not float32, not eager CPU, tracing or `fused_kernels_disabled`, tables that vary
along more than the input's last axes, no compiler, a failed build, ``BMOJO_CPU_C=0``)
the torch op runs, with one warning per reason.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..reference import rotary as rotary_reference
from ..reference.eager_cpu import fused_kernel_available
from . import build, common

__all__ = ["CRotary", "rotary"]

# rotary.c's parameters: input and its 3 strides, output and its 3 strides, cos, sin, the sizes (n0, n1, rows,
# width), backward or not, the thread count.
_ARGS = [build.FLOAT_P, *[build.LONG] * 3, build.FLOAT_P, *[build.LONG] * 3, build.FLOAT_P, build.FLOAT_P,
         *[build.LONG] * 4, build.INT, build.INT]


def _rows_view(t: Tensor, table_dims: int) -> Tensor | None:
    """`t` as a (n0, n1, rows, D) view (no copy) whose last `table_dims` axes hold the tables' (rows, D);
    None where its strides allow no such view."""
    outer = t.shape[:t.dim() - table_dims]
    rows = math.prod(t.shape[t.dim() - table_dims:-1])
    lead = (1, 1, *outer)[-2:] if len(outer) <= 2 else (-1, outer[-1])
    try:
        return t.view(*lead, rows, t.shape[-1])
    except RuntimeError:
        return None


def _dense(t: Tensor) -> bool:
    """Whether `t` fills its memory without gaps or overlaps in some order of its axes (a permuted contiguous
    tensor), so that a tensor with its strides can be made."""
    order = sorted(range(t.dim()), key=lambda axis: -t.stride(axis))
    return t.permute(order).is_contiguous()


def _apply(source: Tensor, target: Tensor, cos: Tensor, sin: Tensor, transpose: bool) -> None:
    """Rotate every row of `source` into `target`, both (n0, n1, rows, D) views with a contiguous last axis."""
    n0, n1, rows, width = source.shape
    status = build.function("rotary_apply", _ARGS)(
        common.ptr(source), *source.stride()[:3], common.ptr(target), *target.stride()[:3], common.ptr(cos), common.ptr(sin),
        n0, n1, rows, width, int(transpose), common.threads())
    if status:
        raise ValueError(f"rotary_apply: the rotated axis must have an even width, got {width}")


class CRotary(torch.autograd.Function):
    """`rotary` in C; `cos`, `sin` are the (rows, D) tables, contiguous, of the last `table_dims` axes of x."""

    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin: Tensor, table_dims: int) -> Tensor:
        out = torch.empty(x.shape, dtype=x.dtype)
        _apply(_rows_view(x, table_dims), _rows_view(out, table_dims), cos, sin, transpose=False)
        ctx.save_for_backward(cos, sin)
        # The gradient goes back in x's memory layout: x is a view of a projection (transposed heads), whose own
        # backward then takes it without a copy.
        ctx.layout = (x.shape, x.stride()) if _dense(x) else None
        ctx.table_dims = table_dims
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        cos, sin = ctx.saved_tensors
        d_x = torch.empty(grad.shape, dtype=grad.dtype) if ctx.layout is None else torch.empty_strided(*ctx.layout)
        source = _rows_view(grad, ctx.table_dims)
        if source is None or source.stride(-1) != 1:
            source = _rows_view(grad.contiguous(), ctx.table_dims)
        _apply(source, _rows_view(d_x, ctx.table_dims), cos, sin, transpose=True)
        return d_x, None, None, None


def _tables(x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, int]:
    """cos and sin as contiguous (rows, D) tables over x's last k axes, and k: the axes along which a table
    varies, at least the last two (the kernel shares one table between all the axes before them)."""
    k = min(2, x.dim())
    for table in (cos, sin):
        varying = [i for i, size in enumerate(reversed(table.shape)) if size != 1]
        k = max(k, max(varying, default=0) + 1)
    trailing = x.shape[x.dim() - k:]

    def rows(table: Tensor) -> Tensor:
        return table.reshape(table.shape[max(0, table.dim() - k):]).expand(trailing).contiguous().view(-1, x.shape[-1])

    return rows(cos), rows(sin), k


def _c_unavailable(x: Tensor, cos: Tensor, sin: Tensor) -> str:
    """Why the C kernel cannot rotate `x` by these tables ("" when it can)."""
    if cos.requires_grad or sin.requires_grad:
        return "tables that require a gradient"
    if not fused_kernel_available(x, cos, sin):
        return "inputs that are not eager CPU tensors (another device, tracing or fused_kernels_disabled)"
    if not (x.dtype == cos.dtype == sin.dtype):
        return "tables of another dtype than the input"
    if torch.broadcast_shapes(x.shape, cos.shape, sin.shape) != x.shape or x.shape[-1] % 2 or x.stride(-1) != 1:
        return "tables that do not broadcast to the input, an odd width or a strided last axis"
    return common.c_unavailable(x)


def rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The `rotary` op (reference signature) in C where it can run, else the torch op."""
    reason = _c_unavailable(x, cos, sin)
    if not reason:
        cos_rows, sin_rows, table_dims = _tables(x, cos, sin)
        if _rows_view(x, table_dims) is not None:
            return CRotary.apply(x, cos_rows, sin_rows, table_dims)
        reason = "an input whose leading axes the kernel cannot walk with one stride each"
    common.warn_once("rotary", reason)
    return rotary_reference.rotary(x, cos, sin)
