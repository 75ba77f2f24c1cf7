"""Rotary position embeddings (RoPE), rotate-half convention."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RotaryEmbedding(nn.Module):
    """Produces cos/sin tables for arbitrary integer positions.

    The frequencies are recomputed per call (head_dim / 2 numbers) rather than kept in a
    buffer: a non-persistent buffer is not restored by `from_pretrained`'s meta-device load.
    """

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, sin of shape ``positions.shape + (head_dim,)``.

        Computed in float32 (Trainium has no float64), or float64 for a float64 model.
        """
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        exponent = torch.arange(0, self.head_dim, 2, dtype=compute, device=positions.device) / self.head_dim
        freqs = positions.to(compute)[..., None] / self.theta**exponent
        angles = torch.cat([freqs, freqs], dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate `x` (..., L, head_dim) by tables broadcastable to it."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
