"""`ssd_scan` with its chunked core in C (`ssd_chunks.c`), forward and backward, on float32 CPU tensors.

The op is the reference `ssd_scan` (discretisation, padding, ``D`` in torch) with the
eager-CPU core `SSDChunks` swapped for `CSSDChunks`: the same recurrence, products and
decay floor, each chunk's element-wise work done in C while the chunk is in cache
instead of as whole-tensor torch ops. Where the C core cannot run (no compiler, a failed
build, ``BMOJO_CPU_C=0``, inputs that are not float32 CPU tensors, tracing) the torch
path runs, with one warning per reason.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from ..reference import ssd as ssd_reference
from ..reference.eager_cpu import fused_kernel_available
from ..reference.ssd_fused import _floor
from . import build

__all__ = ["CSSDChunks", "c_core_unavailable", "ssd_scan"]

_warned: set[tuple[str, str]] = set()  # (op, reason) pairs warned about

# ssd_chunks.c's parameters: pointers, then the sizes (b, L, H, P, G, N, chunk), the decay floor, the thread count.
_FORWARD_ARGS = [build.FLOAT_P] * 9 + [build.LONG] * 7 + [build.FLOAT, build.INT]
_BACKWARD_ARGS = [build.FLOAT_P] * 14 + [build.LONG] * 7 + [build.FLOAT, build.INT]


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _threads() -> int:
    """The C kernels use as many threads as torch's intra-op pool (the bench sets it to 1)."""
    return max(1, torch.get_num_threads())


class CSSDChunks(torch.autograd.Function):
    """y and final state of the SSD recurrence over whole chunks, in C.

    x (b, L, H, P); dt (b, L, H) discretised; A (H,); B, C (b, L, G, N); h0 (b, H, P, N);
    all contiguous float32, L a multiple of `chunk`. Returns y (b, L, H, P) and the final
    state (b, H, P, N). Saves the inputs and the state entering each chunk.
    """

    @staticmethod
    def forward(ctx, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, h0: Tensor, chunk: int):
        b, L, H, P = x.shape
        G, N = B.shape[-2:]
        y, h = torch.empty_like(x), torch.empty_like(h0)
        starts = x.new_empty(b, L // chunk, H, N, P)
        status = build.function("ssd_chunks_forward", _FORWARD_ARGS)(
            *map(_ptr, (x, dt, A, B, C, h0, y, h, starts)), b, L, H, P, G, N, chunk, _floor(x.dtype), _threads())
        if status:
            raise MemoryError("ssd_chunks_forward: out of memory for its scratch buffers")
        ctx.save_for_backward(x, dt, A, B, C, starts)
        ctx.chunk = chunk
        return y, h

    @staticmethod
    def backward(ctx, gy: Tensor | None, g_final: Tensor | None):
        x, dt, A, B, C, starts = ctx.saved_tensors
        b, L, H, P = x.shape
        G, N = B.shape[-2:]
        gy = torch.zeros_like(x) if gy is None else gy.contiguous()
        g_final = None if g_final is None else g_final.contiguous()
        dx, d_dt, d_h0 = torch.empty_like(x), torch.empty_like(dt), x.new_empty(b, H, P, N)
        d_a, dB, dC = x.new_zeros(b, H), torch.zeros_like(B), torch.zeros_like(C)
        status = build.function("ssd_chunks_backward", _BACKWARD_ARGS)(
            *map(_ptr, (x, dt, A, B, C, starts, gy, g_final, dx, d_dt, d_a, dB, dC, d_h0)),
            b, L, H, P, G, N, ctx.chunk, _floor(x.dtype), _threads())
        if status:
            raise MemoryError("ssd_chunks_backward: out of memory for its scratch buffers")
        return dx, d_dt, d_a.sum(0), dB, dC, d_h0, None


def _c_core(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, initial_state: Tensor | None,
            chunk: int) -> tuple[Tensor, Tensor]:
    """`ssd_reference.ChunkCore` in C (contiguous operands, the chunk the torch core would take), or the
    torch core with a warning where the C one cannot run."""
    reason = c_core_unavailable(x)
    if reason:
        _warn_once(reason)
        return ssd_reference._scan_fused(x, dt, A, B, C, initial_state, chunk)
    batch, _, heads, head_dim = x.shape
    state_size = B.shape[-1]
    chunk = ssd_reference.fused_chunk(chunk, head_dim, state_size)
    h0 = x.new_zeros(batch, heads, head_dim, state_size) if initial_state is None else initial_state.to(x.dtype)
    return CSSDChunks.apply(x.contiguous(), dt.contiguous(), A.contiguous(), B.contiguous(), C.contiguous(),
                            h0.contiguous(), chunk)


def c_core_unavailable(x: Tensor) -> str:
    """Why the C core cannot run on the core's input `x` (in the compute dtype; "" when it can)."""
    if x.dtype != torch.float32:
        return f"{str(x.dtype).removeprefix('torch.')} inputs (the C kernels take float32)"
    loaded = build.load()
    return "" if loaded.library is not None else loaded.reason


def _warn_once(reason: str, op: str = "ssd_scan") -> None:
    """One RuntimeWarning per (op, reason) that the torch path runs; none while a graph is traced (Dynamo cannot
    trace `warnings.warn`, and a traced graph takes the torch path by design, as under the torch backend)."""
    if torch.compiler.is_compiling():
        return
    if (op, reason) not in _warned and not build.turned_off():
        _warned.add((op, reason))
        warnings.warn(f"ops backend 'cpu-c': {op} runs the torch path: {reason}", RuntimeWarning, stacklevel=4)


def ssd_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int, D: Tensor | None = None,
             dt_bias: Tensor | None = None, dt_softplus: bool = True, initial_state: Tensor | None = None,
             return_final_state: bool = False) -> Any:
    """The `ssd_scan` op (reference signature and layouts) with the chunked core in C where it can run.

    Inputs that are not eager CPU tensors (another device, tracing, `fused_kernels_disabled`) never reach
    a chunked core: the reference's traced form runs them, as under the torch backend.
    """
    if not fused_kernel_available(x, dt, A, B, C, D, dt_bias, initial_state):
        _warn_once("inputs that are not eager CPU tensors (another device, tracing or fused_kernels_disabled)")
    return ssd_reference.ssd_scan(x, dt, A, B, C, chunk_size, D, dt_bias, dt_softplus, initial_state,
                                  return_final_state, chunk_core=_c_core)
