"""Reference eidetic-window attention: in-context window + fading window + memory, one softmax.

For query ``i`` (chunk ``j = i // chunk``) the keys are

* in-context: ``k[t]``, ``t in (i - window, i]``, ``t >= 0``;
* fading:     ``k_fading[t]``, ``t in (i - window - fading_window, i - window]``, ``t >= 0``
  (``fading_overlap=True``: ``t in (i - fading_window, i]``, over the window instead of behind it);
* memory:     ``mem_k[j, m]`` for the slots with ``mem_valid[j, m]``,

and one softmax (scale ``1/sqrt(head_dim)`` by default) weighs the matching values.

Layouts (the NKI kernel takes the same):
    q                 (batch, q_heads, L, head_dim), already rotated
    k, v              (batch, kv_heads, L, head_dim), k rotated
    k_fading, v_fading  same as k, v, or None (no fading path)
    mem_k, mem_v      (batch, kv_heads, n_chunks, M, head_dim), n_chunks = ceil(L / chunk);
                      the memory each chunk of queries sees, keys already rotated; or None
    mem_valid         (batch, n_chunks, M) bool
Returns ``(out (batch, q_heads, L, head_dim) in q.dtype, lse (batch, q_heads, L) float32)`` (float64 for float64 inputs)``.
Query head ``h`` reads kv head ``h // (q_heads // kv_heads)`` (GQA).

The computation is blocked: queries go in blocks of ``block`` rows, each reading a
band of ``block + width - 1`` keys cut out with `unfold`, so time and memory are
O(L * (window + fading_window + M)); no L x L matrix is ever formed. Everything is
computed in float32 (float64 inputs stay float64, for gradcheck).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .eager_cpu import fused_kernel_available
from .eidetic_attention_fused import eidetic_attention_fused

NEG_INF = float("-inf")


def eidetic_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_fading: Tensor | None = None,
    v_fading: Tensor | None = None,
    mem_k: Tensor | None = None,
    mem_v: Tensor | None = None,
    mem_valid: Tensor | None = None,
    *,
    window: int,
    fading_window: int = 0,
    chunk: int = 1,
    scale: float | None = None,
    block: int | None = None,
    fading_overlap: bool = False,
) -> tuple[Tensor, Tensor]:
    """B'MOJO attention for every query of a sequence; see the module docstring.

    On CPU (float32/float64, eager) it runs on fused attention kernels
    (`eidetic_attention_fused`); elsewhere, and while tracing, `eidetic_attention_blocked`.
    """
    check_shapes(q, k, v, k_fading, v_fading, mem_k, mem_v, mem_valid, window, fading_window, chunk)
    args = (q, k, v, k_fading, v_fading, mem_k, mem_v, mem_valid)
    if fused_kernel_available(*args):
        return eidetic_attention_fused(*args, window=window, fading_window=fading_window, chunk=chunk, scale=scale,
                                       block=block, fading_overlap=fading_overlap)
    return eidetic_attention_blocked(*args, window=window, fading_window=fading_window, chunk=chunk, scale=scale,
                                     block=block, fading_overlap=fading_overlap)


def eidetic_attention_blocked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_fading: Tensor | None = None,
    v_fading: Tensor | None = None,
    mem_k: Tensor | None = None,
    mem_v: Tensor | None = None,
    mem_valid: Tensor | None = None,
    *,
    window: int,
    fading_window: int = 0,
    chunk: int = 1,
    scale: float | None = None,
    block: int | None = None,
    fading_overlap: bool = False,
) -> tuple[Tensor, Tensor]:
    """The op in plain torch ops (autograd does the backward): any device, traceable."""
    batch, q_heads, length, head_dim = q.shape
    kv_heads = k.shape[1]
    check_shapes(q, k, v, k_fading, v_fading, mem_k, mem_v, mem_valid, window, fading_window, chunk)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    window = min(window, length)
    fading_lag = fading_window - 1 if fading_overlap else window + fading_window - 1
    use_fading = k_fading is not None and fading_window > 0 and (fading_overlap or window < length)
    use_memory = mem_k is not None and mem_k.shape[3] > 0
    block = block or _default_block(window)
    block = min(block, length)
    n_blocks = -(-length // block)

    groups = q_heads // kv_heads
    dtype = torch.promote_types(q.dtype, torch.float32)  # fp32 math for bf16/fp16; fp64 stays fp64
    qf = (q.to(dtype) * scale).reshape(batch, kv_heads, groups, length, head_dim)
    q_blocks = _pad_to(qf, n_blocks * block, dim=3).reshape(batch, kv_heads, groups, n_blocks, block, head_dim)

    # Scores of each part in its own layout: (..., n_groups_of_rows, rows, keys); the
    # bands group rows in query blocks, the memory in chunks.
    ctx_k, ctx_v, ctx_mask = _band(k.to(dtype), v.to(dtype), window - 1, window, block, n_blocks)
    parts = [(_band_scores(q_blocks, ctx_k, ctx_mask), ctx_v[:, :, None])]
    if use_fading:
        fad_k, fad_v, fad_mask = _band(
            k_fading.to(dtype), v_fading.to(dtype), fading_lag, fading_window, block, n_blocks
        )
        parts.append((_band_scores(q_blocks, fad_k, fad_mask), fad_v[:, :, None]))
    if use_memory:
        n_chunks = mem_k.shape[2]
        q_chunks = _pad_to(qf, n_chunks * chunk, dim=3).reshape(batch, kv_heads, groups, n_chunks, chunk, head_dim)
        mem_scores = torch.einsum("bhgcqd,bhcmd->bhgcqm", q_chunks, mem_k.to(dtype))
        bias = torch.zeros(mem_valid.shape, dtype=dtype, device=q.device).masked_fill(~mem_valid, NEG_INF)
        parts.append((mem_scores + bias[:, None, None, :, None, :], mem_v.to(dtype)[:, :, None]))

    # One softmax over the union of the parts' keys. The shift m is the row maximum over
    # all parts (finite: every query sees its own key) and is a constant for autograd,
    # which leaves the gradient of the softmax unchanged.
    with torch.no_grad():
        m = torch.stack([_rows(s.amax(dim=-1), length) for s, _ in parts]).amax(dim=0)
    # Padding rows (zero queries: scores 0 or -inf) get shift 0: finite, then dropped.
    exps = [torch.exp(s - _unrows(m, s.shape[3:5], fill=0.0)[..., None]) for s, _ in parts]
    total = torch.stack([_rows(e.sum(dim=-1), length) for e in exps]).sum(dim=0)  # (batch, kv_heads, groups, L)
    lse = m + torch.log(total)

    # Normalise after the value products: dividing (L, head_dim) beats dividing (L, keys).
    out = sum(_rows(torch.matmul(e, values), length) for e, (_, values) in zip(exps, parts)) / total[..., None]
    out = out.reshape(batch, q_heads, length, head_dim).to(q.dtype)
    return out, lse.reshape(batch, q_heads, length)


def _default_block(window: int) -> int:
    # A band costs (block + window) keys per query, so small blocks waste less; too
    # small and the per-block overhead wins. Measured at w = 512: 128 rows beat 64 and 256.
    return max(16, min(window // 4, 128))


def _band(k: Tensor, v: Tensor, lag: int, width: int, block: int, n_blocks: int) -> tuple[Tensor, Tensor, Tensor]:
    """Cut, for every query block, the keys ``t in [i - lag, i - lag + width)`` of its rows.

    Block ``b`` (rows ``b*block + r``) reads keys ``t = b*block - lag + s`` for
    ``s in [0, block + width - 1)``; row ``r`` may use ``s in [r, r + width)`` with ``t >= 0``.
    Returns keys and values (batch, kv_heads, n_blocks, span, head_dim) and the mask
    (n_blocks, block, span).
    """
    span = block + width - 1
    needed = (n_blocks - 1) * block + span
    length = k.shape[2]
    front, back = lag, max(0, needed - lag - length)
    kp = F.pad(k, (0, 0, front, back))[:, :, :needed]
    vp = F.pad(v, (0, 0, front, back))[:, :, :needed]
    # Gathered with one index (n_blocks, span), not Tensor.unfold: torch-xla 2.9 has no kernel for unfold's
    # backward (unfold_backward is not in codegen/xla_native_functions.yaml), so training on XLA would run it on
    # the CPU fallback at every step; index and its backward (index_put) are lowered.
    padded_pos = torch.arange(n_blocks, device=k.device)[:, None] * block + torch.arange(span, device=k.device)
    k_band, v_band = kp[:, :, padded_pos], vp[:, :, padded_pos]

    rows = torch.arange(block, device=k.device)[:, None]
    cols = torch.arange(span, device=k.device)[None, :]
    in_band = (cols >= rows) & (cols < rows + width)
    key_pos = padded_pos - lag
    mask = in_band[None] & (key_pos >= 0)[:, None, :]
    return k_band, v_band, mask


def _band_scores(q_blocks: Tensor, k_band: Tensor, mask: Tensor) -> Tensor:
    """Scores (batch, kv_heads, groups, n_blocks, block, span), -inf outside each row's band."""
    scores = torch.matmul(q_blocks, k_band[:, :, None].transpose(-1, -2))
    return scores.masked_fill(~mask, NEG_INF)


def _rows(x: Tensor, length: int) -> Tensor:
    """(..., n, size[, d]) grouped rows -> (..., L[, d]) per query, padding rows dropped."""
    if x.dim() == 5:
        return x.flatten(-2)[..., :length]
    return x.flatten(-3, -2)[..., :length, :]


def _unrows(x: Tensor, grouping: tuple[int, int], fill: float) -> Tensor:
    """(..., L) per query -> (..., n, size) grouped rows; padding rows get `fill`."""
    n, size = grouping
    return F.pad(x, (0, n * size - x.shape[-1]), value=fill).unflatten(-1, (n, size))


def _pad_to(x: Tensor, size: int, dim: int) -> Tensor:
    extra = size - x.shape[dim]
    if extra == 0:
        return x
    pad = [0, 0] * (x.dim() - 1 - dim) + [0, extra]
    return F.pad(x, pad)


def check_shapes(q, k, v, k_fading, v_fading, mem_k, mem_v, mem_valid, window, fading_window, chunk) -> None:
    """ValueError naming the first input whose shape does not fit the layouts above (shared by every backend)."""
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"eidetic_attention: q and k must be (batch, heads, L, head_dim), got {tuple(q.shape)}, {tuple(k.shape)}")
    batch, q_heads, length, head_dim = q.shape
    if k.shape != v.shape or k.shape[0] != batch or k.shape[2:] != (length, head_dim):
        raise ValueError(f"eidetic_attention: k {tuple(k.shape)} / v {tuple(v.shape)} do not match q {tuple(q.shape)}")
    if q_heads % k.shape[1]:
        raise ValueError(f"eidetic_attention: kv heads ({k.shape[1]}) must divide query heads ({q_heads})")
    if window < 1 or fading_window < 0 or chunk < 1:
        raise ValueError(f"eidetic_attention: need window >= 1, fading_window >= 0, chunk >= 1; got {window}, {fading_window}, {chunk}")
    if (k_fading is None) != (v_fading is None) or (k_fading is not None and k_fading.shape != k.shape):
        raise ValueError("eidetic_attention: k_fading and v_fading must both be given with the shape of k, or both None")
    if mem_k is None:
        return
    n_chunks = -(-length // chunk)
    expected = (batch, k.shape[1], n_chunks, mem_k.shape[3], head_dim)
    if tuple(mem_k.shape) != expected or mem_v is None or mem_v.shape != mem_k.shape:
        raise ValueError(f"eidetic_attention: mem_k/mem_v must be {expected}, got {tuple(mem_k.shape)}")
    if mem_valid is None or tuple(mem_valid.shape) != (batch, n_chunks, mem_k.shape[3]) or mem_valid.dtype != torch.bool:
        raise ValueError(f"eidetic_attention: mem_valid must be a bool tensor {(batch, n_chunks, mem_k.shape[3])}")
