"""The recurrent decode cache of a B'MOJO model (docs/design.md, "The model" and "Decode cache").

Per layer it holds only what the next token can read, so the work and memory per
generated token do not grow with the context (except for full-attention ``A``
layers, whose KV cache grows by design):

* SSM: conv and scan states (`SSMState`, owned by the mixer);
* windows: rotated keys/values of the last ``w`` tokens, and of the fading stream
  for the last ``w + w_f`` tokens;
* eidetic memory: the memory after the last complete chunk, the snapshots of the
  last ``g`` chunks (chunk ``j`` reads the one after chunk ``j - g``), and the
  current chunk's un-rotated keys, values and innovations;
* the previous SSM output, which the innovation predictor reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .layers.eidetic_memory import MemoryState
from .layers.ssm_state import SSMState


@dataclass
class AttentionLayerCache:
    """Decode state of one B/F/S/A layer. Key/value buffers are (batch, kv_heads, n, head_dim)."""

    ctx_k: Tensor | None = None
    ctx_v: Tensor | None = None
    fading_k: Tensor | None = None
    fading_v: Tensor | None = None
    ssm: SSMState | None = None
    prev_ssm_out: Tensor | None = None  # (batch, hidden)
    memory: MemoryState | None = None
    snapshots: dict[int, MemoryState] = field(default_factory=dict)
    chunk_k: Tensor | None = None  # (batch, n < c, kv_heads, head_dim), un-rotated
    chunk_v: Tensor | None = None
    chunk_innovation: Tensor | None = None  # (batch, n)

    def reorder(self, index: Tensor) -> None:
        for name in ("ctx_k", "ctx_v", "fading_k", "fading_v", "prev_ssm_out", "chunk_k", "chunk_v", "chunk_innovation"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.index_select(0, index))
        if self.ssm is not None:
            self.ssm.reorder(index)
        if self.memory is not None:
            self.memory = self.memory.reorder(index)
        self.snapshots = {j: m.reorder(index) for j, m in self.snapshots.items()}


class BMojoCache:
    """Cache passed to `BMojoForCausalLM.forward` / `generate()` (argument ``cache`` or ``past_key_values``).

    A fresh cache is filled by the first (parallel) forward; later calls advance it
    token by token.
    """

    is_compileable = False

    def __init__(self, num_layers: int) -> None:
        self.layers: list[AttentionLayerCache | SSMState | None] = [None] * num_layers
        self.seen_tokens = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    @property
    def is_linear(self) -> list[bool]:
        """transformers' test for caches that cannot say how many tokens they hold (pure SSM states).

        Every layer here can (`seen_tokens`), so `generate` may cut the tokens a
        restarted prompt shares with the cache, as for attention caches.
        """
        return [False] * len(self.layers)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for layer in self.layers:
            if layer is not None:
                layer.reorder(beam_idx)

    def __len__(self) -> int:
        return len(self.layers)
