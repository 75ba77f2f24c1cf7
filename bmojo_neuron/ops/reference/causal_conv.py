"""Causal depthwise conv over time, continuing from a prefix: the torch implementation of the
`causal_conv1d_rows` op (Mamba-2's convs, with their SiLU) and its channel-major form (Mamba-1's conv).

The prefix is the previous ``K - 1`` inputs of each channel (the mixers' conv state,
`layers.ssm_state.SSMState.conv_states`), zeros at the start of a sequence; each
function also returns the last ``K - 1`` inputs, the state to continue from. A decode
step (one token against the held state) is `layers.ssm_state.causal_conv1d_step`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .eager_cpu import fused_kernel_available
from .elementwise_fused import conv_rows

__all__ = ["causal_conv1d", "causal_conv1d_rows"]


def causal_conv1d(
    x: Tensor, weight: Tensor, bias: Tensor | None, prefix: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Causal depthwise conv over time, continuing from ``prefix``; also returns the new conv state.

    x: (batch, channels, L); weight: (channels, 1, K) (an ``nn.Conv1d(groups=channels)``
    weight); prefix: the previous ``K - 1`` inputs (batch, channels, K - 1), zeros if None.
    Returns ``(out (batch, channels, L), last K - 1 inputs (batch, channels, K - 1))``;
    for prompts shorter than ``K - 1`` the state keeps older prefix entries (zeros).
    """
    width = weight.shape[-1] - 1
    if prefix is None:
        prefix = x.new_zeros(x.shape[0], x.shape[1], width)
    padded = torch.cat([prefix.to(x.dtype), x], dim=-1)
    out = F.conv1d(padded, weight, bias, groups=x.shape[1])
    return out, padded[..., padded.shape[-1] - width :].clone()  # own copy: a state must not hold the whole input


def causal_conv1d_rows(
    x: Tensor, weight: Tensor, bias: Tensor | None, prefix: Tensor | None = None, silu: bool = False
) -> tuple[Tensor, Tensor]:
    """`causal_conv1d` on time-major input: x (batch, L, channels) -> out (batch, L, channels).

    Same weights, prefix and returned state layout (batch, channels, K - 1) as
    `causal_conv1d`; with `silu` the output is ``silu(conv)``. On eager CPU tensors
    (`fused_kernel_available`) it runs as ``K`` shifted multiply-adds over the time-major
    rows, a slice of time at a time and with the SiLU applied in the same pass
    (`elementwise_fused.conv_rows`), with no transposes around it; CPU's depthwise
    ``conv1d`` wants channels before time and its backward is ~10x its forward.
    Elsewhere (traced graphs, CUDA) it is `causal_conv1d` between two transposes, then
    `F.silu`.
    """
    if not fused_kernel_available(x, weight, bias, prefix):
        out, tail = causal_conv1d(x.transpose(1, 2), weight, bias, prefix)
        out = out.transpose(1, 2)
        return (F.silu(out) if silu else out), tail
    width = weight.shape[-1] - 1
    if prefix is None:
        prefix = x.new_zeros(x.shape[0], x.shape[2], width)
    padded = torch.cat([prefix.to(x.dtype).transpose(1, 2), x], dim=1)  # (batch, K - 1 + L, channels)
    out = conv_rows(padded, weight.reshape(weight.shape[0], -1), bias, silu)
    return out, padded[:, padded.shape[1] - width :].transpose(1, 2).clone()
