"""SwiGLU feed-forward block."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .factory import get_layer_factory


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``; gate/up column-parallel, down row-parallel."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        layers = get_layer_factory()
        self.gate_proj = layers.column_linear(hidden_size, intermediate_size)
        self.up_proj = layers.column_linear(hidden_size, intermediate_size)
        self.down_proj = layers.row_linear(intermediate_size, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
