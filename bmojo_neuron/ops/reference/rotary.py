"""The rotary op: rotate-half RoPE of `x` by given cos/sin tables (`layers.rope` makes the tables).

    rotary(x, cos, sin) = x * cos + rotate_half(x) * sin,  rotate_half(x) = [-x_b, x_a]

with ``x_a``, ``x_b`` the two halves of the last axis; `cos` and `sin` broadcast to `x`
(the model's: (L, head_dim) against (batch, heads, L, head_dim)). On eager CPU tensors it
runs as `_Rotary` (no concatenated copy, no saved input, a three-op backward, where
autograd records five ops and their backward); elsewhere (traced graphs, CUDA) as the
plain expression. Same products and sums either way.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .eager_cpu import fused_kernel_available

__all__ = ["rotary"]


def rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate `x` (..., L, head_dim) by tables broadcastable to it; see the module docstring."""
    if (not cos.requires_grad and not sin.requires_grad and fused_kernel_available(x, cos, sin)
            and torch.broadcast_shapes(x.shape, cos.shape, sin.shape) == x.shape):
        return _Rotary.apply(x, cos, sin)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class _Rotary(torch.autograd.Function):
    """``x cos + rotate_half(x) sin`` with rotate_half(x) = [-x_b, x_a]: out_a = x_a cos_a - x_b sin_a,
    out_b = x_b cos_b + x_a sin_b; the backward is the transposed rotation of the gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        half = x.shape[-1] // 2
        # Products rounded, then added, as the plain expression does (no fused multiply-add), so the
        # rotation is bit for bit the decode path's (`layers.rope.apply_rotary_rolled`).
        out = x * cos
        out[..., :half] -= x[..., half:] * sin[..., :half]
        out[..., half:] += x[..., :half] * sin[..., half:]
        ctx.save_for_backward(cos, sin)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        cos, sin = ctx.saved_tensors
        half = grad.shape[-1] // 2
        d_x = grad * cos
        d_x[..., :half].addcmul_(grad[..., half:], sin[..., half:])
        d_x[..., half:].addcmul_(grad[..., :half], sin[..., :half], value=-1)
        return d_x, None, None
