"""The recurrent decode cache of a B'MOJO model (docs/design.md, "The model" and "Decode cache").

Per layer it holds only what the next token can read, so the work and memory per
generated token do not grow with the context (except for full-attention ``A``
layers, whose KV cache grows by design):

* SSM: conv and scan states (`SSMState`, owned by the mixer);
* windows and memory, for B/F/S layers: one preallocated buffer of rotated keys and
  values, ``[in-context ring (w) | fading ring | memory (M)]``, and an additive bias
  saying which slots the next query reads; a token writes its keys in place
  (`layers.attention.DecodeSlots`). ``A`` layers keep a growing KV cache;
* eidetic memory: the memory after the last complete chunk, the snapshots of the
  last ``g`` chunks (chunk ``j`` reads the one after chunk ``j - g``), and the
  current chunk's un-rotated keys, values and innovations (preallocated, ``c`` rows);
* the previous SSM output, which the innovation predictor reads.

A padded batch (an ``attention_mask`` with zeros) keeps one cache per row instead
(`BMojoCache.rows`): its rows hold different numbers of real tokens, so they sit at
different positions, and a B layer's memory chunks end at different steps in each
row (docs/hf.md, "Padding").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .layers.eidetic_memory import MemoryState
from .layers.ssm_state import SSMState


@dataclass
class AttentionLayerCache:
    """Decode state of one B/F/S/A layer. Key/value buffers are (batch, kv_heads, n, head_dim)."""

    keys: Tensor | None = None  # B/F/S: (batch, kv_heads, slots, head_dim), rotated
    values: Tensor | None = None
    bias: Tensor | None = None  # (batch, slots): 0 where the next query reads the slot, -inf elsewhere
    ctx_k: Tensor | None = None  # A: every token so far
    ctx_v: Tensor | None = None
    ssm: SSMState | None = None
    prev_ssm_out: Tensor | None = None  # (batch, hidden)
    memory: MemoryState | None = None
    snapshots: dict[int, MemoryState] = field(default_factory=dict)
    memory_read: int | None = None  # the chunk whose visible memory is in the memory slots
    chunk_k: Tensor | None = None  # (batch, c, kv_heads, head_dim), un-rotated; rows up to position % c are set
    chunk_v: Tensor | None = None
    chunk_innovation: Tensor | None = None  # (batch, c)

    def reorder(self, index: Tensor) -> None:
        for name in ("keys", "values", "bias", "ctx_k", "ctx_v", "prev_ssm_out", "chunk_k", "chunk_v",
                     "chunk_innovation"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.index_select(0, index))
        if self.ssm is not None:
            self.ssm.reorder(index)
        if self.memory is not None:
            self.memory = self.memory.reorder(index)
        self.snapshots = {j: m.reorder(index) for j, m in self.snapshots.items()}

    # Decoding writes into these in place (one token's slots); every other tensor it replaces.
    WRITTEN_IN_PLACE = ("keys", "values", "bias", "chunk_k", "chunk_v", "chunk_innovation")

    def copy(self) -> AttentionLayerCache:
        """A cache that decodes independently of this one: the buffers decoding writes into are cloned, the
        tensors it only replaces are shared."""
        ssm = self.ssm.copy() if self.ssm is not None else None
        own = {name: getattr(self, name).clone() for name in self.WRITTEN_IN_PLACE if getattr(self, name) is not None}
        return dataclasses.replace(self, ssm=ssm, snapshots=dict(self.snapshots), **own)


class BMojoCache:
    """Cache passed to `BMojoForCausalLM.forward` / `generate()` (argument ``cache`` or ``past_key_values``).

    A fresh cache is filled by the first (parallel) forward; later calls advance it
    token by token.
    """

    is_compileable = False

    def __init__(self, num_layers: int) -> None:
        self.layers: list[AttentionLayerCache | SSMState | None] = [None] * num_layers
        self.seen_tokens = 0  # input positions read, pads included
        self.rows: list[BMojoCache] | None = None  # one cache per row once a padded batch arrives

    def split_rows(self, batch_size: int, device: torch.device) -> None:
        """Switch to one cache per row (each holding that row's state so far); `layers` is then unused."""
        if self.rows is not None:
            return
        self.rows = [self._row(b, device) for b in range(batch_size)]
        self.layers = [None] * len(self.layers)

    def _row(self, b: int, device: torch.device) -> BMojoCache:
        row = BMojoCache(len(self.layers))
        row.seen_tokens = self.seen_tokens
        index = torch.tensor([b], device=device)
        for i, layer in enumerate(self.layers):
            if layer is not None:
                row.layers[i] = layer.copy()
                row.layers[i].reorder(index)
        return row

    def copy(self) -> BMojoCache:
        """A cache that decodes independently of this one (`AttentionLayerCache.copy`)."""
        new = BMojoCache(len(self.layers))
        new.seen_tokens = self.seen_tokens
        new.layers = [None if layer is None else layer.copy() for layer in self.layers]
        new.rows = None if self.rows is None else [row.copy() for row in self.rows]
        return new

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
        if self.rows is not None:  # a row picked twice must not share its state objects
            self.rows = [self.rows[i].copy() for i in beam_idx.tolist()]
            return
        for layer in self.layers:
            if layer is not None:
                layer.reorder(beam_idx)

    def __len__(self) -> int:
        return len(self.layers)
