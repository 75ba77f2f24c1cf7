"""RMS norms used by the SSM mixers (and the model).

`GatedRMSNorm` is Mamba-2's output norm with ``norm_before_gate=False``: the gate
``silu(z)`` is applied first, then each group of ``group_size`` channels is normalised
on its own. Grouping by the SSM's ``n_groups`` makes the result independent of how
many tensor-parallel ranks the channels are split over (each rank holds whole groups).
The modules hold the weights; the norms themselves are the ops `ops.rms_norm` and
`ops.gated_rms_norm`, so an ops backend can run them (docs/ops.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..ops.reference.elementwise import rms_normalize

__all__ = ["GatedRMSNorm", "RMSNorm", "norm_rows", "rms_normalize"]

_WIDE = (torch.float32, torch.float64)


def norm_rows(norm: nn.Module, x: Tensor) -> Tensor:
    """`norm(x)` for the decode step: `RMSNorm.rows` for an `RMSNorm`, else the module's own call."""
    return norm.rows(x) if type(norm) is RMSNorm else norm(x)


class RMSNorm(nn.Module):
    """``y = x / rms(x) * weight`` over the last dim, computed in fp32 (bf16-safe)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        """Weight = 1 (idempotent; safe under ``torch.no_grad()``)."""
        with torch.no_grad():
            self.weight.fill_(1.0)

    def forward(self, x: Tensor) -> Tensor:
        return ops.rms_norm(x, self.weight, self.eps)

    def rows(self, x: Tensor) -> Tensor:
        """`forward` for the decode step: one fused `F.rms_norm` where x and the weight are both fp32 or fp64
        (the same products and sums as `forward`), else `forward`. No module call: at one token per step its
        overhead costs more than the norm."""
        if x.dtype == self.weight.dtype and x.dtype in _WIDE:
            return F.rms_norm(x, (self.dim,), self.weight, self.eps)
        return self.forward(x)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


class GatedRMSNorm(nn.Module):
    """``y = rmsnorm_per_group(x * silu(z)) * weight``, groups of ``group_size`` channels."""

    def __init__(self, dim: int, group_size: int | None = None, eps: float = 1e-5) -> None:
        super().__init__()
        group_size = dim if group_size is None else group_size
        if group_size < 1 or dim % group_size:
            raise ValueError(f"GatedRMSNorm: group_size ({group_size}) must divide dim ({dim})")
        self.dim = dim
        self.group_size = group_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        """Weight = 1 (idempotent; safe under ``torch.no_grad()``)."""
        with torch.no_grad():
            self.weight.fill_(1.0)

    def forward(self, x: Tensor, z: Tensor | None = None) -> Tensor:
        return ops.gated_rms_norm(x, z, self.weight, self.group_size, self.eps)

    def rows(self, x: Tensor, z: Tensor) -> Tensor:
        """`forward` for the decode step (see `RMSNorm.rows`): fused where there is one group and fp32/fp64."""
        if self.group_size == self.dim and x.dtype == z.dtype == self.weight.dtype and x.dtype in _WIDE:
            return F.rms_norm(x * F.silu(z), (self.dim,), self.weight, self.eps)
        return self.forward(x, z)

    def extra_repr(self) -> str:
        return f"{self.dim}, group_size={self.group_size}, eps={self.eps}"
