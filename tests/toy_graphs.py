"""A one-weight model whose exported graph the static-shape and compiler checks are tried on.

`Scaled(reduce)` multiplies its input by a parameter and ends with `reduce`, so a test
puts the one op it means to check (a boolean-mask gather, a Python branch on a value, an
integer sort) in `reduce` and gets a loss with a backward around it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class Scaled(nn.Module):
    """A parameter times the input, then `reduce`: the loss of a one-weight model."""

    def __init__(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(4, 8))
        self.reduce = reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduce(self.weight * x)
