"""Decode-time state of one SSM mixer.

A mixer's recurrent memory is the last ``conv_kernel - 1`` inputs of each causal
depthwise conv (``conv_states[name]``: (batch, channels, conv_kernel - 1), oldest
first; Mamba-1 has ``"x"``, Mamba-2 one ``"xbc"`` for both its convs, x's channels
first) plus the SSM state (Mamba-1: (batch, d_inner, N); Mamba-2: (batch, H, P, N)),
kept in fp32 or wider. Its size does not grow with the sequence, which is the point
of the fading memory. The conv functions define what the conv state holds, so both
mixers share them: the whole-sequence convs (`ops.reference.causal_conv`, re-exported
here; Mamba-2 calls its time-major one through the ops' dispatch point,
`ops.causal_conv1d_rows`) and the decode step below, which always runs in torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..ops.reference.causal_conv import causal_conv1d, causal_conv1d_rows

__all__ = ["SSMState", "causal_conv1d", "causal_conv1d_rows", "causal_conv1d_step", "depthwise_conv"]


@dataclass
class SSMState:
    """Conv windows, SSM state and the number of tokens already folded in.

    A decode step writes the new states into the tensors it holds (the same tensors,
    same strides, from step to step: what lets `torch.compile` run the step as one
    graph without recompiling); a prefill replaces them. The token count is a 0-d
    tensor for the same reason (a Python int would be a constant of the graph);
    `seen_tokens` reads it as an int.
    """

    conv_states: dict[str, Tensor] = field(default_factory=dict)
    ssm_state: Tensor | None = None
    counter: Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.long))

    @property
    def seen_tokens(self) -> int:
        return int(self.counter)

    @seen_tokens.setter
    def seen_tokens(self, value: int) -> None:
        self.counter.fill_(value)

    @property
    def batch_size(self) -> int:
        return self.ssm_state.shape[0] if self.ssm_state is not None else 0

    def store_step(self, name: str, conv_state: Tensor, ssm_state: Tensor) -> None:
        """Write one decode step's new conv state `name` and SSM state into the held tensors; count the token."""
        self.conv_states[name].copy_(conv_state)
        self.ssm_state.copy_(ssm_state)
        self.counter.add_(1)

    def reorder(self, index: torch.LongTensor) -> SSMState:
        """Select/permute batch rows in place (beam search); returns self."""
        self.conv_states = {
            name: t.index_select(0, index.to(t.device)) for name, t in self.conv_states.items()
        }
        if self.ssm_state is not None:
            self.ssm_state = self.ssm_state.index_select(0, index.to(self.ssm_state.device))
        return self

    def copy(self) -> SSMState:
        """A state that decodes independently of this one (decoding writes into the tensors: they are cloned)."""
        ssm = None if self.ssm_state is None else self.ssm_state.clone()
        return SSMState({name: t.clone() for name, t in self.conv_states.items()}, ssm, self.counter.clone())

    def reset(self) -> SSMState:
        """Zero everything in place and forget all tokens; returns self."""
        self.conv_states = {name: torch.zeros_like(t) for name, t in self.conv_states.items()}
        if self.ssm_state is not None:
            self.ssm_state = torch.zeros_like(self.ssm_state)
        self.counter = torch.zeros_like(self.counter)
        return self


def causal_conv1d_step(x: Tensor, weight: Tensor, bias: Tensor | None, conv_state: Tensor) -> tuple[Tensor, Tensor]:
    """One token of `causal_conv1d`: x (batch, channels) -> (out (batch, channels), new conv state).

    `weight` is the conv's (channels, 1, K) or already (channels, K).
    """
    if conv_state.dtype != x.dtype:
        conv_state = conv_state.to(x.dtype)
    window = torch.cat([conv_state, x.unsqueeze(-1)], dim=-1)  # (batch, channels, K)
    # K products per channel: cheaper than einsum's batched matmul. Method calls, not indexing
    # syntax: at one token per step Python's slice handling costs as much as the op.
    out = (window * (weight.squeeze(1) if weight.dim() == 3 else weight)).sum(-1)
    if bias is not None:
        out = out.add_(bias)  # a fresh tensor: added in place, no second allocation
    return out, window.narrow(-1, 1, window.shape[-1] - 1)


def depthwise_conv(channels: int, kernel: int, bias: bool) -> nn.Conv1d:
    """The weights of a causal depthwise conv; `causal_conv1d` does the left padding (zeros or a state)."""
    return nn.Conv1d(channels, channels, kernel, groups=channels, bias=bias)
