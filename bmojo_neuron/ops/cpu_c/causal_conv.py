"""`causal_conv1d_rows` (Mamba-2's causal depthwise conv with its SiLU) in C (`causal_conv.c`), forward and
backward, on float32 CPU tensors.

The op is the reference `ops.reference.causal_conv.causal_conv1d_rows` with its eager-CPU
Function (`elementwise_fused._ConvRows`) swapped for `CCausalConv`: the same taps, bias and
SiLU, each row of channels done in one pass in C, the history read from the conv state
(`head`) instead of from a copy of the input with the state prepended. The returned conv
state (the last K - 1 inputs) is taken in torch, as the reference takes it. Where C cannot
run (no compiler, a failed build, ``BMOJO_CPU_C=0``, tensors that are not float32, inputs
that are not eager CPU tensors or under tracing) the reference runs, with one warning per reason.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..reference import causal_conv as reference
from ..reference.eager_cpu import fused_kernel_available
from . import build, common

__all__ = ["CCausalConv", "c_conv_unavailable", "causal_conv1d_rows"]

OP = "causal_conv1d_rows"

# causal_conv.c's parameters: pointers, then the sizes (batch, L, C, K), the SiLU flag, the thread count.
_FORWARD_ARGS = [build.FLOAT_P] * 5 + [build.LONG] * 4 + [build.INT, build.INT]
_BACKWARD_ARGS = [build.FLOAT_P] * 9 + [build.LONG] * 4 + [build.INT, build.INT]


def _check(status: int, name: str) -> None:
    if status == -1:
        raise MemoryError(f"{name}: out of memory for its scratch buffers")
    if status:
        raise ValueError(f"{name}: sizes the kernel cannot take (status {status})")


class CCausalConv(torch.autograd.Function):
    """``silu(bias + sum_k weight[:, k] * xin[t - K + 1 + k])`` (no SiLU unless `silu`) over time-major rows, in C.

    x (batch, L, C); head (batch, K - 1, C), the inputs before x[:, 0]; weight (C, K); bias (C,)
    or None; all contiguous float32. Returns (batch, L, C). Saves the inputs only: the backward
    recomputes the pre-activation.
    """

    @staticmethod
    def forward(ctx, x: Tensor, head: Tensor, weight: Tensor, bias: Tensor | None, silu: bool) -> Tensor:
        batch, length, channels = x.shape
        out = torch.empty_like(x)
        _check(build.function("causal_conv_forward", _FORWARD_ARGS)(
            *map(common.ptr, (x, head, weight, bias, out)), batch, length, channels, weight.shape[1], int(silu),
            common.threads()), "causal_conv_forward")
        ctx.save_for_backward(x, head, weight, bias)
        ctx.silu = silu
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, head, weight, bias = ctx.saved_tensors
        batch, length, channels = x.shape
        dx, dw = torch.empty_like(x), torch.empty_like(weight)
        d_head = torch.empty_like(head) if ctx.needs_input_grad[1] else None
        d_bias = None if bias is None else torch.empty_like(bias)
        # Bound to a name: a copy made inside the argument tuple below is freed once its address is taken,
        # before C reads it (an expanded gradient, such as that of a sum, is such a copy).
        grad = grad.contiguous()
        _check(build.function("causal_conv_backward", _BACKWARD_ARGS)(
            *map(common.ptr, (x, head, weight, bias, grad, dx, d_head, dw, d_bias)), batch, length, channels,
            weight.shape[1], int(ctx.silu), common.threads()), "causal_conv_backward")
        return dx, d_head, dw, d_bias, None


def c_conv_unavailable(x: Tensor, weight: Tensor, bias: Tensor | None, prefix: Tensor | None) -> str:
    """Why the C conv cannot run on these inputs ("" when it can)."""
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != torch.float32:
            return f"{str(t.dtype).removeprefix('torch.')} {name} (the C kernels take float32)"
    if not fused_kernel_available(x, weight, bias, prefix):
        return "inputs that are not eager CPU tensors (another device, tracing or fused_kernels_disabled)"
    loaded = build.load()
    return "" if loaded.library is not None else loaded.reason


def _check_shapes(x: Tensor, weight: Tensor, bias: Tensor | None, prefix: Tensor | None) -> None:
    """The C code reads raw buffers: sizes that do not fit each other are refused before it runs."""
    if x.dim() != 3:
        raise ValueError(f"causal_conv1d_rows: x must be (batch, L, channels), got shape {tuple(x.shape)}")
    channels = x.shape[2]
    if weight.dim() not in (2, 3) or weight.shape[0] != channels or weight.numel() != channels * weight.shape[-1]:
        raise ValueError(f"causal_conv1d_rows: weight must be ({channels}, 1, K) or ({channels}, K) for x's "
                         f"{channels} channels, got shape {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (channels,):
        raise ValueError(f"causal_conv1d_rows: bias must be ({channels},), got shape {tuple(bias.shape)}")
    want = (x.shape[0], channels, weight.shape[-1] - 1)
    if prefix is not None and tuple(prefix.shape) != want:
        raise ValueError(f"causal_conv1d_rows: prefix (the conv state) must be {want}, got shape "
                         f"{tuple(prefix.shape)}")


def causal_conv1d_rows(x: Tensor, weight: Tensor, bias: Tensor | None, prefix: Tensor | None = None,
                       silu: bool = False) -> tuple[Tensor, Tensor]:
    """The `causal_conv1d_rows` op (reference signature and layouts) in C where it can run.

    x (batch, L, channels); weight (channels, 1, K); bias (channels,) or None; prefix, the conv
    state, (batch, channels, K - 1) or None for zeros. Returns ``(out (batch, L, channels), the
    last K - 1 inputs (batch, channels, K - 1))``.
    """
    reason = c_conv_unavailable(x, weight, bias, prefix)
    if reason:
        common.warn_once(OP, reason)
        return reference.causal_conv1d_rows(x, weight, bias, prefix, silu)
    _check_shapes(x, weight, bias, prefix)
    batch, length, channels = x.shape
    width = weight.shape[-1] - 1
    if prefix is None:
        head = x.new_zeros(batch, width, channels)
    else:
        head = prefix.to(x.dtype).transpose(1, 2).contiguous()
    out = CCausalConv.apply(x.contiguous(), head, weight.reshape(channels, width + 1).contiguous(),
                            None if bias is None else bias.contiguous(), silu)
    # The last K - 1 inputs, as the reference takes them from its padded copy (the same layout).
    history = x if length >= width else torch.cat([head, x], dim=1)
    return out, history[:, history.shape[1] - width:].transpose(1, 2).clone()
