"""Mamba-1 selective scan: the torch reference of the op (and its one-step decode form).

Layouts put channels first and time last, ``(batch, dim, L)``, because the NKI kernel
maps channels to SBUF partitions and time to the free axis; the reference uses the
same layouts so both backends are interchangeable behind `bmojo_neuron.ops`.

The recurrence ``h_t = a_t * h_{t-1} + b_t`` (elementwise, per channel and state)
has no matmul structure, so on CPU the cost is dominated by Python steps. We run a
*two-level* exact scan: the sequence is cut into ``~sqrt(L)`` chunks, all chunks are
scanned at once from a zero state (``T`` steps, batched over chunks) while also
accumulating the in-chunk decay products, then the chunk-boundary states are carried
across chunks (``L/T`` steps) and added back with those products. That is
``~2*sqrt(L)`` Python steps instead of ``L``, uses only products of decays (no
``exp(-cumsum)``, which overflows) and only ``unbind``/``stack`` to move between time
steps, so autograd stays linear in ``L``. When one step is already large (``batch * dim * N``
in the thousands) the Python overhead is amortised and the plain one-level loop,
which moves less memory, is used instead.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["selective_scan", "selective_state_update"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 at least (bf16/fp16 inputs are upcast); fp64 stays fp64 so tests can check to 1e-10."""
    return torch.promote_types(dtype, torch.float32)


# torch's intra-op grain size: element-wise ops below it run on one thread. The
# two-level scan batches ``n_chunks`` steps per op and keeps each op below it, so on a
# busy machine no op waits on a descheduled OpenMP worker (that costs milliseconds).
_SINGLE_THREAD_NUMEL = 32768
_MIN_CHUNKS = 4  # fewer chunks barely cut the Python steps; use the plain loop


def _sequential_scan(a: Tensor, b: Tensor, h0: Tensor | None) -> Tensor:
    """``h_t = a_t * h_{t-1} + b_t`` one step at a time over ``unbind`` views (L Python steps)."""
    h = h0 if h0 is not None else torch.zeros_like(b[:, :, 0])
    states = []
    for a_t, b_t in zip(a.unbind(2), b.unbind(2)):
        h = a_t * h + b_t
        states.append(h)
    return torch.stack(states, dim=2)


def _linear_scan(a: Tensor, b: Tensor, h0: Tensor | None) -> Tensor:
    """All states of ``h_t = a_t * h_{t-1} + b_t`` along dim 2 of (batch, dim, L, N) tensors.

    Exact. Uses the two-level scan (see the module docstring) with about ``sqrt(L)``
    chunks, fewer if that would make its batched ops multi-threaded; when one step is
    already large the Python overhead is amortised and the plain loop is used.
    Returns (batch, dim, L, N).
    """
    batch, dim, length, n = a.shape
    if length == 0:
        return b
    n_chunks = min(math.isqrt(length - 1) + 1, _SINGLE_THREAD_NUMEL // (batch * dim * n))
    if n_chunks < _MIN_CHUNKS:
        return _sequential_scan(a, b, h0)
    chunk = -(-length // n_chunks)
    n_chunks = -(-length // chunk)
    pad = n_chunks * chunk - length
    if pad:
        # Identity steps (a=1, b=0) at the end change no earlier state.
        a = F.pad(a, (0, 0, 0, pad), value=1.0)
        b = F.pad(b, (0, 0, 0, pad), value=0.0)
    a = a.reshape(batch, dim, n_chunks, chunk, n)
    b = b.reshape(batch, dim, n_chunks, chunk, n)

    # Level 1: every chunk from a zero state, plus the decay product since the chunk start.
    local, decay = [], []
    h = torch.zeros_like(b[:, :, :, 0])
    prod = torch.ones_like(a[:, :, :, 0])
    for a_t, b_t in zip(a.unbind(3), b.unbind(3)):
        h = a_t * h + b_t
        prod = prod * a_t
        local.append(h)
        decay.append(prod)
    local_states = torch.stack(local, dim=3)  # (batch, dim, n_chunks, chunk, N)
    decays = torch.stack(decay, dim=3)

    # Level 2: carry the true state across chunk boundaries.
    carry = h0 if h0 is not None else torch.zeros_like(local_states[:, :, 0, 0])
    starts = []
    for end_state, end_decay in zip(local[-1].unbind(2), decay[-1].unbind(2)):
        starts.append(carry)
        carry = end_decay * carry + end_state
    start_states = torch.stack(starts, dim=2)  # state entering each chunk: (batch, dim, n_chunks, N)

    states = local_states + decays * start_states.unsqueeze(3)
    return states.reshape(batch, dim, n_chunks * chunk, n)[:, :, :length]


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: Tensor | None = None,
    return_last_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Mamba-1 selective scan over the whole sequence (parallel/training form).

    Shapes: u, delta, z (batch, dim, L); A (dim, N); B, C (batch, N, L); D, delta_bias
    (dim,); initial_state (batch, dim, N). With ``d = softplus(delta + bias)`` (or
    ``delta + bias``): ``h_t = exp(d_t A) h_{t-1} + d_t B_t u_t``,
    ``y_t = <h_t, C_t> + D u_t``, then ``y *= silu(z)``.

    Math runs in fp32 (fp64 for fp64 inputs); y is returned in ``u.dtype``, and with
    ``return_last_state`` also the final state (batch, dim, N) in the compute dtype.
    """
    out_dtype = u.dtype
    ct = _compute_dtype(u.dtype)
    u_f = u.to(ct)
    dt = delta.to(ct)
    if delta_bias is not None:
        dt = dt + delta_bias.to(ct)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)

    dA = torch.exp(dt.unsqueeze(-1) * A.to(ct)[:, None, :])  # (batch, dim, L, N)
    dBu = (dt * u_f).unsqueeze(-1) * B.to(ct).transpose(1, 2).unsqueeze(1)  # (batch, dim, L, N)
    h0 = initial_state.to(ct) if initial_state is not None else None
    states = _linear_scan(dA, dBu, h0)

    y = torch.einsum("bdln,bnl->bdl", states, C.to(ct))
    if D is not None:
        y = y + D.to(ct)[:, None] * u_f
    if z is not None:
        y = y * F.silu(z.to(ct))
    y = y.to(out_dtype)
    if not return_last_state:
        return y
    if states.shape[2] == 0:
        last = h0 if h0 is not None else u_f.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    else:
        last = states[:, :, -1]
    return y, last


def selective_state_update(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
) -> tuple[Tensor, Tensor]:
    """One recurrent step of `selective_scan`, for decoding; functional (state is not mutated).

    Shapes: state (batch, dim, N); x, dt, z (batch, dim); A (dim, N); B, C (batch, N);
    D, dt_bias (dim,). Returns ``(y (batch, dim) in x.dtype, new_state)`` where the new
    state keeps the compute dtype (fp32 or wider) so long generations do not drift.
    """
    ct = _compute_dtype(torch.promote_types(x.dtype, state.dtype))
    x_f = x.to(ct)
    d = dt.to(ct)
    if dt_bias is not None:
        d = d + dt_bias.to(ct)
    if dt_softplus:
        d = F.softplus(d)
    dA = torch.exp(d.unsqueeze(-1) * A.to(ct))  # (batch, dim, N)
    dBx = (d * x_f).unsqueeze(-1) * B.to(ct).unsqueeze(1)
    new_state = dA * state.to(ct) + dBx
    y = torch.matmul(new_state, C.to(ct).unsqueeze(-1)).squeeze(-1)  # (b, D)
    if D is not None:
        y = y + D.to(ct) * x_f
    if z is not None:
        y = y * F.silu(z.to(ct))
    return y.to(x.dtype), new_state
