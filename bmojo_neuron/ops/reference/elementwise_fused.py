"""The layers' norm and conv chains as row-sliced autograd Functions (eager CPU).

Three chains run over every token of a layer and are pure element-wise work (plus a
per-row reduction): the RMS norms (``x / rms(x) * w``: the layers' pre-norms, a `B`
layer's norm of the SSM output), Mamba-2's gated output norm
``rmsnorm_per_group(x * silu(z)) * w``, and the causal depthwise conv with its SiLU
(`reference.causal_conv.causal_conv1d_rows`). Under plain autograd each is 3-8 ops, each of
which reads and writes whole ``(tokens, width)`` tensors and saves some of them for the
backward. Once those tensors outgrow the CPU caches (a 16K-token sequence at width 512
is 32 MiB per tensor, the size of this machine's L3) every op streams them from memory,
and the chain's time per token grows with the length: measured on one thread, the plain
gated norm's forward + backward took 250-290 ms at (1, 16K, 512) against 27-42 ms at
(4, 1K, 512), 1.6-2.6x the time per token (docs/ops.md).

Here each chain runs ``SLICE_BYTES`` of rows at a time, forward and backward, so a
slice's intermediates stay in cache while the whole chain runs over it; the backward is
written out (the same derivatives autograd takes) and recomputes what it needs from the
saved inputs instead of saving intermediates. Outputs match the plain expressions to
float32 round-off (`tests/test_elementwise_fused.py` checks them against the layers'
own formulas and with gradcheck in float64).

Used only where `fused_kernel_available` holds (eager CPU float32/float64, not tracing):
traced graphs (Neuron/XLA) and CUDA run the plain expressions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["SLICE_BYTES", "conv_rows", "gated_rms_norm", "rms_norm", "rows_per_slice"]

# Bytes of one operand's slice: small enough that a slice's handful of temporaries stay in a
# core's L2/L3 share, large enough that the per-slice op dispatch stays a few percent
# (measured: 128 KiB to 512 KiB all halve the gated norm at 16K tokens; 256 KiB is no
# slower than the plain ops at 4 x 1K tokens, 128 KiB is, for the conv).
SLICE_BYTES = 1 << 18


def rows_per_slice(row_bytes: int) -> int:
    """Rows of `row_bytes` bytes each in one slice (at least one)."""
    return max(1, SLICE_BYTES // max(1, row_bytes))


_silu_backward = torch.ops.aten.silu_backward  # grad * d silu(x) / dx in one pass, as autograd's SiLU uses


def _spans(n: int, rows: int) -> range:
    return range(0, n, rows)


# ----------------------------------------------------------------------------- gated norm
class _GatedRMSNorm(torch.autograd.Function):
    """``rmsnorm_per_group(x * silu(z)) * weight`` over rows (n, groups, group_size)."""

    @staticmethod
    def forward(ctx, x: Tensor, z: Tensor, weight: Tensor, eps: float) -> Tensor:
        n, groups, size = x.shape
        w = weight.view(groups, size)
        out = x.new_empty(x.shape)
        inv_rms = x.new_empty(n, groups, 1)
        rows = rows_per_slice(groups * size * x.element_size())
        for i in _spans(n, rows):
            h = F.silu(z[i:i + rows]).mul_(x[i:i + rows])
            r = torch.rsqrt(h.square().mean(-1, keepdim=True).add_(eps))
            inv_rms[i:i + rows] = r
            torch.mul(h.mul_(r), w, out=out[i:i + rows])
        ctx.save_for_backward(x, z, weight, inv_rms)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, z, weight, inv_rms = ctx.saved_tensors
        n, groups, size = x.shape
        w = weight.view(groups, size)
        dx, dz = torch.empty_like(x), torch.empty_like(z)
        d_weight = torch.zeros_like(w)
        rows = rows_per_slice(groups * size * x.element_size())
        for i in _spans(n, rows):
            xs, g, r = x[i:i + rows], grad[i:i + rows], inv_rms[i:i + rows]
            zs = z[i:i + rows]
            gate = F.silu(zs)
            normed = (gate * xs).mul_(r)  # h / rms(h)
            d_weight += (g * normed).sum(0)
            d_normed = g * w
            # d/dh of h / rms(h): (d_normed - normed * mean(d_normed * normed)) / rms(h)
            d_h = d_normed.sub_(normed.mul_((d_normed * normed).mean(-1, keepdim=True))).mul_(r)
            torch.mul(d_h, gate, out=dx[i:i + rows])
            dz[i:i + rows] = _silu_backward(d_h.mul_(xs), zs)
        return dx, dz, d_weight.view(weight.shape), None


def gated_rms_norm(x: Tensor, z: Tensor, weight: Tensor, group_size: int, eps: float) -> Tensor:
    """`GatedRMSNorm`'s forward, ``rmsnorm_per_group(x * silu(z)) * weight``, on x, z (..., dim) and weight (dim,)."""
    shape = x.shape
    grouped = (-1, shape[-1] // group_size, group_size)
    out = _GatedRMSNorm.apply(x.reshape(grouped), z.reshape(grouped), weight, eps)
    return out.view(shape)


# ----------------------------------------------------------------------------- plain norm
class _RMSNorm(torch.autograd.Function):
    """``x / rms(x) * weight`` over rows (n, dim)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        out = x.new_empty(x.shape)
        inv_rms = x.new_empty(x.shape[0], 1)
        rows = rows_per_slice(x.shape[1] * x.element_size())
        for i in _spans(x.shape[0], rows):
            xs = x[i:i + rows]
            r = torch.rsqrt(xs.square().mean(-1, keepdim=True).add_(eps))
            inv_rms[i:i + rows] = r
            torch.mul(xs * r, weight, out=out[i:i + rows])
        ctx.save_for_backward(x, weight, inv_rms)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, inv_rms = ctx.saved_tensors
        dx, d_weight = torch.empty_like(x), torch.zeros_like(weight)
        rows = rows_per_slice(x.shape[1] * x.element_size())
        for i in _spans(x.shape[0], rows):
            g, r = grad[i:i + rows], inv_rms[i:i + rows]
            normed = x[i:i + rows] * r
            d_weight += (g * normed).sum(0)
            d_normed = g * weight
            dx[i:i + rows] = d_normed.sub_(normed.mul_((d_normed * normed).mean(-1, keepdim=True))).mul_(r)
        return dx, d_weight, None


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """`RMSNorm`'s forward, ``x / rms(x) * weight``, on x (..., dim) and weight (dim,)."""
    shape = x.shape
    return _RMSNorm.apply(x.reshape(-1, shape[-1]), weight, eps).view(shape)


# ----------------------------------------------------------------------------- conv (+ SiLU)
def _conv_into(out: Tensor, padded: Tensor, weight: Tensor, bias: Tensor | None, start: int) -> Tensor:
    """``bias + sum_k w[:, k] * padded[:, start + t + k]`` for the ``out.shape[1]`` rows t of `out`, written there."""
    K, rows = weight.shape[1], out.shape[1]
    torch.mul(padded[:, start + K - 1:start + K - 1 + rows], weight[:, K - 1], out=out)
    for k in range(K - 1):
        out.addcmul_(padded[:, start + k:start + k + rows], weight[:, k])
    if bias is not None:
        out += bias
    return out


class _ConvRows(torch.autograd.Function):
    """``bias + sum_k w[:, k] * padded[:, t + k]`` over time-major rows (batch, K - 1 + L, channels), then
    the SiLU if `silu`.

    Time slices of all batch rows at once; with the SiLU the backward recomputes each
    slice's pre-activation from `padded` (K multiply-adds in cache) instead of saving it.
    """

    @staticmethod
    def forward(ctx, padded: Tensor, weight: Tensor, bias: Tensor | None, silu: bool) -> Tensor:
        batch, total, channels = padded.shape
        length = total - (weight.shape[1] - 1)
        out = padded.new_empty(batch, length, channels)
        rows = rows_per_slice(batch * channels * padded.element_size())
        for i in _spans(length, rows):
            pre = _conv_into(out[:, i:i + rows], padded, weight, bias, i)
            if silu:
                F.silu(pre, inplace=True)
        ctx.save_for_backward(padded, weight, bias)
        ctx.silu = silu
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        padded, weight, bias = ctx.saved_tensors
        batch, total, channels = padded.shape
        K = weight.shape[1]
        length = total - (K - 1)
        d_padded, d_weight = torch.zeros_like(padded), torch.zeros_like(weight)
        d_bias = None if bias is None else torch.zeros_like(bias)
        rows = rows_per_slice(batch * channels * padded.element_size())
        pre = padded.new_empty(batch, min(rows, length), channels) if ctx.silu else None
        for i in _spans(length, rows):
            r = min(rows, length - i)
            d_pre = grad[:, i:i + r]
            if ctx.silu:
                d_pre = _silu_backward(d_pre, _conv_into(pre[:, :r], padded, weight, bias, i))
            for k in range(K):
                d_padded[:, i + k:i + k + r].addcmul_(d_pre, weight[:, k])
                d_weight[:, k] += (d_pre * padded[:, i + k:i + k + r]).sum((0, 1))
            if d_bias is not None:
                d_bias += d_pre.sum((0, 1))
        return d_padded, d_weight, d_bias, None


def conv_rows(padded: Tensor, weight: Tensor, bias: Tensor | None, silu: bool = False) -> Tensor:
    """Causal depthwise conv of time-major rows, then ``silu`` if asked: padded (batch, K - 1 + L, channels)
    with its K - 1 leading rows of history, weight (channels, K), bias (channels,) or None -> (batch, L, channels)."""
    return _ConvRows.apply(padded, weight, bias, silu)
