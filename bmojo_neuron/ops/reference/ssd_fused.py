"""The SSD scan's chunked core as one autograd Function with a hand-written backward (eager CPU).

Same math as `ssd._scan_slice` over all chunks (see `ssd` for the formulas); this is
how `ssd.ssd_scan` runs on eager CPU tensors. Autograd through the reference's einsums
records ~90 matrix products per call, many of them with three or four operands that
einsum contracts pairwise through broadcast intermediates, and it keeps every
(chunk x chunk x heads) tensor of the sequence alive until the backward. Here:

* every product is one batched matrix product over (batch, chunk[, group]) with
  operands in the layout it reads (for one B/C group, the time-major input *is* that
  layout: a chunk's ``(T, heads * P)`` rows against its ``(T, N)`` B or C);
* the (chunk x chunk) decay and score tensors are formed a slice of chunks at a time
  (`ssd.chunks_per_slice`), in the forward and again in the backward, so they stay
  cache-resident and are never saved: the backward recomputes them from ``cs`` (the
  in-chunk cumulative sums), which costs a few element-wise passes over data in cache;
* what is saved is linear in L and small: the inputs, the states entering each chunk
  and the read-out of those states.

Inputs are already discretised (``dt`` after bias and softplus), in the compute dtype,
padded to whole chunks; ``D``, the casts and the padding stay in `ssd.ssd_scan` under
ordinary autograd.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _exp(t: Tensor) -> Tensor:
    """``exp(t)``, at least ``eps**2`` of the dtype (`decay_floor`).

    Decays of long spans underflow, and on x86 an exponential whose result is subnormal
    or zero, and every product that reads a subnormal, runs 10-100x slower than on
    normal floats; products of such decays with the small inputs they weight land there.
    Flooring the decays at ``eps**2`` keeps every product normal and changes a sum by at
    most ``eps**2`` times its terms' magnitude: ``eps`` times below the sum's own
    round-off (``eps`` times the terms' magnitude).
    """
    return t.clamp(min=decay_floor(t.dtype)).exp_()


def decay_floor(dtype: torch.dtype) -> float:
    """The least exponent a decay is taken at, ``2 log eps`` of `dtype` (see `_exp`); the C core takes it too."""
    return 2.0 * math.log(torch.finfo(dtype).eps)


def _mm(a: Tensor, b: Tensor) -> Tensor:
    """Batched ``a @ b`` over equal leading axes, as one `torch.bmm` on views where the strides allow.

    `torch.matmul` on 5-D operands copies a transposed operand to contiguous memory;
    `bmm` reads either orientation of the last two axes in place.
    """
    lead = a.shape[:-2]
    out = torch.bmm(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]))
    return out.view(*lead, *out.shape[-2:])


def _group_major(t: Tensor, groups: int) -> Tensor:
    """(b, n, T, G * R) time-major rows -> (b, n, G, T, R); a view when G == 1."""
    b, n, T, width = t.shape
    return t.view(b, n, T, groups, width // groups).transpose(2, 3)


def _time_major(t: Tensor) -> Tensor:
    """Inverse of `_group_major`: (b, n, G, T, R) -> (b, n, T, G * R)."""
    b, n, G, T, R = t.shape
    return t.transpose(2, 3).reshape(b, n, T, G * R)


def _intra_slices(n: int, per_slice: int) -> list[slice]:
    return [slice(i, min(i + per_slice, n)) for i in range(0, n, per_slice)]


class _Intra:
    """The in-chunk (chunk x chunk) pieces of one slice of chunks, recomputed from `cs`."""

    def __init__(self, cs: Tensor, Bg: Tensor, Cg: Tensor, groups: int) -> None:
        # cs (b, s, T, H); Bg, Cg (b, s, G, T, N)
        b, s, T, H = cs.shape
        csh = cs.transpose(2, 3)  # (b, s, H, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=cs.device).tril()
        seg = csh.unsqueeze(-1) - csh.unsqueeze(-2)  # (b, s, H, i, j)
        # Above the diagonal: exp of the floor, then exactly zero (no overflow, no subnormals; see `_exp`).
        floor = decay_floor(seg.dtype)
        self.decay = seg.masked_fill_(~causal, floor).clamp_(min=floor).exp_().masked_fill_(~causal, 0.0)
        self.scores = _mm(Cg, Bg.transpose(-1, -2))  # (b, s, G, i, j)
        self.weights = (self.decay.view(b, s, groups, H // groups, T, T) * self.scores.unsqueeze(3)).view(b, s, H, T, T)


class SSDChunks(torch.autograd.Function):
    """y (without D) and final state of the SSD recurrence over whole chunks.

    x (b, n, T, H, P); dt (b, n, T, H) discretised; A (H,); B, C (b, n, T, G, N);
    h0 (b, H, P, N). Returns y (b, n, T, H, P) and the final state (b, H, P, N).
    """

    # Under autocast the products run in its dtype, as the reference's einsums would, and the
    # backward runs under the forward's autocast state (else it would mix the saved dtypes).
    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, h0: Tensor, per_slice: int):
        b, n, T, H, P = x.shape
        G, N = B.shape[-2:]
        hpg = H // G
        cs = torch.cumsum(dt * A, dim=2)  # (b, n, T, H)
        xdt = x * dt.unsqueeze(-1)
        Bg, Cg = _group_major(B.view(b, n, T, G * N), G), _group_major(C.view(b, n, T, G * N), G)

        # State each chunk adds at its end: sum_j exp(cs_end - cs_j) dt_j x_j B_j^T, one product per group.
        to_end = _exp(cs[:, :, -1:] - cs)
        xs = _group_major((xdt * to_end.unsqueeze(-1)).view(b, n, T, H * P), G)  # (b, n, G, T, hpg * P)
        chunk_states = _mm(xs.transpose(-1, -2), Bg).view(b, n, H, P, N)
        chunk_decay = _exp(cs[:, :, -1])  # (b, n, H)
        starts = torch.empty_like(chunk_states)
        h = h0
        for c in range(n):
            starts[:, c] = h
            h = torch.addcmul(chunk_states[:, c], chunk_decay[:, c, :, None, None], h)

        # Read-out of the entering states: exp(cs_i) C_i . h_start, and the in-chunk outputs.
        read = _time_major(_mm(Cg, starts.view(b, n, G, hpg * P, N).transpose(-1, -2)))  # (b, n, T, H * P)
        y = read.view(b, n, T, H, P) * _exp(cs).unsqueeze(-1)
        xh = xdt.permute(0, 1, 3, 2, 4)  # (b, n, H, T, P), a view
        for part in _intra_slices(n, per_slice):
            intra = _Intra(cs[:, part], Bg[:, part], Cg[:, part], G)
            y[:, part] += _mm(intra.weights, xh[:, part]).permute(0, 1, 3, 2, 4)
        ctx.save_for_backward(x, dt, A, B, C, starts, read)
        ctx.per_slice = per_slice
        return y, h

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, gy: Tensor | None, g_final: Tensor | None):
        x, dt, A, B, C, starts, read = ctx.saved_tensors
        b, n, T, H, P = x.shape
        G, N = B.shape[-2:]
        hpg = H // G
        cs = torch.cumsum(dt * A, dim=2)
        xdt = x * dt.unsqueeze(-1)
        Bg, Cg = _group_major(B.view(b, n, T, G * N), G), _group_major(C.view(b, n, T, G * N), G)
        if gy is None:
            gy = x.new_zeros(x.shape)
        d_cs = torch.zeros_like(cs)

        # Read-out of the entering states.
        exp_cs = _exp(cs)
        d_cs += (gy * read.view(b, n, T, H, P)).sum(-1) * exp_cs
        d_read = _group_major((gy * exp_cs.unsqueeze(-1)).view(b, n, T, H * P), G)  # (b, n, G, T, hpg * P)
        d_starts = _mm(d_read.transpose(-1, -2), Cg).view(b, n, H, P, N)
        dC = _time_major(_mm(d_read, starts.view(b, n, G, hpg * P, N)))  # (b, n, T, G * N)

        # Carry across chunks, backwards: h_{c+1} = a_c h_c + s_c.
        chunk_decay = _exp(cs[:, :, -1])
        d_states = torch.empty_like(starts)
        d_decay = torch.empty_like(chunk_decay)
        dh = g_final if g_final is not None else starts.new_zeros(starts[:, 0].shape)
        for c in reversed(range(n)):
            d_states[:, c] = dh
            d_decay[:, c] = (dh * starts[:, c]).sum((-2, -1))
            dh = torch.addcmul(d_starts[:, c], chunk_decay[:, c, :, None, None], dh)
        d_cs[:, :, -1] += d_decay * chunk_decay

        # Chunk states: s = xs^T B per group, xs = dt x exp(cs_end - cs).
        to_end = _exp(cs[:, :, -1:] - cs)
        ds_g = d_states.view(b, n, G, hpg * P, N)
        d_xs = _time_major(_mm(Bg, ds_g.transpose(-1, -2))).view(b, n, T, H, P)
        xs = xdt * to_end.unsqueeze(-1)
        dB = _time_major(_mm(_group_major(xs.view(b, n, T, H * P), G), ds_g))
        d_to_end = (d_xs * xs).sum(-1)  # already times to_end
        d_cs -= d_to_end
        d_cs[:, :, -1] += d_to_end.sum(2)
        d_xdt = d_xs * to_end.unsqueeze(-1)

        # In-chunk outputs, a slice at a time, the (T x T) tensors recomputed.
        xh = xdt.permute(0, 1, 3, 2, 4)
        gyh = gy.permute(0, 1, 3, 2, 4)  # (b, n, H, T, P)
        dBg, dCg = torch.empty_like(Bg), torch.empty_like(Cg)
        for part in _intra_slices(n, ctx.per_slice):
            intra = _Intra(cs[:, part], Bg[:, part], Cg[:, part], G)
            gyp = gyh[:, part]
            d_weights = _mm(gyp, xh[:, part].transpose(-1, -2))  # (b, s, H, i, j)
            d_xdt[:, part] += _mm(intra.weights.transpose(-1, -2), gyp).permute(0, 1, 3, 2, 4)
            s = d_weights.shape[1]
            d_scores = (d_weights.view(b, s, G, hpg, T, T) * intra.decay.view(b, s, G, hpg, T, T)).sum(3)
            d_seg = d_weights.mul_(intra.weights)  # d/d(cs_i - cs_j); zero above the diagonal
            d_cs[:, part] += (d_seg.sum(-1) - d_seg.sum(-2)).transpose(2, 3)
            dCg[:, part] = _mm(d_scores, Bg[:, part])
            dBg[:, part] = _mm(d_scores.transpose(-1, -2), Cg[:, part])
        dB = dB + _time_major(dBg)
        dC = dC + _time_major(dCg)

        dx = d_xdt * dt.unsqueeze(-1)
        d_dt = (d_xdt * x).sum(-1)
        d_a = d_cs.flip(2).cumsum(2).flip(2)  # cs = cumsum(a) along the chunk
        d_dt += d_a * A
        dA = (d_a * dt).sum((0, 1, 2))
        return dx, d_dt, dA, dB.view(B.shape), dC.view(C.shape), dh, None
