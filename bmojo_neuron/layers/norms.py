"""RMS norms used by the SSM mixers (and the model).

`GatedRMSNorm` is Mamba-2's output norm with ``norm_before_gate=False``: the gate
``silu(z)`` is applied first, then each group of ``group_size`` channels is normalised
on its own. Grouping by the SSM's ``n_groups`` makes the result independent of how
many tensor-parallel ranks the channels are split over (each rank holds whole groups).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["GatedRMSNorm", "RMSNorm", "rms_normalize"]


def rms_normalize(x: Tensor, eps: float) -> Tensor:
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """`t` in `dtype`, without a call into torch when it already is."""
    return t if t.dtype == dtype else t.to(dtype)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half precision, the dtype itself for fp32/fp64: `torch.promote_types(dtype, float32)` for
    floating dtypes, without a call into torch (decoding runs every norm once per token)."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


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
        ct = _compute_dtype(x.dtype)
        y = rms_normalize(_as(x, ct), self.eps) * _as(self.weight, ct)
        return _as(y, x.dtype)

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
        ct = _compute_dtype(x.dtype)
        h = _as(x, ct)
        if z is not None:
            h = h * F.silu(_as(z, ct))
        if self.group_size == self.dim:  # one group: no reshapes (decoding runs this once per token and layer)
            h = rms_normalize(h, self.eps)
        else:
            shape = h.shape
            h = rms_normalize(h.reshape(*shape[:-1], shape[-1] // self.group_size, self.group_size), self.eps)
            h = h.reshape(shape)
        return _as(h * _as(self.weight, ct), x.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, group_size={self.group_size}, eps={self.eps}"
