"""Innovation scoring and eidetic-memory selection (docs/design.md, "The model", steps 2-4).

Tokens are grouped in chunks of ``c``. After each chunk the ``k`` tokens of largest
innovation are picked (ties: lower position first) and merged with the memory: the
``M`` entries of highest retention score ``innovation * decay ** age_in_chunks``
survive (ties: the more recent entry wins). Chunk ``j`` reads the memory as it stood
after chunk ``j - lag``.

The same two functions, `pick_tokens` and `merge_into_memory`, run in the parallel
forward (once per chunk) and in the decode cache (when a chunk completes), so both
paths select exactly the same tokens. Every step is a fixed-size sort: no
data-dependent shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class MemoryState:
    """The eidetic memory of one layer for a batch: ``M`` slots.

    ``k`` are stored un-rotated; the reader rotates them to its own memory position.
    Empty slots have ``position == -1``.
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

    def _tensors(self) -> tuple[Tensor, ...]:
        return self.k, self.v, self.innovation, self.position, self.pick_chunk


def innovation_scores(k_raw: Tensor, k_predicted: Tensor) -> Tensor:
    """``e_t = mean((K_t - K_hat_t)^2)`` over kv heads and head dim; inputs (batch, L, kv_heads, head_dim)."""
    return (k_raw - k_predicted).pow(2).mean(dim=(-2, -1))


def pick_tokens(innovation: Tensor, picks: int) -> Tensor:
    """Indices (batch, picks) of the largest innovations in a chunk (batch, n); ties: lower index first."""
    order = torch.sort(innovation, dim=-1, descending=True, stable=True).indices
    return order[:, :picks]


def merge_into_memory(
    memory: MemoryState,
    new_k: Tensor,
    new_v: Tensor,
    new_innovation: Tensor,
    new_position: Tensor,
    chunk_index: int,
    decay: float,
) -> MemoryState:
    """Memory after chunk `chunk_index`: the best ``M`` of old entries and new picks.

    Score = innovation * decay ** (chunk_index - pick_chunk); empty slots never win;
    equal scores go to the more recent (higher position) entry.
    """
    size = memory.position.shape[1]
    new_chunk = torch.full_like(new_position, chunk_index)
    k = torch.cat([memory.k, new_k], dim=1)
    v = torch.cat([memory.v, new_v], dim=1)
    innovation = torch.cat([memory.innovation, new_innovation], dim=1)
    position = torch.cat([memory.position, new_position], dim=1)
    pick_chunk = torch.cat([memory.pick_chunk, new_chunk], dim=1)

    age = (chunk_index - pick_chunk).to(innovation.dtype)
    score = innovation * torch.pow(torch.full_like(age, decay), age)
    score = score.masked_fill(position < 0, float("-inf"))
    # Most recent first, then a stable sort by score: ties keep the most recent in front.
    by_recency = torch.sort(position, dim=1, descending=True, stable=True).indices
    by_score = torch.sort(score.gather(1, by_recency), dim=1, descending=True, stable=True).indices
    keep = by_recency.gather(1, by_score)[:, :size]

    def take(t: Tensor) -> Tensor:
        index = keep.view(keep.shape + (1,) * (t.dim() - 2)).expand(keep.shape + t.shape[2:])
        return t.gather(1, index)

    return MemoryState(take(k), take(v), take(innovation), take(position), take(pick_chunk))


def update_memory(
    memory: MemoryState,
    chunk_k: Tensor,
    chunk_v: Tensor,
    chunk_innovation: Tensor,
    chunk_start: int,
    chunk_index: int,
    picks: int,
    decay: float,
) -> MemoryState:
    """Pick from one complete chunk (tensors (batch, c, ...)) and merge the picks into `memory`."""
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


def memory_after_each_chunk(
    k_raw: Tensor,
    v: Tensor,
    innovation: Tensor,
    *,
    chunk: int,
    picks: int,
    size: int,
    decay: float,
    initial: MemoryState | None = None,
) -> list[MemoryState]:
    """Memory after every complete chunk of a sequence (k_raw, v: (batch, L, kv_heads, head_dim))."""
    batch, length, kv_heads, head_dim = k_raw.shape
    memory = initial or MemoryState.empty(batch, size, kv_heads, head_dim, k_raw)
    states = []
    for j in range(length // chunk):
        part = slice(j * chunk, (j + 1) * chunk)
        memory = update_memory(memory, k_raw[:, part], v[:, part], innovation[:, part], j * chunk, j, picks, decay)
        states.append(memory)
    return states


def visible_memory(states: list[MemoryState], n_chunks: int, lag: int, empty: MemoryState) -> MemoryState:
    """Stack, for each query chunk ``j < n_chunks``, the memory after chunk ``j - lag`` (empty before).

    Returns a MemoryState whose tensors have an extra chunk axis after batch:
    (batch, n_chunks, M, ...).
    """
    per_chunk = [states[j - lag] if j - lag >= 0 else empty for j in range(n_chunks)]
    return MemoryState(*(torch.stack(parts, dim=1) for parts in zip(*(m._tensors() for m in per_chunk))))
