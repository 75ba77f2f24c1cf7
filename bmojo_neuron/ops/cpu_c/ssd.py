"""`ssd_scan` in C (`ssd_chunks.c`), forward and backward, on float32 CPU tensors.

The whole op runs in C: dt's bias and softplus, the chunked core, ``D x``, and a short
last chunk instead of padding. Only the casts to float32 (no-ops for float32 inputs) and
the sums over the batch of the per-row parameter gradients stay in torch. The math is the
reference `ssd_scan`'s, with the eager-CPU core `SSDChunks`'s decay floor; the chunk
length is the C code's own (`C_CHUNK`, chunking is exact). Where C cannot run (no
compiler, a failed build, ``BMOJO_CPU_C=0``, float64 inputs, tensors that are not eager
CPU ones, tracing) the reference runs, with one warning per reason.

Under CPU autocast the C path computes in float32, as `ssd_scan` does outside autocast:
there is no bfloat16 arithmetic to gain in plain C, and float32 is the op's compute dtype
(the torch core's products would run in bfloat16 there).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..reference import ssd as ssd_reference
from ..reference.ssd_fused import decay_floor
from . import build, common
from .common import c_unavailable

__all__ = ["C_CHUNK", "CSSDScan", "c_unavailable", "ssd_scan"]

# The chunk the C code runs in, whatever the model's chunk_size (chunking is exact). With 8 heads of
# P 64 and N 64 (the bench's model), forward + backward on one thread, chunks of 32, 48 and 64 run
# within noise of each other (16 and 96 slower, docs/ops.md); 32 has the smaller round-off in dA
# (its in-chunk sums are shorter).
C_CHUNK = 32

# ssd_chunks.c's parameters: pointers, then the sizes (b, L, H, P, G, N, chunk, B/C row and group
# strides), the softplus flag, the decay floor and the thread count.
_SIZES = [build.LONG] * 9 + [build.INT, build.FLOAT, build.INT]
_FORWARD_ARGS = [build.FLOAT_P] * 12 + _SIZES
_BACKWARD_ARGS = [build.FLOAT_P] * 19 + _SIZES


def _bc_strides(B: Tensor, C: Tensor) -> tuple[Tensor, Tensor, int, int]:
    """B and C as the C code reads them: rows of tokens with a common row and group stride (the
    model's B and C are such views of one projection); contiguous copies otherwise."""
    batch, length = B.shape[:2]
    s = B.stride()
    if s == C.stride() and s[3] == 1 and (batch == 1 or s[0] == length * s[1]):
        return B, C, s[1], s[2]
    B, C = B.contiguous(), C.contiguous()
    return B, C, B.stride(1), B.stride(2)


class CSSDScan(torch.autograd.Function):
    """y (with ``D x``) and final state of `ssd_scan` on float32 CPU tensors, in C.

    x (b, L, H, P) and dt (b, L, H) contiguous; A, D, dt_bias (H,) contiguous, D and dt_bias
    may be None; B, C (b, L, G, N) with unit stride along N and the token and group strides
    of `_bc_strides`; h0 (b, H, P, N) contiguous or None. Saves the inputs, the discretised
    dt and the state entering each chunk.
    """

    @staticmethod
    def forward(ctx, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                dt_bias: Tensor | None, h0: Tensor | None, softplus: bool, chunk: int):
        b, L, H, P = x.shape
        G, N = B.shape[-2:]
        B, C, bc_row, bc_group = _bc_strides(B, C)
        y, h = torch.empty_like(x), x.new_empty(b, H, P, N)
        starts, dt_out = x.new_empty(b, -(-L // chunk), H, N, P), torch.empty_like(dt)
        status = build.function("ssd_chunks_forward", _FORWARD_ARGS)(
            *map(common.ptr, (x, dt, dt_bias, A, B, C, D, h0, y, h, starts, dt_out)), b, L, H, P, G, N, chunk,
            bc_row, bc_group, int(softplus), decay_floor(x.dtype), common.threads())
        if status:
            raise MemoryError("ssd_chunks_forward: out of memory for its scratch buffers")
        ctx.save_for_backward(x, dt, dt_bias, A, B, C, D, dt_out, starts)
        ctx.sizes = (chunk, bc_row, bc_group, int(softplus), h0 is not None)
        return y, h

    @staticmethod
    def backward(ctx, gy: Tensor | None, g_final: Tensor | None):
        x, dt, dt_bias, A, B, C, D, dt_out, starts = ctx.saved_tensors
        chunk, bc_row, bc_group, softplus, has_h0 = ctx.sizes
        b, L, H, P = x.shape
        G, N = B.shape[-2:]
        gy = torch.zeros_like(x) if gy is None else gy.contiguous()
        g_final = None if g_final is None else g_final.contiguous()
        dx, d_dt, d_h0 = torch.empty_like(x), torch.empty_like(dt), x.new_empty(b, H, P, N)
        per_row = x.new_zeros(3, b, H)  # dA, dD, d dt_bias per batch row, summed here (deterministic)
        dB, dC = x.new_zeros(b, L, G, N), x.new_zeros(b, L, G, N)
        status = build.function("ssd_chunks_backward", _BACKWARD_ARGS)(
            *map(common.ptr, (x, dt, dt_bias, A, B, C, D, dt_out, starts, gy, g_final, dx, d_dt, per_row[0],
                              per_row[1], per_row[2], dB, dC, d_h0)),
            b, L, H, P, G, N, chunk, bc_row, bc_group, softplus, decay_floor(x.dtype), common.threads())
        if status:
            raise MemoryError("ssd_chunks_backward: out of memory for its scratch buffers")
        d_a, d_d, d_bias = per_row.sum(1)
        return (dx, d_dt, d_a, dB, dC, d_d if D is not None else None, d_bias if dt_bias is not None else None,
                d_h0 if has_h0 else None, None, None)


def _warn_once(reason: str) -> None:
    common.warn_once("ssd_scan", reason, stacklevel=5)


def _scan_in_c(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, dt_bias: Tensor | None,
               dt_softplus: bool, initial_state: Tensor | None) -> tuple[Tensor, Tensor]:
    """y (float32) and the final state through `CSSDScan`, operands in the layouts it reads."""
    contiguous = [None if t is None else t.contiguous() for t in (x, dt, A, D, dt_bias, initial_state)]
    x, dt, A, D, dt_bias, h0 = contiguous
    return CSSDScan.apply(x, dt, A, B, C, D, dt_bias, h0, dt_softplus, C_CHUNK)


def ssd_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int, D: Tensor | None = None,
             dt_bias: Tensor | None = None, dt_softplus: bool = True, initial_state: Tensor | None = None,
             return_final_state: bool = False) -> Any:
    """The `ssd_scan` op (reference signature, layouts and results) in C where it can run.

    Inputs are cast to the op's compute dtype (float32 at least) first, as the reference
    does; the reference runs (and raises on bad arguments) wherever C cannot.
    """
    heads, groups = x.shape[2], B.shape[-2]
    ct = torch.promote_types(x.dtype, torch.float32)
    cast = [None if t is None else t.to(ct) for t in (x, dt, A, B, C, D, dt_bias, initial_state)]
    reason = c_unavailable(*cast)
    if chunk_size < 1 or groups < 1 or heads % groups or reason:
        if reason:
            _warn_once(reason)
        return ssd_reference.ssd_scan(x, dt, A, B, C, chunk_size, D, dt_bias, dt_softplus, initial_state,
                                      return_final_state)
    y, h = _scan_in_c(*cast[:7], dt_softplus, cast[7])
    y = y.to(x.dtype)
    return (y, h) if return_final_state else y
