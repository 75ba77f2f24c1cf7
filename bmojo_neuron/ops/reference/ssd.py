"""Mamba-2 / SSD scan: the torch reference of the op (and its one-step decode form).

With a scalar decay per head the recurrence ``h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T``
is a semi-separable matrix, so it is computed in chunks (state space duality,
`ssd_minimal_discrete` in state-spaces/mamba):

* inside a chunk, outputs are a masked attention-like matmul ``(C B^T * decay) (dt x)``
  whose decay matrix ``exp(cs_i - cs_j)`` (``i >= j``) uses differences of in-chunk
  cumulative sums of ``dt A``, masked to the causal triangle *before* the exp so no
  positive exponent is ever evaluated;
* across chunks, each chunk's end state is carried to the next by a short loop over
  chunks (``L / chunk_size`` steps), which is exact and never forms a global cumsum.

The chunks are processed a slice at a time (`chunks_per_slice`), carrying the state
between slices: the per-chunk (chunk x chunk) tensors are linear in L in total, but
formed for the whole sequence at once they fall out of the CPU caches at long L and the
time per token grows with L; a slice's stay cache-resident.

On eager CPU tensors (float32/float64, not tracing: `fused_kernel_available`) the
chunked core runs as one autograd Function with a hand-written backward
(`ssd_fused.SSDChunks`), in chunks sized to the head and state (`fused_chunk`); the code
below is what traced graphs (Neuron/XLA) and other devices run. Both give the same
outputs and gradients up to round-off (`tests/test_scans.py` runs every SSD check on both).

Layouts follow mamba_ssm's `mamba_chunk_scan_combined`: time before heads.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .eager_cpu import cpu_cache_slicing, fused_kernel_available
from .ssd_fused import SSDChunks

__all__ = ["ssd_scan", "ssd_state_update"]

# Bytes of one (chunk x chunk x heads) tensor per slice of chunks: small enough that the
# few such tensors of a slice stay in a CPU's L2/L3 cache, large enough to amortise
# per-op overhead.
SLICE_BYTES = 1 << 21
# Longest and shortest chunk the eager CPU path (`ssd_fused`) aims at; see `fused_chunk`.
FUSED_CHUNK = 64
FUSED_CHUNK_MIN = 16


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 at least; fp64 stays fp64 so tests can check to 1e-10."""
    return torch.promote_types(dtype, torch.float32)


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """`t` in `dtype`; no call into torch when it already is (the decode step runs per token; the
    parallel scan keeps plain casts, which symbolic tracing can follow)."""
    return t if t.dtype == dtype else t.to(dtype)


def _discretize_dt(dt: Tensor, dt_bias: Tensor | None, dt_softplus: bool, ct: torch.dtype,
                   skip_same_dtype: bool = False) -> Tensor:
    """softplus(dt + dt_bias) in `ct`; `skip_same_dtype` drops no-op casts (see `_as`)."""
    cast = _as if skip_same_dtype else Tensor.to
    dt = cast(dt, ct)
    if dt_bias is not None:
        dt = dt + cast(dt_bias, ct)
    return F.softplus(dt) if dt_softplus else dt


def ssd_scan(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    D: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = True,
    initial_state: Tensor | None = None,
    return_final_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Mamba-2 SSD scan over the whole sequence (parallel/training form).

    Shapes: x (batch, L, H, P); dt (batch, L, H); A (H,); B, C (batch, L, G, N) where
    head ``h`` reads group ``h // (H // G)``; D, dt_bias (H,); initial_state
    (batch, H, P, N). Any L: the tail is padded to a multiple of ``chunk_size`` with
    ``dt = 0`` (identity steps), so the final state is that after token ``L - 1``.

    Math in fp32 (fp64 for fp64 inputs); y (batch, L, H, P) in ``x.dtype``, plus the
    final state (batch, H, P, N) in the compute dtype if ``return_final_state``.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    batch, length, heads, head_dim = x.shape
    groups, state_size = B.shape[-2:]
    if heads % groups:
        raise ValueError(f"B/C groups ({groups}) must divide the number of heads ({heads})")
    hpg = heads // groups
    ct = _compute_dtype(x.dtype)

    dt_f = _discretize_dt(dt, dt_bias, dt_softplus, ct)
    x_f, B_f, C_f = x.to(ct), B.to(ct), C.to(ct)
    pad = (-length) % chunk_size
    if pad:
        x_f = F.pad(x_f, (0, 0, 0, 0, 0, pad))
        dt_f = F.pad(dt_f, (0, 0, 0, pad))  # dt = 0 after the softplus: decay 1, no input
        B_f = F.pad(B_f, (0, 0, 0, 0, 0, pad))
        C_f = F.pad(C_f, (0, 0, 0, 0, 0, pad))
    n_chunks = (length + pad) // chunk_size
    T = chunk_size
    if fused_kernel_available(x_f, dt_f, B_f, C_f, initial_state):
        y, h = _scan_fused(x_f, dt_f, A.to(ct), B_f, C_f, initial_state, T)
        return _finish(y, x, x_f, D, h, length, return_final_state)

    # Heads split as (group, head-in-group) so B/C are never copied per head.
    xc = x_f.reshape(batch, n_chunks, T, groups, hpg, head_dim)
    dtc = dt_f.reshape(batch, n_chunks, T, groups, hpg)
    Bc = B_f.reshape(batch, n_chunks, T, groups, state_size)
    Cc = C_f.reshape(batch, n_chunks, T, groups, state_size)
    cs = torch.cumsum(dtc * A.to(ct).reshape(groups, hpg), dim=2)  # in-chunk cumsum of dt*A

    if initial_state is not None:
        h = initial_state.to(ct).reshape(batch, groups, hpg, head_dim, state_size)
    else:
        h = x_f.new_zeros(batch, groups, hpg, head_dim, state_size)
    # On a CPU the chunks are taken a slice at a time so that the (chunk x chunk) decay and
    # score tensors of a slice stay cache-resident; the carried state h links the slices.
    # A traced (Neuron/XLA) graph or a GPU takes them all at once (`cpu_cache_slicing`).
    step = chunks_per_slice(batch, T, heads, x_f.element_size()) if cpu_cache_slicing(x_f) else n_chunks
    # split(), not slicing: its backward concatenates the slices' gradients once, where
    # each slice's backward would write into a zero tensor of the whole sequence.
    ys = []
    for parts in zip(*(t.split(step, dim=1) for t in (xc, dtc, Bc, Cc, cs))):
        y_part, h = _scan_slice(*parts, h)
        ys.append(y_part)
    y = ys[0] if len(ys) == 1 else torch.cat(ys, dim=1)

    y = y.reshape(batch, n_chunks * T, heads, head_dim)
    return _finish(y, x, x_f, D, h.reshape(batch, heads, head_dim, state_size), length, return_final_state)


def _finish(y: Tensor, x: Tensor, x_f: Tensor, D: Tensor | None, h: Tensor, length: int,
            return_final_state: bool) -> Tensor | tuple[Tensor, Tensor]:
    """y (batch, padded L, H, P) cut to `length`, plus ``D x``, in x's dtype; with the final state if asked."""
    y = y[:, :length]
    if D is not None:
        y = y + D.to(y.dtype)[:, None] * x_f[:, :length]
    y = y.to(x.dtype)
    if not return_final_state:
        return y
    return y, h


def fused_chunk(chunk_size: int, head_dim: int | None = None, state_size: int | None = None) -> int:
    """The chunk length `SSDChunks` runs a model chunk in: halved (while even) down to `fused_target`.

    Chunking is exact, so any divisor of the model's chunk gives the same outputs up to
    round-off; only the time changes.
    """
    target = fused_target(head_dim, state_size)
    while chunk_size > target and chunk_size % 2 == 0:
        chunk_size //= 2
    return chunk_size


def fused_target(head_dim: int | None = None, state_size: int | None = None) -> int:
    """The chunk the eager CPU path aims at: the power of two at or above ``sqrt(P * N)``, within 16..64.

    Per token, the in-chunk work grows with the chunk T (a (T x T) decay and score
    tensor per head, element-wise passes over it forward and backward), while the chunk
    states cost ``P * N`` per head once per chunk, i.e. ``P * N / T`` per token; the sum
    is least near ``T = sqrt(P * N)``. Measured forward + backward on one CPU thread
    (docs/ops.md, `infra/ssd_chunk_sweep.py`): P 32, N 4 runs fastest in chunks of 16
    (a quarter faster than 32), P 32, N 16 in 16 or 32 (within noise, both a quarter
    faster than 64 at L 512), P 64, N 64 equally in 32 and 64; below 16 the per-chunk
    loop and small products cost more than they save, and above 64 the (T x T) work
    dominates. Unknown sizes aim at 64.
    """
    if not head_dim or not state_size:
        return FUSED_CHUNK
    target = 1 << max(0, math.ceil(math.log2(math.sqrt(head_dim * state_size))))
    return min(FUSED_CHUNK, max(FUSED_CHUNK_MIN, target))


def _scan_fused(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, initial_state: Tensor | None,
                chunk: int) -> tuple[Tensor, Tensor]:
    """The chunked core through `SSDChunks` (eager CPU): y (batch, padded L, H, P) and the final state."""
    batch, length, heads, head_dim = x.shape
    groups, state_size = B.shape[-2:]
    chunk = fused_chunk(chunk, head_dim, state_size)
    n = length // chunk
    if initial_state is None:
        h0 = x.new_zeros(batch, heads, head_dim, state_size)
    else:
        h0 = initial_state.to(x.dtype)
    # Contiguous chunks (B and C are often strided slices of one projection): the Function takes views.
    y, h = SSDChunks.apply(
        x.contiguous().view(batch, n, chunk, heads, head_dim), dt.contiguous().view(batch, n, chunk, heads), A,
        B.contiguous().view(batch, n, chunk, groups, state_size),
        C.contiguous().view(batch, n, chunk, groups, state_size), h0,
        chunks_per_slice(batch, chunk, heads, x.element_size()))
    return y.view(batch, length, heads, head_dim), h


def chunks_per_slice(batch: int, chunk_size: int, heads: int, itemsize: int) -> int:
    """How many chunks one slice of `ssd_scan` takes: their (chunk x chunk) tensors fit `SLICE_BYTES`."""
    per_chunk = batch * chunk_size * chunk_size * heads * itemsize
    return max(1, SLICE_BYTES // per_chunk)


def _scan_slice(xc: Tensor, dtc: Tensor, Bc: Tensor, Cc: Tensor, cs: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
    """Outputs of consecutive chunks entered with state `h`, and the state after the last.

    xc (b, c, T, g, h, P); dtc, cs (b, c, T, g, h); Bc, Cc (b, c, T, g, N); h (b, g, h, P, N).
    """
    T = xc.shape[2]
    # 1) Intra-chunk outputs: y_i = sum_{j<=i} (C_i . B_j) exp(cs_i - cs_j) dt_j x_j.
    causal = torch.ones(T, T, dtype=torch.bool, device=xc.device).tril()
    seg = cs.unsqueeze(3) - cs.unsqueeze(2)  # (b, c, i, j, g, h)
    decay = torch.exp(seg.masked_fill(~causal[:, :, None, None], float("-inf")))
    # dt is folded into x (size L*H*P) rather than into the (T x T) scores: one fewer
    # full-size product, forward and backward.
    x_dt = xc * dtc.unsqueeze(-1)
    scores = torch.einsum("bcign,bcjgn->bcijg", Cc, Bc).unsqueeze(-1) * decay
    y = torch.einsum("bcijgh,bcjghp->bcighp", scores, x_dt)

    # 2) State contributed by each chunk at its end: sum_j exp(cs_end - cs_j) dt_j x_j B_j^T.
    to_end = torch.exp(cs[:, :, -1:] - cs)
    chunk_states = torch.einsum("bcjgn,bcjgh,bcjghp->bcghpn", Bc, to_end, x_dt)
    chunk_decay = torch.exp(cs[:, :, -1])  # (b, c, g, h)

    # 3) Carry states across chunks (exact, one step per chunk).
    starts = []
    for s_c, a_c in zip(chunk_states.unbind(1), chunk_decay.unbind(1)):
        starts.append(h)
        h = a_c[..., None, None] * h + s_c
    start_states = torch.stack(starts, dim=1)  # state entering each chunk

    # 4) Contribution of the entering state: C_i . (exp(cs_i) h_start).
    y = y + torch.einsum("bcign,bcghpn,bcigh->bcighp", Cc, start_states, torch.exp(cs))
    return y, h


def ssd_state_update(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = True,
) -> tuple[Tensor, Tensor]:
    """One recurrent step of `ssd_scan`, for decoding; functional (state is not mutated).

    Shapes: state (batch, H, P, N); x (batch, H, P); dt (batch, H); A, D, dt_bias (H,);
    B, C (batch, G, N). Returns ``(y (batch, H, P) in x.dtype, new_state)`` with the
    new state in the compute dtype (fp32 or wider).
    """
    ct = _compute_dtype(torch.promote_types(x.dtype, state.dtype))
    batch, heads, head_dim = x.shape
    groups, state_size = B.shape[1:]
    rows = heads // groups * head_dim
    d = _discretize_dt(dt, dt_bias, dt_softplus, ct, skip_same_dtype=True)  # (b, H)
    x_f = _as(x, ct)
    decay = torch.exp(d * _as(A, ct))
    # Each group's heads as one (heads in group * P, N) matrix, so B and C broadcast over
    # them uncopied and the read-out is one batched matrix-vector product per (batch, group).
    # At one token per step the op count, not the arithmetic, is the cost: reshapes here are
    # views (one op each) unless a caller passes strided slices.
    # The state is the largest tensor here: it is read once and the new one written once
    # (the input update is added in place into the decayed copy).
    new_state = (_as(state, ct) * decay.view(batch, heads, 1, 1)).view(batch * groups, rows, state_size)
    dx = (x_f * d.view(batch, heads, 1)).view(batch * groups, rows, 1)
    new_state.addcmul_(dx, _as(B, ct).reshape(batch * groups, 1, state_size))
    y = torch.bmm(new_state, _as(C, ct).reshape(batch * groups, state_size, 1)).view(batch, heads, head_dim)
    if D is not None:
        y = y.addcmul_(_as(D, ct).view(heads, 1), x_f)
    return _as(y, x.dtype), new_state.view(batch, heads, head_dim, state_size)
