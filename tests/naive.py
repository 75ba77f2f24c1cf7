"""Small configs and independent naive implementations shared by the model tests."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from bmojo_neuron import BMojoConfig


def tiny_config(**overrides) -> BMojoConfig:
    """A model small enough to decode token by token in a test (float32 or float64)."""
    fields = dict(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=1,
        layer_pattern="B",
        num_attention_heads=4,
        num_key_value_heads=2,
        ssm_state_size=8,
        ssm_head_dim=8,
        ssm_chunk_size=8,
        window_size=4,
        fading_window=3,
        memory_chunk=5,
        memory_size=3,
        memory_picks=2,
        memory_decay=0.5,
        intermediate_size=48,
    )
    fields.update(overrides)
    if "layer_pattern" in overrides and "num_hidden_layers" not in overrides:
        fields["num_hidden_layers"] = len(overrides["layer_pattern"])
    return BMojoConfig(**fields)


def naive_rope(x: Tensor, position: int, theta: float) -> Tensor:
    """Rotate one vector (head_dim,) to `position`: pairs (i, i + D/2) rotated by position * theta^(-2i/D)."""
    half = x.shape[-1] // 2
    out = x.clone()
    for i in range(half):
        angle = position * theta ** (-2 * i / x.shape[-1])
        c, s = math.cos(angle), math.sin(angle)
        out[..., i] = x[..., i] * c - x[..., i + half] * s
        out[..., i + half] = x[..., i + half] * c + x[..., i] * s
    return out


def naive_memory_selection(
    innovation: list[float], chunk: int, picks: int, size: int, decay: float
) -> list[list[int]]:
    """Positions in memory after each complete chunk, straight from the rule in docs/design.md ("The model", step 3).

    Picks: the `picks` largest innovations of the chunk (ties: lower position).
    Retention: the `size` entries of largest innovation * decay ** age (ties: more recent).
    """
    memory: list[tuple[int, int]] = []  # (position, pick_chunk)
    after = []
    for j in range(len(innovation) // chunk):
        positions = range(j * chunk, (j + 1) * chunk)
        chosen = sorted(positions, key=lambda t: (-innovation[t], t))[:picks]
        candidates = memory + [(t, j) for t in chosen]
        candidates.sort(key=lambda e: (-(innovation[e[0]] * decay ** (j - e[1])), -e[0]))
        memory = candidates[:size]
        after.append(sorted(t for t, _ in memory))
    return after


def naive_attention(queries, keys, values) -> Tensor:
    """softmax(q k^T / sqrt(D)) v for one query (D,) over keys (n, D)."""
    scores = keys @ queries / math.sqrt(queries.shape[-1])
    return torch.softmax(scores, dim=0) @ values
