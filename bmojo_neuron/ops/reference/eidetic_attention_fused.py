"""Eidetic attention from fused CPU attention kernels, merged by their log-sum-exps.

Same inputs, outputs and math as `eidetic_attention.eidetic_attention` (see its
docstring for the layouts); this is how that op runs on CPU.

The keys of a query split into *pieces*, each an ordinary dense attention problem
that torch's fused CPU kernel (``_scaled_dot_product_flash_attention_for_cpu``, the
kernel behind `scaled_dot_product_attention` on CPU) solves without ever
materialising a score matrix in memory:

* queries and keys are cut in blocks of ``block`` rows; for a band of key
  distances ``d = i - t`` in ``[d_lo, d_hi]`` (in-context: ``[0, w - 1]``, fading:
  ``[w, w + w_f - 1]``, or ``[0, w_f - 1]`` with ``fading_overlap``), query block
  ``b`` meets key block ``b - o`` for a few offsets ``o``, and every such pair has the
  same ``block x block`` mask. So one offset is one kernel call over many blocks at
  once (blocks are the kernel's "heads" axis): inner offsets need no mask at all, the
  two edge ones a fixed triangle. A band that starts on a block edge (the in-context
  band at ``o = 0``; the fading band at ``o = w / block`` when ``block`` divides ``w``)
  has the lower triangle there, which the kernel's own causal flag expresses without
  a mask tensor (not with query groups: the flag reads rows as positions);
* the memory: queries in chunks of ``chunk`` rows against that chunk's ``M`` slots
  (empty slots masked), over the chunks from the first to the last with a valid slot only, since
  an empty memory adds nothing to any softmax and gets zero gradients: none at all when no slot
  is valid, and none for the first ``memory_lag`` chunks of the model, which read the memory
  before any chunk was picked from (at 2K tokens with the default 512-token chunks and lag 3,
  one chunk of four has a memory piece).

Each piece returns its output normalised over its own keys and its log-sum-exp
``lse_p``; the softmax over the union of all keys is then
``out = sum_p exp(lse_p - lse) out_p`` with ``lse = logsumexp_p lse_p``. The merge
happens in the blocked layout ``(N, n_blocks, groups * block, D)``: a part (one kernel
call's output) covers a range of query blocks of it, so its lse is written into one
``(parts, N, blocks, groups * block)`` buffer (``-inf`` outside its range) and its output
added in place into the result, with no per-part padding or layout copy; the memory
piece alone is converted from chunks to blocks. The merged output and lse stay
blocked for the backward.

Key-major runs: the kernel tiles a head's queries by 256 rows from `KEY_MAJOR_ROWS`
(768) query rows on and by 64 below, and the larger tiles are faster per query-key pair.
A band whose pieces sit at consecutive offsets ``o_min .. o_max`` (they always do) and
give one key block that many query rows (the in-context band at ``w = 512`` with 256-row
blocks: offsets 0-2) runs key block by key block instead (`KeyMajorRun`): key block j
and query blocks ``j + o_min .. j + o_max``, consecutive rows of the blocked layout, in
one call under the pieces' masks stacked. Its forward parts reach query blocks of later
slices, which merge them when they come; its backward call returns key block j's whole
gradient (no adds) and shares of the query blocks' ones. Measured at the train step's
shapes (16 heads x 256 rows, one thread, per key block of the in-context band): forward
11.3 ms key-major against 12.4 ms for the three query-major calls, backward 25.4 against
26.7 ms (the stacked mask and the kernel's copy of the output gradient included).

Slices of query blocks: forward and backward run every piece over one slice of
consecutive query blocks (about `SLICE_BYTES` of a blocked tensor) before moving to
the next, so the queries, the keys a few blocks behind them, the outputs and the
gradients a slice's pieces share are read from the CPU caches, not from memory, by all
but the first. Run piece by piece over the whole sequence instead, each kernel call
streams whole tensors, and the kernel's time per block grows with the length
(forward + backward of 256 x 256 tiles, one thread, measured: 0.44 ms per tile over
0.25 MiB tensors, 0.63 ms over 16 MiB ones); sliced, the op at 16K tokens is 10-15 %
faster and the time per token no longer grows with L beyond the windows filling.

Block size: the kernel's time per query-key pair falls with the rows of a block
(forward + backward on one thread, measured: ~12.5 ns at 128 rows, ~10.9 at 256, ~7.8
at 512) while the masked-out share of the edge pieces grows with it; `default_block`
picks the balance (256 at ``w = w_f = 512``).

Backward: the fused kernel's backward, called per piece with the *merged* output and
log-sum-exp, gives exactly that piece's share of the gradients (it recomputes the
probabilities ``exp(s - lse)`` and the row term ``sum(dout * out)`` from what it is
given), so the pieces' gradients add up to the gradient of the whole softmax. This is
the split flash-attention backward uses for key blocks; the gradients add up in the
blocked layout, the first share a block gets copied into it and the later ones added (no
zeroing pass; key block ``j`` gets its shares from query blocks ``j`` and later, so a slice
reaches new blocks while they are in cache). A gradient flowing into the
returned log-sum-exp is folded into the same calls through one extra feature column
(`_fold_lse_gradient`); when the caller drops the lse (the model does) it costs nothing.
 The output gradient is stored
block-major when slices are one block (`_gradient_blocks`), so the query-major calls'
slices are dense in the kernel's own order, which it would otherwise copy at every call.

Work per query is about ``w + w_f + M + 2 * block`` keys, all inside fused kernels;
memory beyond inputs and outputs is O(L) (no L x keys tensor).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

NEG_INF = float("-inf")
# Bytes of one blocked (N, blocks, rows, D) tensor per slice of query blocks: every piece of a slice
# then reads its queries, keys, outputs and gradients from the CPU caches (see the module docstring).
SLICE_BYTES = 1 << 20
# torch's CPU flash kernel tiles a head's queries by 256 rows from 768 query rows on, by 64 below
# (`flash_attention_kernel_impl` in aten/src/ATen/native/cpu/FlashAttentionKernel.cpp): faster per
# query-key pair, so a band runs key block by key block (`KeyMajorRun`) once one key block's query
# blocks hold that many rows.
KEY_MAJOR_ROWS = 768
_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


@dataclass(frozen=True)
class BandPiece:
    """Query block b meets key block b - offset; `mask` (block, block) additive (None: all keys)."""

    keys: str  # "ctx" or "fading"
    offset: int
    mask: Tensor | None
    row_has_key: Tensor | None  # (block,) bool; None: every row has a key
    causal: bool = False  # `mask` is the lower triangle (key column <= query row)


def band_pieces(keys: str, d_lo: int, d_hi: int, block: int, dtype: torch.dtype, device) -> list[BandPiece]:
    """The block offsets whose keys hold distances ``d = i - t`` in [d_lo, d_hi]."""
    rows = torch.arange(block, device=device)[:, None]
    cols = torch.arange(block, device=device)[None, :]
    pieces = []
    first = max(0, -(-(d_lo - block + 1) // block))
    for offset in range(first, (d_hi + block - 1) // block + 1):
        # The block's distances are every integer in offset * block ± (block - 1): decide from
        # the ends, in Python, so building the pieces never reads a tensor back to the host.
        nearest, farthest = offset * block - (block - 1), offset * block + (block - 1)
        if farthest < d_lo or nearest > d_hi:
            continue
        if d_lo <= nearest and farthest <= d_hi:
            pieces.append(BandPiece(keys, offset, None, None))
        else:
            distance = offset * block + rows - cols
            allowed = (distance >= d_lo) & (distance <= d_hi)
            mask = torch.zeros(block, block, dtype=dtype, device=device).masked_fill(~allowed, NEG_INF)
            # Lower triangle: the band starts on the diagonal and reaches past the block's far corner.
            causal = d_lo == offset * block and farthest <= d_hi
            pieces.append(BandPiece(keys, offset, mask, None if causal else allowed.any(dim=1), causal))
    return pieces


def call_pieces(length: int, window: int, fading_window: int, block: int, dtype: torch.dtype, device,
                fading_overlap: bool = False) -> list[BandPiece]:
    """The band pieces one call over `length` queries runs (``fading_window`` 0: no fading keys).

    Only offsets some query block reaches are kept; the fading band exists once the window
    no longer covers the whole sequence (or always, with ``fading_overlap``)."""
    return list(_kept_pieces(length, window, fading_window, block, dtype, device, fading_overlap).pieces)


def call_runs(length: int, window: int, fading_window: int, block: int, groups: int, dtype: torch.dtype, device,
              fading_overlap: bool = False) -> tuple[list[KeyMajorRun], list[BandPiece]]:
    """`call_pieces` split into key-major runs and the pieces left query-major (`_key_major_runs`) for
    `groups` query heads per kv head, kept with the pieces: the stacked masks cost a few fresh
    tensors per call otherwise, at every layer of every step."""
    kept = _kept_pieces(length, window, fading_window, block, dtype, device, fading_overlap)
    key = (groups, KEY_MAJOR_ROWS)  # the threshold is read at call time (tests lower it)
    split = kept.runs.get(key)
    if split is None:
        split = kept.runs[key] = _key_major_runs(kept.pieces, groups, block, dtype, device)
    runs, rest = split
    return list(runs), list(rest)


@dataclass
class _KeptPieces:
    """One settings' pieces and, per (groups, `KEY_MAJOR_ROWS`), their split into runs and query-major pieces."""

    pieces: tuple[BandPiece, ...]
    runs: dict[tuple[int, int], tuple[tuple[KeyMajorRun, ...], tuple[BandPiece, ...]]]


def _kept_pieces(length: int, window: int, fading_window: int, block: int, dtype: torch.dtype, device,
                 fading_overlap: bool) -> _KeptPieces:
    """Every layer of a model asks for the same pieces at every step, so they are made once per settings and
    kept (their masks are only ever read); a tensor made under inference mode is kept apart from one made
    outside it, which autograd may record."""
    key = (length, window, fading_window, block, dtype, str(device), fading_overlap,
           torch.is_inference_mode_enabled())
    kept = _PIECES.get(key)
    if kept is None:
        if len(_PIECES) >= _PIECES_KEPT:
            _PIECES.clear()
        pieces = _make_call_pieces(length, window, fading_window, block, dtype, device, fading_overlap)
        kept = _PIECES[key] = _KeptPieces(pieces, {})
    return kept


_PIECES: dict[tuple, _KeptPieces] = {}
_PIECES_KEPT = 64  # settings kept at most (a model has one or two; tests many)


def _make_call_pieces(length: int, window: int, fading_window: int, block: int, dtype: torch.dtype, device,
                      fading_overlap: bool) -> tuple[BandPiece, ...]:
    window = min(window, length)
    pieces = band_pieces("ctx", 0, window - 1, block, dtype, device)
    if fading_window > 0 and (fading_overlap or window < length):
        nearest = 0 if fading_overlap else window  # overlap: the fading keys span the window's own distances
        pieces += band_pieces("fading", nearest, nearest + fading_window - 1, block, dtype, device)
    n_blocks = -(-length // block)
    return tuple(p for p in pieces if p.offset < n_blocks)


def _to_blocks(x: Tensor, size: int, n: int) -> Tensor:
    """(N, g, L, D) -> (N, n, g * size, D): rows of each block of `size` positions, all groups together."""
    N, g, length, D = x.shape
    x = F.pad(x, (0, 0, 0, n * size - length)) if n * size != length else x
    if g == 1:
        return x.view(N, n, size, D)
    return x.view(N, g, n, size, D).transpose(1, 2).reshape(N, n, g * size, D)


def _from_blocks(x: Tensor, g: int, length: int) -> Tensor:
    """Inverse of `_to_blocks` for (N, n, g * size[, D]): -> (N, g, L[, D])."""
    N, n, rows = x.shape[:3]
    tail = x.shape[3:]
    size = rows // g
    x = x.reshape(N, n, g, size, *tail).transpose(1, 2).reshape(N, g, n * size, *tail)
    return x[:, :, :length]


class _Layout:
    """Shapes and the pieces of one call."""

    def __init__(self, q, k, k_fading, mem_k, mem_valid, window, fading_window, chunk, block, scale, dtype,
                 fading_overlap):
        self.batch, self.q_heads, self.length, self.head_dim = q.shape
        self.kv_heads = k.shape[1]
        self.groups = self.q_heads // self.kv_heads
        self.N = self.batch * self.kv_heads
        self.block = block
        self.n_blocks = -(-self.length // block)
        self.chunk = chunk
        self.scale = scale
        self.dtype, self.device = dtype, q.device
        settings = (self.length, window, fading_window if k_fading is not None else 0, block)
        self.pieces = call_pieces(*settings, dtype, q.device, fading_overlap)
        # A memory with no valid slot anywhere adds exp(-inf) = 0 to every softmax and gets zero gradients: its
        # piece is skipped (the model's memory is empty while the sequence is no longer than `memory_lag`
        # chunks). Reading the flag back is free on eager CPU tensors, the only ones this module takes.
        self.has_memory = mem_k is not None and mem_k.shape[3] > 0
        # Likewise only the chunks from the first to the last one with a valid slot get a memory piece (the model's
        # first `memory_lag` chunks read an empty memory).
        read = mem_valid.any(dim=-1).any(dim=0).nonzero() if self.has_memory else torch.zeros(0, dtype=torch.long)
        self.use_memory = read.numel() > 0
        self.n_chunks = mem_k.shape[2] if self.use_memory else 0
        self.memory_chunks = slice(int(read[0]), int(read[-1]) + 1) if self.use_memory else slice(0, 0)
        self.runs, self.query_major = call_runs(*settings, self.groups, dtype, q.device, fading_overlap)

    def slices(self, head_dim: int, itemsize: int) -> list[tuple[int, int]]:
        """Consecutive ranges ``[s, e)`` of query blocks, each holding about `SLICE_BYTES` of one blocked
        (N, blocks, groups * block, head_dim) tensor."""
        per_block = self.N * self.groups * self.block * head_dim * itemsize
        step = max(1, SLICE_BYTES // per_block)
        return [(s, min(s + step, self.n_blocks)) for s in range(0, self.n_blocks, step)]

    def canon(self, x: Tensor) -> Tensor:
        """(batch, heads, L, D) -> (N, heads per kv head, L, D), a view."""
        return x.reshape(self.N, -1, *x.shape[2:])

    def blocks(self, x: Tensor) -> Tensor:
        return _to_blocks(x, self.block, self.n_blocks)

    def chunks(self, x: Tensor) -> Tensor:
        return _to_blocks(x, self.chunk, self.n_chunks)

    def tile_rows(self, t: Tensor | None) -> Tensor | None:
        return None if t is None else _tile_rows(t, self.groups)


def _tile_rows(t: Tensor, groups: int) -> Tensor:
    """A per-row (block, ...) tensor repeated for every query group: (groups * block, ...)."""
    return t if groups == 1 else t.repeat(groups, *(1,) * (t.dim() - 1))


def _memory_bias(mem_valid: Tensor, layout: _Layout, dtype: torch.dtype) -> Tensor:
    """Additive mask (N, chunks, 1, M) from mem_valid (batch, chunks, M)."""
    bias = torch.zeros(mem_valid.shape, dtype=dtype, device=mem_valid.device).masked_fill(~mem_valid, NEG_INF)
    return bias[:, None, :, None, :].expand(-1, layout.kv_heads, -1, -1, -1).reshape(layout.N, mem_valid.shape[1], 1, -1)


def _memory_operands(layout: _Layout, q, mem_k, mem_v, mem_valid) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The memory piece's kernel inputs over `layout.memory_chunks` only: query chunks (N, chunks, g * chunk, D),
    memory keys and values (N, chunks, M, D), the additive mask (N, chunks, 1, M) and the chunks' validity."""
    read = layout.memory_chunks
    mk = mem_k.reshape(layout.N, layout.n_chunks, *mem_k.shape[3:])[:, read]
    mv = mem_v.reshape(layout.N, layout.n_chunks, *mem_v.shape[3:])[:, read]
    valid = mem_valid[:, read]
    return layout.chunks(layout.canon(q))[:, read], mk, mv, _memory_bias(valid, layout, q.dtype), valid


def _kernel_mask(layout: _Layout, piece: BandPiece) -> tuple[Tensor | None, bool]:
    """(attn_mask, is_causal) for a piece's kernel call: the kernel's own causal flag needs no mask tensor
    to read (and may skip tiles past the diagonal), but it reads rows as positions, so not with query
    groups (their rows are several copies of one block's positions)."""
    if piece.causal and layout.groups == 1:
        return None, True
    return layout.tile_rows(piece.mask), False


def _memory_forward(layout: _Layout, q, mem_k, mem_v, mem_valid) -> tuple[Tensor, Tensor]:
    """The memory piece's (output, lse), computed per chunk and returned in the blocked layout (output 0 and lse
    -inf outside `layout.memory_chunks`)."""
    g, L = layout.groups, layout.length
    qc, mk, mv, bias, valid = _memory_operands(layout, q, mem_k, mem_v, mem_valid)
    part_out, part_lse = _flash(qc, mk, mv, attn_mask=bias, scale=layout.scale)
    any_valid = valid.any(dim=-1)[:, None, :, None].expand(-1, layout.kv_heads, -1, -1)
    out = part_out.new_zeros(layout.N, layout.n_chunks, *part_out.shape[2:])
    lse = part_lse.new_full((layout.N, layout.n_chunks, part_lse.shape[2]), NEG_INF)
    out[:, layout.memory_chunks] = part_out
    lse[:, layout.memory_chunks] = part_lse.masked_fill(~any_valid.reshape(layout.N, -1, 1), NEG_INF)
    return layout.blocks(_from_blocks(out, g, L)), layout.blocks(_from_blocks(lse, g, L)[..., None])[..., 0]


def _forward(layout: _Layout, q, k, v, k_fading, v_fading, mem_k, mem_v, mem_valid) -> tuple[Tensor, Tensor]:
    """Merged (output, lse) in the blocked layout (N, n, g * block, D) / (N, n, g * block), a slice of query
    blocks at a time (`_forward_slice`); the memory piece is computed for the whole sequence first."""
    qb = layout.blocks(layout.canon(q))
    keys = {"ctx": (layout.blocks(layout.canon(k)), layout.blocks(layout.canon(v)))}
    if k_fading is not None:
        keys["fading"] = (layout.blocks(layout.canon(k_fading)), layout.blocks(layout.canon(v_fading)))
    memory = _memory_forward(layout, q, mem_k, mem_v, mem_valid) if layout.use_memory else None
    merged = torch.empty_like(qb)
    lse = qb.new_empty(qb.shape[:3])
    pending: list[tuple[int, Tensor, Tensor]] = []  # key-major parts reaching query blocks of later slices
    for s, e in layout.slices(qb.shape[-1], qb.element_size()):
        parts = [part for part in pending if part[0] + part[1].shape[1] > s]
        for run in layout.runs:
            parts += _key_major_forward(layout, run, s, e, qb, keys[run.keys])
        pending = [part for part in parts if part[0] + part[1].shape[1] > e]
        parts += _query_major_forward(layout, qb, keys, s, e)
        if memory is not None:
            parts.append((s, memory[0][:, s:e], memory[1][:, s:e]))
        _merge(parts, s, e, merged[:, s:e], lse[:, s:e])
    return merged, lse


def _query_major_forward(layout: _Layout, qb, keys, s: int, e: int) -> list[tuple[int, Tensor, Tensor]]:
    """(first query block, output, lse) of every query-major piece over query blocks [s, e): one call per piece
    over all of them (query blocks before a piece's offset have no key block at it)."""
    parts = []
    for piece in layout.query_major:
        first = max(s, piece.offset)
        if first >= e:
            continue
        kb, vb = keys[piece.keys]
        mask, causal = _kernel_mask(layout, piece)
        keys_from, keys_to = first - piece.offset, e - piece.offset
        out, piece_lse = _flash(qb[:, first:e], kb[:, keys_from:keys_to], vb[:, keys_from:keys_to],
                                is_causal=causal, attn_mask=mask, scale=layout.scale)
        if piece.row_has_key is not None:
            piece_lse.masked_fill_(~layout.tile_rows(piece.row_has_key), NEG_INF)
        parts.append((first, out, piece_lse))
    return parts


def _key_major_forward(layout: _Layout, run: KeyMajorRun, s: int, e: int, qb, keys) -> list[tuple[int, Tensor, Tensor]]:
    """(first query block, output, lse) of a run's calls for the key blocks whose first query block is in [s, e);
    each reaches up to ``run.length`` query blocks, later slices' ones too."""
    kb, vb = keys
    N, n_blocks, rows, D = qb.shape
    parts = []
    for j, first, last in _run_windows(run, s, e, n_blocks):
        n = last - first
        out, part_lse = _flash(qb[:, first:last].reshape(N, 1, n * rows, D), kb[:, j:j + 1], vb[:, j:j + 1],
                               attn_mask=run.masks[:n * rows], scale=layout.scale)
        if run.row_has_key is not None:
            part_lse.masked_fill_(~run.row_has_key[:n * rows], NEG_INF)
        parts.append((first, out.reshape(N, n, rows, D), part_lse.reshape(N, n, rows)))
    return parts


def _merge(parts: list[tuple[int, Tensor, Tensor]], s: int, e: int, merged: Tensor, lse: Tensor) -> None:
    """Merge the parts (first query block, output, lse) over query blocks [s, e) into `merged` and `lse` (views of
    the result).

    The parts' lses go into one (parts, N, e - s, g * block) buffer, -inf where a part has no query block;
    their logsumexp is the merged lse, and each part's output is added into the result rescaled by
    ``exp(lse_p - lse)``."""
    lses = torch.full((len(parts), *lse.shape), NEG_INF, dtype=lse.dtype, device=lse.device)
    spans = []
    for i, (first, out, part_lse) in enumerate(parts):
        lo, hi = max(first, s), min(first + out.shape[1], e)
        lses[i, :, lo - s:hi - s] = part_lse[:, lo - first:hi - first]
        spans.append((lo - s, hi - s, out[:, lo - first:hi - first]))
    torch.logsumexp(lses, dim=0, out=lse)  # finite: every query sees its own key
    # A part covering the whole slice (there is one unless key-major parts end inside it) is written first, so
    # the result needs no zeroing pass.
    order = sorted(range(len(parts)), key=lambda i: spans[i][:2] != (0, e - s))
    for i in order:
        lo, hi, out = spans[i]
        weight = torch.exp(lses[i, :, lo:hi] - lse[:, lo:hi])[..., None]
        if i == order[0] and (lo, hi) == (0, e - s):
            torch.mul(out, weight, out=merged)
            continue
        if i == order[0]:
            merged.zero_()
        merged[:, lo:hi].addcmul_(out, weight)


def _run_windows(run: KeyMajorRun, s: int, e: int, n_blocks: int) -> list[tuple[int, int, int]]:
    """(key block j, first query block, end query block) of a run's calls whose first query block is in [s, e)."""
    windows = []
    for j in range(max(0, s - run.first), min(e, n_blocks) - run.first):
        first = j + run.first
        windows.append((j, first, min(first + run.length, n_blocks)))
    return windows


class _EideticAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, k_fading, v_fading, mem_k, mem_v, mem_valid, layout):
        ctx.set_materialize_grads(False)  # an unused output (the model drops the lse) costs nothing in backward
        out, lse = _forward(layout, q, k, v, k_fading, v_fading, mem_k, mem_v, mem_valid)
        ctx.layout = layout
        ctx.save_for_backward(q, k, v, k_fading, v_fading, mem_k, mem_v, mem_valid, out, lse)
        shape = (layout.batch, layout.q_heads, layout.length)
        g, L = layout.groups, layout.length
        return (_from_blocks(out, g, L).reshape(*shape, layout.head_dim),
                _from_blocks(lse[..., None], g, L).reshape(shape))

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, k_fading, v_fading, mem_k, mem_v, mem_valid, out, lse = ctx.saved_tensors
        layout: _Layout = ctx.layout
        if grad_out is None and grad_lse is None:
            return (None,) * 9
        grad = _gradient_blocks(layout, grad_out, out, ones_column=grad_lse is not None)
        keys = (q, k, v, k_fading, v_fading, mem_k, mem_v)
        if grad_lse is not None:
            grad_lse = layout.blocks(layout.canon(grad_lse.contiguous()[..., None]))
            keys, out = _fold_lse_gradient(keys, out, grad_lse)
        grads = _backward_pieces(layout, *keys, mem_valid, grad, out, lse)
        if layout.has_memory and not layout.use_memory:  # an empty memory: its gradients are zeros, as before
            grads = (*grads[:5], torch.zeros_like(mem_k), torch.zeros_like(mem_v))
        head_dim = layout.head_dim
        return (*(None if t is None else t[..., :head_dim] for t in grads), None, None)


def _gradient_blocks(layout: _Layout, grad_out: Tensor | None, like: Tensor, ones_column: bool) -> Tensor:
    """The output gradient in the blocked layout of `like` (N, n, g * block, D), plus a column of ones with
    `ones_column` (`_fold_lse_gradient`), copied from `grad_out` (batch, q heads, L, D; None: zeros) of any
    strides in one pass.

    torch's CPU flash backward copies its output gradient into its own (N, rows, blocks, D) order at every
    call unless it is dense in that order already (``grad_out.contiguous()`` in its kernel): that is a copy
    of the slice per piece. When every slice is one query block (`_Layout.slices`; the train step's shapes)
    the gradient is stored block-major, so each slice's part is dense in that order and no call copies it."""
    N, n, rows, D = like.shape
    width = D + ones_column
    one_block = all(e - s == 1 for s, e in layout.slices(width, like.element_size()))
    grad = like.new_empty(n, N, rows, width).transpose(0, 1) if one_block else like.new_empty(N, n, rows, width)
    if ones_column:
        grad[..., D].fill_(1)
    target = grad[..., :D]
    if grad_out is None:
        target.zero_()
        return grad
    block, length = layout.block, layout.length
    if n * block != length:
        grad_out = F.pad(grad_out, (0, 0, 0, n * block - length))
    # Both as (batch, kv head, block, group, row, D): one copy whatever the strides of grad_out.
    source = grad_out.unflatten(1, (layout.kv_heads, layout.groups)).unflatten(3, (n, block)).transpose(2, 3)
    target.unflatten(0, (layout.batch, layout.kv_heads)).unflatten(3, (layout.groups, block)).copy_(source)
    return grad


def _fold_lse_gradient(keys, out, grad_lse):
    """Inputs for the fused backward that also carry the gradient flowing into the log-sum-exp.

    The kernel's score gradient is ``p * (dO . v - D)`` with ``D = rowsum(dO * out)``;
    ``d lse / d s = p`` adds ``grad_lse * p``, i.e. ``D`` becomes ``D - grad_lse``. One
    extra feature column does that without touching anything else: ``dO`` gains a
    column of ones (`_gradient_blocks`) and ``out`` one of ``-grad_lse`` (so ``D`` gains
    ``-grad_lse``), while q, k, v gain a column of zeros (scores and ``dO . v`` unchanged,
    the scale is passed explicitly). The extra column of every returned gradient is
    dropped by the caller.
    """
    pad = (lambda t: None if t is None else F.pad(t, (0, 1)))
    return [pad(t) for t in keys], torch.cat([out, -grad_lse.to(out.dtype)], dim=-1)


def _memory_backward(layout: _Layout, q, mem_k, mem_v, mem_valid, grad, out, lse):
    """The memory piece's (dq over the query rows of `layout.memory_chunks` (N, g, rows, D) and the first of those
    rows, d mem_k, d mem_v); grad, out, lse blocked."""
    g, L, read = layout.groups, layout.length, layout.memory_chunks
    chunks = (lambda x: layout.chunks(_from_blocks(x, g, L))[:, read])
    qc, mk, mv, bias, _ = _memory_operands(layout, q, mem_k, mem_v, mem_valid)
    dq, dk_part, dv_part = _flash_backward(
        chunks(grad), qc, mk, mv, chunks(out), chunks(lse[..., None])[..., 0], 0.0, False, attn_mask=bias,
        scale=layout.scale)
    d_mem_k, d_mem_v = torch.zeros_like(mem_k), torch.zeros_like(mem_v)
    d_mem_k.view(layout.N, layout.n_chunks, *mem_k.shape[3:])[:, read] = dk_part
    d_mem_v.view(layout.N, layout.n_chunks, *mem_v.shape[3:])[:, read] = dv_part
    first_row = read.start * layout.chunk
    return _from_blocks(dq, g, L - first_row), first_row, d_mem_k, d_mem_v


def _backward_pieces(layout: _Layout, q, k, v, k_fading, v_fading, mem_k, mem_v, mem_valid, grad, out, lse):
    """Gradients of q, k, v, k_fading, v_fading, mem_k, mem_v: every piece's fused backward, given the merged
    output and log-sum-exp (blocked layout), adds that piece's share, a slice of query blocks at a time."""
    g = layout.groups
    qb = layout.blocks(layout.canon(q))
    tensors = {"ctx": (k, v), "fading": (k_fading, v_fading)}
    blocked = {name: tuple(layout.blocks(layout.canon(t)) for t in tensors[name])
               for name in dict.fromkeys(piece.keys for piece in layout.pieces)}
    dq = torch.empty_like(qb)
    grads = {name: (torch.empty_like(kb), torch.empty_like(vb)) for name, (kb, vb) in blocked.items()}
    # Blocks [0, written) of a gradient hold a sum, the others nothing yet (`_add_blocks`): key block j gets its
    # shares from query blocks j and later (offsets >= 0), so a slice reaches new blocks while they are in cache.
    written = dict.fromkeys(("q", *grads), 0)
    for s, e in layout.slices(qb.shape[-1], qb.element_size()):
        for run in layout.runs:
            _key_major_backward(layout, run, s, e, qb, blocked[run.keys], grad, out, lse, dq, grads[run.keys], written)
        for piece in layout.query_major:
            first = max(s, piece.offset)
            if first >= e:
                continue
            kb, vb = blocked[piece.keys]
            mask, causal = _kernel_mask(layout, piece)
            keys = slice(first - piece.offset, e - piece.offset)
            dq_p, dk_p, dv_p = _flash_backward(grad[:, first:e], qb[:, first:e], kb[:, keys], vb[:, keys],
                                               out[:, first:e], lse[:, first:e], 0.0, causal, attn_mask=mask,
                                               scale=layout.scale)
            written["q"] = _add_blocks(dq, first, dq_p, written["q"])
            dk, dv = grads[piece.keys]
            _add_blocks(dv, keys.start, dv_p, written[piece.keys])
            written[piece.keys] = _add_blocks(dk, keys.start, dk_p, written[piece.keys])
    for name, total in (("q", dq), *((name, t) for name, pair in grads.items() for t in pair)):
        total[:, written[name]:].zero_()  # blocks no piece reached (key blocks behind the last query block)
    d_q = _from_blocks(dq, g, layout.length)
    d_mem_k = d_mem_v = None
    if layout.use_memory:
        dq_m, first_row, d_mem_k, d_mem_v = _memory_backward(layout, q, mem_k, mem_v, mem_valid, grad, out, lse)
        d_q[:, :, first_row:first_row + dq_m.shape[2]] += dq_m  # d_q is this function's own tensor (a view of dq)

    def unblock(t: Tensor | None, like: Tensor | None) -> Tensor | None:
        return None if t is None else _from_blocks(t, 1, layout.length).view_as(like)

    d_k, d_v = (unblock(t, k) for t in grads["ctx"])
    d_kf = d_vf = None
    if "fading" in grads:
        d_kf, d_vf = (unblock(t, k_fading) for t in grads["fading"])
    return d_q.reshape_as(q), d_k, d_v, d_kf, d_vf, d_mem_k, d_mem_v


@dataclass(frozen=True)
class KeyMajorRun:
    """The band pieces of one key tensor at consecutive offsets ``first ..``, run key block by key block: key
    block j meets query blocks ``j + first`` to ``j + first + length - 1``, whose rows are consecutive in the
    blocked layout, in one kernel call under the pieces' masks stacked (`masks`, (length * rows, block))."""

    keys: str
    first: int
    length: int
    masks: Tensor
    row_has_key: Tensor | None  # (length * rows,) bool; None: every row has a key


def _key_major_runs(pieces: tuple[BandPiece, ...], groups: int, block: int, dtype: torch.dtype, device
                    ) -> tuple[tuple[KeyMajorRun, ...], tuple[BandPiece, ...]]:
    """The key-major runs (bands whose pieces reach `KEY_MAJOR_ROWS` query rows per key block) and the pieces
    left to run query block by query block."""
    runs, rest = [], []
    rows = groups * block

    for name in dict.fromkeys(piece.keys for piece in pieces):
        band = [piece for piece in pieces if piece.keys == name]
        consecutive = [piece.offset for piece in band] == list(range(band[0].offset, band[0].offset + len(band)))
        if not consecutive or len(band) < 2 or len(band) * rows < KEY_MAJOR_ROWS:
            rest += band
            continue
        # Every piece keeps its mask (the lower-triangle ones too): one call cannot mix the causal flag and a mask.
        all_keys = torch.zeros(rows, block, dtype=dtype, device=device)
        masks = torch.cat([all_keys if piece.mask is None else _tile_rows(piece.mask, groups) for piece in band])
        row_has_key = None
        if any(piece.row_has_key is not None for piece in band):
            every_row = torch.ones(rows, dtype=torch.bool, device=device)
            row_has_key = torch.cat([every_row if piece.row_has_key is None else _tile_rows(piece.row_has_key, groups)
                                     for piece in band])
        runs.append(KeyMajorRun(name, band[0].offset, len(band), masks, row_has_key))
    return tuple(runs), tuple(rest)


def _key_major_backward(layout: _Layout, run: KeyMajorRun, s: int, e: int, qb, keys, grad, out, lse, dq, totals,
                        written: dict) -> None:
    """A run's backward for the key blocks whose first query block is in the slice [s, e): one call per key
    block over all its query blocks, adding its share into `dq` and writing the key block's whole gradient
    (every query block that reads it is in the call)."""
    kb, vb = keys
    dk, dv = totals
    N, n_blocks, rows = qb.shape[:3]
    for j, first, last in _run_windows(run, s, e, n_blocks):
        n = last - first

        def window(t: Tensor) -> Tensor:
            return t[:, first:last].reshape(N, 1, n * rows, *t.shape[3:])

        dq_p, dk_p, dv_p = _flash_backward(window(grad), window(qb), kb[:, j:j + 1], vb[:, j:j + 1], window(out),
                                           window(lse), 0.0, False, attn_mask=run.masks[:n * rows],
                                           scale=layout.scale)
        written["q"] = _add_blocks(dq, first, dq_p.reshape(N, n, rows, dq_p.shape[-1]), written["q"])
        _add_blocks(dv, j, dv_p, written[run.keys])
        written[run.keys] = _add_blocks(dk, j, dk_p, written[run.keys])


def _add_blocks(total: Tensor, start: int, part: Tensor, written: int) -> int:
    """Add `part` (N, n, ...) into blocks [start, start + n) of `total`, whose blocks [0, written) hold values and
    the others nothing yet; returns the new frontier. Copied where nothing is written yet, added elsewhere, so
    no block is zeroed first (a gap before `start` is zeroed)."""
    end = start + part.shape[1]
    if start > written:
        total[:, written:start].zero_()
        written = start
    split = min(written, end)
    if split > start:
        total[:, start:split] += part[:, :split - start]
    if end > split:
        total[:, split:end].copy_(part[:, split - start:])
    return max(written, end)


def eidetic_attention_fused(q, k, v, k_fading, v_fading, mem_k, mem_v, mem_valid, *, window: int,
                            fading_window: int, chunk: int, scale: float | None, block: int | None,
                            fading_overlap: bool = False) -> tuple[Tensor, Tensor]:
    """`eidetic_attention` on fused CPU kernels (inputs already checked); math in float32 or float64."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    block = block or default_block(window, q.shape[2])
    layout = _Layout(q, k, k_fading, mem_k, mem_valid, window, fading_window, chunk, block, scale, dtype,
                     fading_overlap)
    cast = (lambda t: None if t is None else t.to(dtype).contiguous())
    use_fading = any(p.keys == "fading" for p in layout.pieces)
    out, lse = _EideticAttention.apply(
        cast(q), cast(k), cast(v), cast(k_fading) if use_fading else None, cast(v_fading) if use_fading else None,
        cast(mem_k) if layout.has_memory else None, cast(mem_v) if layout.has_memory else None,
        mem_valid if layout.has_memory else None, layout)
    return out.to(q.dtype), lse


def default_block(window: int, length: int) -> int:
    """Query/key block rows. A band costs about ``window + block`` keys per query, so smaller blocks
    waste less; but the fused kernel's time per query-key pair falls with the rows per block
    (forward + backward, one thread: ~12.5 ns at 128 rows, ~10.9 at 256, ~7.8 at 512), so larger ones
    compute the extra keys faster. At w = w_f = 512 the two balance best at 256 rows."""
    return max(16, min(256, window // 2, length))
