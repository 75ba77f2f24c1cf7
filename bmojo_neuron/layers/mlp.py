"""SwiGLU feed-forward block."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from .decode_pack import plain_linears
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
        return self.down_proj(ops.swiglu_product(self.gate_proj(x), self.up_proj(x)))

    def rows(self, x: Tensor) -> Tensor:
        """`forward` for the decode step: plain linears as their weight products, without module calls (at one
        token per step a module call costs as much as its product)."""
        gate, up, down = self.gate_proj, self.up_proj, self.down_proj
        if not plain_linears(gate, up, down):
            return self.forward(x)
        return F.linear(ops.swiglu_product(F.linear(x, gate.weight, gate.bias), F.linear(x, up.weight, up.bias)),
                        down.weight, down.bias)
