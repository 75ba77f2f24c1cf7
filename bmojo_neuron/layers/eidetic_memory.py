"""Innovation scoring and eidetic-memory selection (docs/design.md, "The model", steps 2-4).

Tokens are grouped in chunks of ``c``. After each chunk the ``k`` tokens of largest
innovation are picked (ties: lower position first) and merged with the memory: the
``M`` entries of highest retention score ``innovation * decay ** age_in_chunks``
survive (ties: the more recent entry wins). Chunk ``j`` reads the memory as it stood
after chunk ``j - lag``.

Two forms compute the same memories:

* `select_memory` (the parallel forward) computes the memory after *every* chunk at
  once. Every entry's score decays by the same factor per chunk, so the ranking of
  the entries never changes with age: the memory after chunk ``j`` is the top ``M``
  of *all* picks up to chunk ``j``, ranked by their scores at ``j``. So the picks of
  all chunks are one batched sort over ``(batch, chunks, c)``, and the memories of a
  block of chunks are one masked sort over ``(batch, chunks in block, candidates)``
  (picks of later chunks masked out), with the memory before the block as the only
  carried state. Blocks only bound the work (``chunks x candidates``) on long
  sequences with small chunks.
* `update_memory` (the decode cache, when a chunk completes) merges one chunk's picks
  into the memory.

Both rank candidates with the same arithmetic (`retention_scores`) and the same tie
rule (stable sorts: recency first, then score), so forward and decode keep the same
tokens in the same slot order; `tests/test_layers.py` checks both against a loop of
`update_memory` and the dense rule of bmojo.md. Every step is a fixed-size sort or
gather: no data-dependent shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .eager_gate import eager_untraced

NEG_INF = float("-inf")
# Masked-sort work per batch row and block: chunks in the block x candidates.
BLOCK_ELEMENTS = 1 << 16


@dataclass
class MemoryState:
    """The eidetic memory of one layer for a batch: ``M`` slots.

    ``k`` are stored un-rotated; the reader rotates them to its own memory position.
    Empty slots have ``position == -1``. The tensors may carry extra axes between
    batch and slot (e.g. one memory per chunk: (batch, n_chunks, M, ...)).
    """

    k: Tensor  # (batch, M, kv_heads, head_dim)
    v: Tensor  # (batch, M, kv_heads, head_dim)
    innovation: Tensor  # (batch, M), innovation when picked
    position: Tensor  # (batch, M) long, token position or -1
    pick_chunk: Tensor  # (batch, M) long, chunk in which the token was picked

    @classmethod
    def empty(cls, batch: int, size: int, kv_heads: int, head_dim: int, like: Tensor) -> MemoryState:
        zeros = like.new_zeros(batch, size, kv_heads, head_dim)
        index = torch.full((batch, size), -1, dtype=torch.long, device=like.device)
        return cls(zeros, zeros.clone(), like.new_zeros(batch, size), index, index.clone())

    @property
    def valid(self) -> Tensor:
        return self.position >= 0

    def reorder(self, index: Tensor) -> MemoryState:
        return MemoryState(*(t.index_select(0, index) for t in self._tensors()))

    def at(self, chunk: int) -> MemoryState:
        """One memory out of a per-chunk stack (batch, n_chunks, M, ...)."""
        return MemoryState(*(t[:, chunk] for t in self._tensors()))

    def clone(self) -> MemoryState:
        return MemoryState(*(t.clone() for t in self._tensors()))

    def _tensors(self) -> tuple[Tensor, ...]:
        return self.k, self.v, self.innovation, self.position, self.pick_chunk


class Selection(NamedTuple):
    """Which tokens fill the memory slots: (batch, ..., M) each; empty slots have position -1."""

    position: Tensor
    innovation: Tensor
    pick_chunk: Tensor


def innovation_scores(k_raw: Tensor, k_predicted: Tensor) -> Tensor:
    """``e_t = mean((K_t - K_hat_t)^2)`` over kv heads and head dim; inputs (batch, L, kv_heads, head_dim).

    The squared error is one op (`mse_loss`), forward and backward, where ``(a - b).pow(2)`` is two
    passes forward and four back; the same float operations (a difference, then its square).
    """
    return F.mse_loss(k_predicted, k_raw, reduction="none").mean(dim=(-2, -1))


def next_token_innovation(k_raw: Tensor, k_next: Tensor) -> Tensor:
    """`innovation_scores` of ``K_t`` against ``K_hat_t = k_next[t - 1]`` (``K_hat_0 = 0``); (batch, L).

    Row t of `k_next` predicts the key of token t + 1 (the forward's ``P(S_t)``); `k_raw` is read
    detached. Row L - 1 predicts past the sequence and gets no gradient. An eager run scores the
    shifted views in one autograd step (`_NextTokenInnovation`: no shifted copy of the keys, one
    product for the gradient); a traced graph keeps the plain ops, which give the same numbers.
    """
    k_raw = k_raw.detach()
    if eager_untraced(k_raw, k_next) and k_raw.dtype == k_next.dtype:
        return _NextTokenInnovation.apply(k_raw, k_next)
    target = torch.cat([k_raw[:, 1:], k_raw[:, -1:]], dim=1)
    ahead = innovation_scores(target, k_next)
    first = k_raw[:, :1].pow(2).mean(dim=(-2, -1))  # K_hat_0 = 0
    return torch.cat([first, ahead[:, :-1]], dim=1)


class _NextTokenInnovation(torch.autograd.Function):
    """`next_token_innovation` from one error tensor: row 0 ``-K_0`` (``K_hat_0 = 0``), row t
    ``k_next[t - 1] - K_t``; the score is its mean square over heads and head dim.

    The float operations are `mse_loss`'s and `mean`'s (a difference, its square, the same
    reduction; the gradient ``2 * error * grad / n``), so in float32 and float64 the scores and
    the gradient keep the plain formula's bits (a half-precision loss kernel that squares in a
    wider type may round differently). The plain ops would copy the shifted keys forward and
    take three passes (the mean's expansion, the loss's zeroed buffer and its product) backward.
    """

    @staticmethod
    def forward(ctx, k_raw: Tensor, k_next: Tensor) -> Tensor:
        error = torch.empty_like(k_next, memory_format=torch.contiguous_format)
        torch.neg(k_raw[:, :1], out=error[:, :1])
        torch.sub(k_next[:, :-1], k_raw[:, 1:], out=error[:, 1:])
        ctx.save_for_backward(error)
        return (error * error).mean(dim=(-2, -1))

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, Tensor]:
        (error,) = ctx.saved_tensors
        scale = grad.div(error.shape[-2] * error.shape[-1]).mul_(2)[:, 1:, None, None]
        grad_next = torch.empty_like(error)
        torch.mul(error[:, 1:], scale, out=grad_next[:, :-1])
        grad_next[:, -1:].zero_()  # row L - 1 predicts past the sequence
        return None, grad_next


def pick_tokens(innovation: Tensor, picks: int) -> Tensor:
    """Indices (..., picks) of the largest innovations along the last axis (..., n); ties: lower index first."""
    order = torch.sort(innovation, dim=-1, descending=True, stable=True).indices
    return order[..., :picks]


def retention_scores(innovation: Tensor, pick_chunk: Tensor, chunk_index: Tensor | int, eligible: Tensor,
                     decay: float) -> Tensor:
    """Score ``innovation * decay ** (chunk_index - pick_chunk)``; ``-inf`` where not `eligible`.

    With ``decay = 0``, ``0 ** 0 = 1`` keeps new picks at their innovation and older
    entries at 0 (a FIFO once recency breaks the ties).
    """
    age = (chunk_index - pick_chunk).to(innovation.dtype)
    score = innovation * torch.pow(torch.full_like(age, decay), age)
    return score.masked_fill(~eligible, NEG_INF)


def _keep_best(position: Tensor, score: Tensor, size: int) -> Tensor:
    """Indices of the `size` best candidates along the last axis: score first, then recency.

    position: (..., C) (-1 for empty, so empties rank last among equal scores);
    score: (..., J, C) or (..., C), one row of scores per target memory.
    """
    # Sorted as float32: torch-xla lowers sort to the Neuron compiler's TopK, which refuses
    # integer input (NCC_EVRF013). Positions below 2**24 are exact in float32: same order.
    by_recency = torch.sort(position.to(torch.float32), dim=-1, descending=True, stable=True).indices
    if score.dim() > position.dim():
        by_recency = by_recency.unsqueeze(-2).expand(score.shape)
    by_score = torch.sort(score.gather(-1, by_recency), dim=-1, descending=True, stable=True).indices
    return by_recency.gather(-1, by_score[..., :size])


def merge_into_memory(
    memory: MemoryState,
    new_k: Tensor,
    new_v: Tensor,
    new_innovation: Tensor,
    new_position: Tensor,
    chunk_index: int | Tensor,
    decay: float,
) -> MemoryState:
    """Memory after chunk `chunk_index` (an int, or a 0-d tensor in a compiled decode step): the best ``M`` of
    old entries and new picks.

    Score = innovation * decay ** (chunk_index - pick_chunk); empty slots never win;
    equal scores go to the more recent (higher position) entry.
    """
    size = memory.position.shape[1]
    new_chunk = torch.zeros_like(new_position) + chunk_index
    k = torch.cat([memory.k, new_k], dim=1)
    v = torch.cat([memory.v, new_v], dim=1)
    innovation = torch.cat([memory.innovation, new_innovation], dim=1)
    position = torch.cat([memory.position, new_position], dim=1)
    pick_chunk = torch.cat([memory.pick_chunk, new_chunk], dim=1)
    score = retention_scores(innovation, pick_chunk, chunk_index, position >= 0, decay)
    keep = _keep_best(position, score, size)

    def take(t: Tensor) -> Tensor:
        index = keep.view(keep.shape + (1,) * (t.dim() - 2)).expand(keep.shape + t.shape[2:])
        return t.gather(1, index)

    return MemoryState(take(k), take(v), take(innovation), take(position), take(pick_chunk))


def update_memory(
    memory: MemoryState,
    chunk_k: Tensor,
    chunk_v: Tensor,
    chunk_innovation: Tensor,
    chunk_start: int | Tensor,
    chunk_index: int | Tensor,
    picks: int,
    decay: float,
) -> MemoryState:
    """Pick from one complete chunk (tensors (batch, c, ...)) and merge the picks into `memory`; the chunk's start
    and index are ints or 0-d tensors."""
    index = pick_tokens(chunk_innovation, picks)
    gather_vec = index[:, :, None, None].expand(-1, -1, *chunk_k.shape[2:])
    return merge_into_memory(
        memory,
        chunk_k.gather(1, gather_vec),
        chunk_v.gather(1, gather_vec),
        chunk_innovation.gather(1, index),
        index + chunk_start,
        chunk_index,
        decay,
    )


def empty_selection(batch: int, size: int, like: Tensor, chunks: int | None = None) -> Selection:
    """`Selection` of empty slots, (batch, size) or with a chunk axis (batch, chunks, size)."""
    shape = (batch, size) if chunks is None else (batch, chunks, size)
    index = torch.full(shape, -1, dtype=torch.long, device=like.device)
    return Selection(index, like.new_zeros(shape), index.clone())


def select_memory(innovation: Tensor, *, chunk: int, picks: int, size: int, decay: float) -> Selection:
    """Which tokens are in memory after every complete chunk: (batch, n_chunks, size) each.

    `innovation` (batch, L) is read detached. See the module docstring for the method.
    """
    innovation = innovation.detach()
    batch, length = innovation.shape
    n_chunks = length // chunk
    if n_chunks == 0 or size == 0:
        return empty_selection(batch, size, innovation, chunks=n_chunks)
    per_chunk = innovation[:, : n_chunks * chunk].view(batch, n_chunks, chunk)
    index = pick_tokens(per_chunk, picks)  # (batch, n_chunks, k)
    chunk_ids = torch.arange(n_chunks, device=innovation.device)
    pick_position = index + (chunk_ids * chunk)[:, None]
    pick_innovation = per_chunk.gather(-1, index)
    pick_chunk = chunk_ids[:, None].expand_as(index)

    block = _chunks_per_block(size, picks, n_chunks)
    memory = empty_selection(batch, size, innovation)
    states = []
    for first in range(0, n_chunks, block):
        last = min(first + block, n_chunks)
        # Candidates: the memory before the block, then every pick of the block.
        position = torch.cat([memory.position, pick_position[:, first:last].flatten(1)], dim=1)
        cand_innovation = torch.cat([memory.innovation, pick_innovation[:, first:last].flatten(1)], dim=1)
        cand_chunk = torch.cat([memory.pick_chunk, pick_chunk[:, first:last].flatten(1)], dim=1)
        targets = chunk_ids[first:last, None]  # (J, 1): memory after chunk j sees picks of chunks <= j
        eligible = (position >= 0)[:, None, :] & (cand_chunk[:, None, :] <= targets)  # (batch, J, C)
        score = retention_scores(cand_innovation[:, None], cand_chunk[:, None], targets, eligible, decay)
        keep = _keep_best(position, score, size)  # (batch, J, size)
        kept = eligible.gather(-1, keep)

        def take(t: Tensor, fill: float) -> Tensor:
            return t[:, None].expand(-1, last - first, -1).gather(-1, keep).masked_fill(~kept, fill)

        states.append(Selection(take(position, -1), take(cand_innovation, 0.0), take(cand_chunk, -1)))
        memory = Selection(*(t[:, -1] for t in states[-1]))
    return Selection(*(torch.cat(parts, dim=1) for parts in zip(*states)))


def _chunks_per_block(size: int, picks: int, n_chunks: int) -> int:
    """Largest number of chunks J whose masked sort, J x (size + J * picks), stays within BLOCK_ELEMENTS."""
    block = 1
    while block < n_chunks and (block + 1) * (size + (block + 1) * picks) <= BLOCK_ELEMENTS:
        block += 1
    return block


def gather_memory(k_raw: Tensor, v: Tensor, selection: Selection) -> MemoryState:
    """The memory vectors of `selection` (batch, ..., M) out of the sequence's k_raw, v (batch, L, kv_heads, head_dim).

    Empty slots get zero vectors, as in `MemoryState.empty`.
    """
    batch, length, kv_heads, head_dim = k_raw.shape
    slots = selection.position.shape[1:]
    # Whole rows of the flattened (batch * L, kv_heads * head_dim) sequence: index_select
    # copies rows (and its backward adds rows), much faster than an element-wise gather.
    rows = selection.position.clamp(min=0) + length * torch.arange(batch, device=k_raw.device).view(
        batch, *(1,) * len(slots))
    rows = rows.flatten()
    mask = (selection.position >= 0).flatten().to(k_raw.dtype)[:, None]

    def take(t: Tensor) -> Tensor:
        picked = t.reshape(batch * length, kv_heads * head_dim).index_select(0, rows) * mask
        return picked.view(batch, *slots, kv_heads, head_dim)

    return MemoryState(take(k_raw), take(v), selection.innovation, selection.position, selection.pick_chunk)


def gather_memory_by_head(k_raw: Tensor, v: Tensor, selection: Selection) -> tuple[Tensor, Tensor]:
    """`gather_memory`'s keys and values in the layout the attention reads: (batch, kv_heads, ..., M, head_dim).

    When the slots outnumber the sequence's tokens (many chunks, each with its own
    memory), the sequence is transposed to heads-first once, with one zero row per head
    that empty slots read, so the gather writes the memory in its final layout: no
    transposed copy, no masking product of the (larger) memory, forward or backward.
    Otherwise the memory is gathered as `gather_memory` does and returned as a
    heads-first view. Same values either way.
    """
    batch, length, kv_heads, head_dim = k_raw.shape
    position = selection.position
    slots = position.shape[1:]
    if position[0].numel() <= length:
        seen = gather_memory(k_raw, v, selection)
        order = (0, len(slots) + 1, *range(1, len(slots) + 1), len(slots) + 2)
        return seen.k.permute(order), seen.v.permute(order)
    per_head = torch.arange(batch * kv_heads, device=k_raw.device).view(batch, kv_heads, *(1,) * len(slots))
    rows = (per_head * (length + 1) + torch.where(position >= 0, position, length)[:, None]).flatten()

    def take(t: Tensor) -> Tensor:
        padded = torch.cat([t.transpose(1, 2), t.new_zeros(batch, kv_heads, 1, head_dim)], dim=2)
        return padded.view(-1, head_dim).index_select(0, rows).view(batch, kv_heads, *slots, head_dim)

    return take(k_raw), take(v)


def memory_after_each_chunk(
    k_raw: Tensor,
    v: Tensor,
    innovation: Tensor,
    *,
    chunk: int,
    picks: int,
    size: int,
    decay: float,
) -> MemoryState:
    """Memory after every complete chunk of a sequence (k_raw, v: (batch, L, kv_heads, head_dim)).

    Returns one stacked MemoryState (batch, n_chunks, M, ...); `.at(j)` is the memory after chunk j.
    """
    selection = select_memory(innovation, chunk=chunk, picks=picks, size=size, decay=decay)
    return gather_memory(k_raw, v, selection)


def visible_selection(selection: Selection, n_chunks: int, lag: int) -> Selection:
    """For each query chunk ``j < n_chunks``, the memory after chunk ``j - lag`` (empty before).

    `selection` holds the memory after each complete chunk (batch, done, M); returns
    (batch, n_chunks, M). Query chunk ``j`` needs chunk ``j - lag < done``, which
    holds whenever ``lag >= 1`` and the sequence has ``n_chunks`` chunks.
    """
    batch, done, size = selection.position.shape
    front = min(lag, n_chunks)
    seen = n_chunks - front
    if seen > done:
        raise ValueError(f"visible_selection: {n_chunks} query chunks with lag {lag} need {seen} memories, have {done}")
    empty = empty_selection(batch, size, selection.innovation, chunks=front)
    return Selection(*(torch.cat([e, s[:, :seen]], dim=1) for e, s in zip(empty, selection)))


def visible_memory(states: MemoryState, n_chunks: int, lag: int) -> MemoryState:
    """`visible_selection` for a stacked MemoryState (batch, done, M, ...): empty slots are zeros."""
    batch, done, size = states.position.shape
    front = min(lag, n_chunks)
    seen = n_chunks - front
    empty = MemoryState.empty(batch, size * front, *states.k.shape[3:], states.k)
    parts = []
    for e, s in zip(empty._tensors(), states._tensors()):
        e = e.view(batch, front, size, *e.shape[2:])
        parts.append(torch.cat([e, s[:, :seen]], dim=1))
    return MemoryState(*parts)
