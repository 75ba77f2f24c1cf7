"""B'MOJO attention: one mixer class for the attention layer kinds B, F, S and A.

* ``S``: sliding-window attention over the last ``w`` tokens;
* ``F``: adds the fading window: keys/values projected from the SSM output ``S``;
* ``B``: adds the eidetic memory of high-innovation tokens;
* ``A``: full causal attention (`scaled_dot_product_attention`).

The parallel forward calls `ops.eidetic_attention`; decoding one token reads the
layer's `AttentionLayerCache` (O(1) in the context length for B, F, S).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..cache_bmojo import AttentionLayerCache
from ..configuration_bmojo import BMojoConfig
from ..padding import masked_mean
from .eidetic_memory import (
    MemoryState,
    Selection,
    gather_memory,
    gather_memory_by_head,
    innovation_scores,
    next_token_innovation,
    select_memory,
    update_memory,
    visible_selection,
)
from .decode_pack import linear_weights, packed, plain_linears
from .eager_gate import eager_untraced
from .factory import LayerFactory, check_tp_split, get_layer_factory
from .norms import RMSNorm, norm_rows, rms_normalize
from .rope import RotaryEmbedding, apply_rotary, apply_rotary_rolled
from .ssm import build_ssm_mixer


class BMojoAttention(nn.Module):
    def __init__(self, config: BMojoConfig, layer_idx: int) -> None:
        super().__init__()
        self.kind = config.layer_kind(layer_idx)
        if self.kind not in "BFSA":
            raise ValueError(f"BMojoAttention cannot build layer kind {self.kind!r}")
        layers = self.factory = get_layer_factory()
        for name in ("num_attention_heads", "num_key_value_heads"):
            check_tp_split(name, getattr(config, name), layers.tp_size)
        self.q_heads = config.num_attention_heads // layers.tp_size  # heads on this rank
        self.kv_heads = config.num_key_value_heads // layers.tp_size
        self.kv_width = config.num_key_value_heads * config.head_dim  # innovation averages over all ranks' heads
        self.head_dim = config.head_dim
        self.window = config.window_size
        self.fading_window = config.fading_window if self.kind in "BF" else 0
        self.memory_size = config.memory_size if self.kind == "B" else 0
        self.chunk = config.memory_chunk
        self.picks = config.memory_picks
        self.decay = config.memory_decay
        self.lag = config.memory_lag  # >= 2: the decode ring's slots for the memory read and the one written differ
        self.horizon = config.memory_horizon

        hidden, bias = config.hidden_size, config.attention_bias
        q_width, kv_width = config.num_attention_heads * self.head_dim, self.kv_width
        self.q_proj = layers.column_linear(hidden, q_width, bias=bias)
        self.k_proj = layers.column_linear(hidden, kv_width, bias=bias)
        self.v_proj = layers.column_linear(hidden, kv_width, bias=bias)
        self.o_proj = layers.row_linear(q_width, hidden, bias=config.attention_output_bias)
        self.q_norm = self.k_norm = None
        if config.qk_norm:
            self.q_norm = HeadRMSNorm(self.head_dim, config.rms_norm_eps, layers)
            self.k_norm = HeadRMSNorm(self.head_dim, config.rms_norm_eps, layers)
        self.rotary = RotaryEmbedding(self.head_dim, config.rope_theta, config.rope_scaling_params)

        needs_ssm = self.fading_window > 0 or self.memory_size > 0
        self.ssm = build_ssm_mixer(config, layer_idx) if needs_ssm else None
        # Optional paths of the SSM output S (docs/design.md, "Options for how S enters the layer").
        self.ssm_norm = layers.norm(hidden, eps=config.rms_norm_eps) if needs_ssm and config.fading_norm else None
        self.ssm_residual_gain = None
        if needs_ssm and config.ssm_residual:
            self.ssm_residual_gain = layers.gain(hidden, config.ssm_residual_init)
        self.tie_fading = config.tie_fading_projections
        self.fading_overlap = config.fading_overlap
        self.decode_slots = self._new_decode_slots()
        if self.fading_window > 0 and not self.tie_fading:
            self.k_fading_proj = layers.column_linear(hidden, kv_width, bias=bias)
            self.v_fading_proj = layers.column_linear(hidden, kv_width, bias=bias)
        if self.memory_size > 0:
            # K_hat_t = P(S_{t-1}); sharded by kv head like k_proj. No bias, so P(0) = 0.
            self.innovation_proj = layers.column_linear(hidden, kv_width, bias=False)
            if config.freeze_innovation_predictor:  # ablation: select with the predictor as initialised
                self.innovation_proj.weight.requires_grad_(False)

    # ------------------------------------------------------------------ helpers
    def _heads(self, x: Tensor, heads: int) -> Tensor:
        """(batch, L, heads * head_dim) -> (batch, L, heads, head_dim)."""
        return x.view(*x.shape[:-1], heads, self.head_dim)

    def _queries(self, x: Tensor) -> Tensor:
        """Un-rotated queries (batch, L, q_heads, head_dim), normalised per head with qk_norm."""
        q = self._heads(self.q_proj(x), self.q_heads)
        return q if self.q_norm is None else self.q_norm(q)

    def _keys(self, x: Tensor, proj: nn.Module | None = None) -> Tensor:
        """Un-rotated keys (batch, L, kv_heads, head_dim) of `x` through `proj` (default k_proj)."""
        k = self._heads((proj or self.k_proj)(x), self.kv_heads)
        return k if self.k_norm is None else self.k_norm(k)

    def _rotary_tables(self, length: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin (L, head_dim) of positions 0..L-1 in `like`'s dtype, shared by q, k and the fading k."""
        return self.rotary.prefix(length, like)

    def _rotate(self, x: Tensor, tables: tuple[Tensor, Tensor]) -> Tensor:
        """Rotate (batch, heads, L, head_dim) by `_rotary_tables`."""
        return apply_rotary(x, *tables)

    def _fading_kv(self, s: Tensor, tables: tuple[Tensor, Tensor], length: int, whole: bool
                   ) -> tuple[Tensor | None, Tensor | None]:
        """Rotated fading keys and values (batch, kv_heads, L, head_dim) from the SSM features `s`.

        Unless `whole` (a prefill, which fills every fading slot of the cache), an eager
        forward (any device: the cut is slices and pads) through plain linear projections
        projects and rotates only the positions some query reads (`_fading_read`) and leaves
        zeros, which no query reads, in the others: None for both when no query reads any. A
        sharded projection (whose input may be a sequence-parallel shard) and a traced graph
        (whose ops the step-graph checks pin) keep every position.
        """
        k_proj = self.k_proj if self.tie_fading else self.k_fading_proj
        v_proj = self.v_proj if self.tie_fading else self.v_fading_proj
        rows = length
        if self._cuts_fading(whole, k_proj, v_proj, s):
            rows = self._fading_read(length)
            if rows == 0:
                return None, None
            # One copy of the rows both projections read; each product would copy the strided slice itself.
            s = s[:, :rows].contiguous()
        k = self._rotate(self._keys(s, k_proj).transpose(1, 2), tuple(t[:rows] for t in tables))
        v = self._heads(v_proj(s), self.kv_heads).transpose(1, 2)
        if rows < length:
            # Padded heads first, the pad's copy is the (batch, kv_heads, L, D) layout the attention op reads, which
            # it would otherwise copy again out of the transposed view.
            k, v = F.pad(k, (0, 0, 0, length - rows)), F.pad(v, (0, 0, 0, length - rows))
        return k, v

    @staticmethod
    def _cuts_fading(whole: bool, k_proj: nn.Module, v_proj: nn.Module, s: Tensor) -> bool:
        """Whether `_fading_kv` projects only the positions read: not a prefill, plain linears, eager tensors."""
        return not whole and plain_linears(k_proj, v_proj) and eager_untraced(s)

    def _fading_read(self, length: int) -> int:
        """How many leading positions of a forward over `length` tokens have fading keys some query reads.

        Query i reads the fading keys of positions (i - window - fading_window, i - window]
        (ops/reference/eidetic_attention.py, module docstring), so the last one read is
        L - 1 - window and the last `window` positions are never read; with `fading_overlap`
        the band is (i - fading_window, i] and reaches every position. A function of L and
        the config only: the shapes stay static.
        """
        return length if self.fading_overlap else max(0, length - self.window)

    def _innovation(self, k_raw: Tensor, k_hat: Tensor, predicts_next: bool = False) -> Tensor:
        """Innovation (batch, L) of keys against their predictions (both (batch, L, local kv heads * D)); with
        `predicts_next`, row t of `k_hat` predicts the key of token t + 1 (`next_token_innovation`).

        The target is detached (and the predictor reads a detached S): the auxiliary
        loss trains only the predictor (docs/design.md). Under tensor parallelism each
        rank holds some kv heads, so the squared errors are summed over ranks before
        anything is picked: every rank then selects the same tokens.
        """
        scores = next_token_innovation if predicts_next else innovation_scores
        local = scores(k_raw.detach(), self._heads(k_hat, self.kv_heads))
        return self.factory.all_reduce(local * (self.kv_heads * self.head_dim)) / self.kv_width

    def _memory_rotation(self, chunk_index: Tensor) -> Tensor:
        """Position at which chunk j reads its memory keys, just behind both windows: max(0, j*c - memory_horizon)."""
        return (chunk_index * self.chunk - self.horizon).clamp(min=0)

    # ------------------------------------------------------------------ forward
    def forward(
        self, x: Tensor, start: int = 0, cache: AttentionLayerCache | None = None, real_tokens: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Mix `x` (batch, L, d) whose first token is at position `start`.

        Returns the mixer output and the mean innovation (None for layers without memory)
        over the `real_tokens` (batch, L) of a packed padded batch (all tokens if None),
        which the model turns into the auxiliary loss.
        """
        if cache is not None and start > 0:
            outputs = [self.decode_token(x[:, t], start + t, cache) for t in range(x.shape[1])]
            return torch.stack(outputs, dim=1), None
        return self._forward_parallel(x, cache, real_tokens)

    def full_attention(self, x: Tensor) -> Tensor:
        """Full causal attention over all of `x` with this layer's projections, whatever its kind.

        This is the transformer layer a primed B, F or S layer came from (distillation's
        teacher): it reads the same q/k/v/o weights, so the teacher costs no memory.
        """
        q = self._queries(x)
        tables = self._rotary_tables(q.shape[1], q)
        q = self._rotate(q.transpose(1, 2), tables)
        k = self._rotate(self._keys(x).transpose(1, 2), tables)
        v = self._heads(self.v_proj(x), self.kv_heads).transpose(1, 2)
        return self._output(self._causal_attention(q, k, v))

    def _causal_attention(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.q_heads != self.kv_heads)

    def _forward_parallel(
        self, x: Tensor, cache: AttentionLayerCache | None, real_tokens: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        q = self._queries(x)  # the whole sequence, even when x is a sequence-parallel shard
        batch, length = q.shape[:2]
        tables = self._rotary_tables(length, q)
        q = self._rotate(q.transpose(1, 2), tables)
        k_raw = self._keys(x)
        v = self._heads(self.v_proj(x), self.kv_heads)
        k = self._rotate(k_raw.transpose(1, 2), tables)
        v_t = v.transpose(1, 2)

        if self.kind == "A":
            if cache is not None:
                self._fill_full_cache(cache, k, v_t)
            return self._output(self._causal_attention(q, k, v_t)), None

        s = None
        if self.ssm is not None:
            cache_ssm = None
            if cache is not None:
                cache.ssm = cache_ssm = self.ssm.init_state(batch, x.device, x.dtype)
            s = self.ssm(x, state=cache_ssm)
        features = self._ssm_features(s)

        k_fading = v_fading = None
        if self.fading_window > 0:
            k_fading, v_fading = self._fading_kv(features, tables, length, whole=cache is not None)

        mean_innovation = None
        mem_k = mem_v = mem_valid = None
        selection = None
        innovation = None
        if self.memory_size > 0:
            # Chunk j reads the memory after chunk j - lag, so a sequence of at most `lag` chunks reads none. Eagerly
            # (any device) its picks and gathers (which would only feed an empty memory) are skipped; a traced
            # graph (Neuron/XLA, torch.compile) keeps them, so it has the same ops at every length, short traces of
            # the graph checks included.
            reads_memory = -(-length // self.chunk) > self.lag or not eager_untraced(k_raw, v)
            innovation, selection = self._select_memory(k_raw, features, select=reads_memory or cache is not None)
            mean_innovation = masked_mean(innovation, real_tokens)
            if reads_memory:
                mem_k, mem_v, mem_valid = self._memory_for_chunks(selection, length, k_raw, v)

        out, _ = ops.eidetic_attention(
            q, k, v_t, k_fading, v_fading, mem_k, mem_v, mem_valid,
            window=self.window, fading_window=self.fading_window, chunk=self.chunk,
            **({"fading_overlap": True} if self.fading_overlap else {}),
        )
        if cache is not None:
            self._fill_cache(cache, k, v_t, k_fading, v_fading, features, k_raw, v, innovation, selection)
        return self._output(out, s), mean_innovation

    def _select_memory(self, k_raw: Tensor, features: Tensor, select: bool = True
                       ) -> tuple[Tensor, Selection | None]:
        """Innovation (batch, L) of every token and which tokens are in memory after each complete chunk (None
        unless `select`)."""
        # K_hat_t = P(S_{t-1}), zero at t = 0: row t of P(S) predicts the key of token t + 1.
        innovation = self._innovation(k_raw, self.innovation_proj(features.detach()), predicts_next=True)
        if not select:
            return innovation, None
        selection = select_memory(
            innovation, chunk=self.chunk, picks=self.picks, size=self.memory_size, decay=self.decay
        )
        return innovation, selection

    @torch.no_grad()
    def memory_trace(self, x: Tensor) -> tuple[Tensor, Selection]:
        """What a `B` layer's memory holds for the mixer input `x` (batch, L, d), for inspection.

        Returns the innovation of every token (batch, L) and the tokens in memory after
        each complete chunk, (batch, n_chunks, M) each (chunk ``j`` reads the one after
        chunk ``j - memory_lag``); the same computation as the forward, without the attention.
        """
        if self.memory_size == 0:
            raise ValueError(f"layer kind {self.kind!r} with memory_size {self.memory_size} has no eidetic memory")
        k_raw = self._heads(self.k_proj(x), self.kv_heads)
        return self._select_memory(k_raw, self._ssm_features(self.ssm(x)))

    def _memory_for_chunks(
        self, selection: Selection, length: int, k_raw: Tensor, v: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Per query chunk: rotated memory keys, values (batch, kv_heads, n_chunks, M, D) and validity."""
        n_chunks = -(-length // self.chunk)
        visible = visible_selection(selection, n_chunks, self.lag)
        mem_k, mem_v = gather_memory_by_head(k_raw, v, visible)
        rotation = self._memory_rotation(torch.arange(n_chunks, device=k_raw.device))
        cos, sin = self.rotary(rotation, k_raw.dtype)  # (n_chunks, D)
        return apply_rotary(mem_k, cos[:, None], sin[:, None]), mem_v, visible.position >= 0

    def _ssm_features(self, s: Tensor | None) -> Tensor | None:
        """What the fading projections and the innovation predictor read: S, RMS-normalised with `fading_norm`."""
        if s is None or self.ssm_norm is None:
            return s
        return self.ssm_norm(s)

    def _output(self, out: Tensor, s: Tensor | None = None) -> Tensor:
        """(batch, heads, L, head_dim) -> o_proj over (batch, L, heads * head_dim), plus gain * S with `ssm_residual`."""
        batch, _, length, _ = out.shape
        mixed = self.o_proj(out.transpose(1, 2).reshape(batch, length, self.q_heads * self.head_dim))
        if self.ssm_residual_gain is not None and s is not None:  # no S: the A kind, or the full-attention teacher
            mixed = torch.addcmul(mixed, self.ssm_residual_gain, s)
        return mixed

    # ------------------------------------------------------------------ decode
    # A B/F/S layer decodes from one preallocated key/value buffer (`DecodeSlots`): the
    # in-context ring, the fading ring and the memory slots side by side, with an additive
    # bias saying which slots the next query reads. A token writes its keys in place; the
    # bias changes only while the rings first fill, and the memory slots are rewritten once
    # per chunk. Softmax attention does not care about key order, so the rings need no
    # reordering. Fading keys wait in a side ring of `w` slots until their token leaves the
    # window, so the attended buffer holds only keys the query may read.
    #
    # The position is an int (eager decoding: Python branches skip the writes a token does
    # not need) or a 0-d tensor (a compiled step: the same writes made unconditionally where
    # they are idempotent, `torch.where` where they are not, and the chunk's end as
    # `torch.cond`), so the step has static shapes and one graph serves every position.
    def _slots(self) -> DecodeSlots:
        """The buffer's layout (the sizes are fixed at construction)."""
        return self.decode_slots

    def _new_decode_slots(self) -> DecodeSlots:
        pending = 0 if self.fading_window == 0 or self.fading_overlap else self.window
        return DecodeSlots(self.window, self.fading_window, self.memory_size, pending)

    def __setstate__(self, state: dict) -> None:
        """Unpickling (`torch.save` of the whole module): a module pickled before it kept its `decode_slots` gets
        them from its sizes, which it did keep."""
        super().__setstate__(state)
        if "decode_slots" not in self.__dict__:
            self.decode_slots = self._new_decode_slots()

    def _new_buffer(self, like: Tensor, batch: int, slots: int) -> Tensor:
        """Zeros for keys and values of `slots` slots, (2, batch, kv_heads, slots, D): [0] keys, [1] values.

        One buffer for both, so a token writes its key and value with one copy.
        """
        return like.new_zeros(2, batch, self.kv_heads, slots, self.head_dim)

    def _fill_cache(self, cache, k, v, k_fading, v_fading, s, k_raw, v_raw, innovation, selection) -> None:
        """Store what decoding needs after a parallel forward over a whole prompt."""
        batch, _, length, _ = k.shape
        slots = self._slots()
        cache.kv = self._new_buffer(k, batch, slots.total)
        # (batch, 1, 1, slots): broadcasts over heads and the query as the attention's mask
        cache.bias = torch.full((batch, 1, 1, slots.total), float("-inf"), dtype=k.dtype, device=k.device)
        last = length - 1
        t = torch.arange(max(0, length - slots.window), length, device=k.device)
        self._write_slots(cache, t % slots.window, k[:, :, t], v[:, :, t])
        if slots.fading:
            # the fading ring holds what the last prompt token read: its last w_f tokens with
            # overlapping fading keys, else the w_f tokens before its window
            newest = last if self.fading_overlap else last - self.window
            t = torch.arange(max(0, newest + 1 - slots.fading), max(0, newest + 1), device=k.device)
            self._write_slots(cache, slots.window + t % slots.fading, k_fading[:, :, t], v_fading[:, :, t])
        if slots.pending:
            cache.pending = self._new_buffer(k, batch, slots.pending)
            t = torch.arange(max(0, length - slots.pending), length, device=k.device)
            cache.pending[0][:, :, t % slots.pending] = k_fading[:, :, t]
            cache.pending[1][:, :, t % slots.pending] = v_fading[:, :, t]
        if self.memory_size > 0:
            self._fill_memory(cache, s, k_raw, v_raw, selection, length)

    def _fill_memory(self, cache, s: Tensor, k_raw: Tensor, v_raw: Tensor, selection: Selection, length: int) -> None:
        """The memory ring, the memory slots the next token reads and the current chunk's rows, after a prompt."""
        batch = k_raw.shape[0]
        cache.prev_ssm_out = s[:, -1].clone()  # own copy: the cache must not hold the prompt's SSM output
        done = selection.position.shape[1]
        first = max(0, done - self.lag)
        recent = gather_memory(k_raw, v_raw, Selection(*(t[:, first:] for t in selection)))
        empty = self._empty_memory(k_raw)
        # Own tensors, not views of the whole sequence's selection: the cache must not grow with the prompt.
        cache.ring = MemoryState(*(t.unsqueeze(1).repeat(1, self.lag, *(1,) * (t.dim() - 1)) for t in empty._tensors()))
        for j in range(first, done):
            for ring, snapshot in zip(cache.ring._tensors(), recent.at(j - first)._tensors()):
                ring[:, j % self.lag] = snapshot
        next_chunk = torch.tensor(length // self.chunk, device=k_raw.device)
        self._store_memory_slots(cache, *self._memory_slots(cache.ring._tensors(), next_chunk))
        start = done * self.chunk
        tail = length - start
        cache.chunk_kv = k_raw.new_zeros(2, batch, self.chunk, self.kv_heads, self.head_dim)
        cache.chunk_ssm_prev = s.new_zeros(batch, self.chunk, s.shape[-1])
        cache.chunk_kv[0, :, :tail] = k_raw[:, start:]
        cache.chunk_kv[1, :, :tail] = v_raw[:, start:]
        # row i: S of the token before token start + i (zero before the first token)
        cache.chunk_ssm_prev[:, :tail] = F.pad(s[:, max(0, start - 1) : length - 1], (0, 0, 1 if start == 0 else 0, 0))

    @staticmethod
    def _write_slots(cache, index: Tensor, k: Tensor, v: Tensor, valid: Tensor | None = None) -> None:
        """Put keys/values (batch, kv_heads, n, D) into buffer slots `index` (n,), readable where `valid` (n,)."""
        cache.kv[0][:, :, index] = k
        cache.kv[1][:, :, index] = v
        bias = cache.bias.new_zeros(index.shape)
        if valid is not None:
            bias = bias.masked_fill(~valid, float("-inf"))
        cache.bias[..., index] = bias

    def _empty_memory(self, like: Tensor) -> MemoryState:
        return MemoryState.empty(like.shape[0], self.memory_size, self.kv_heads, self.head_dim, like)

    def decode_token(self, x: Tensor, position: int | Tensor, cache: AttentionLayerCache) -> Tensor:
        """One token `x` (batch, d) at `position` (an int, or a 0-d long tensor in a compiled step), reading and
        advancing `cache`; returns (batch, d).

        Rows in, rows out: at one token per step the per-op overhead, not the arithmetic, is
        the cost, so nothing here adds or drops a sequence axis, and the reshapes are views.
        """
        batch = x.shape[0]
        cos, sin = self.rotary.at_position(position, x.dtype, x.device)
        if self.kind == "A":
            return self._decode_full(x, position, cache, cos, sin)

        s = self.ssm.step(x, cache.ssm) if self.ssm is not None else None
        features = s if s is None or self.ssm_norm is None else norm_rows(self.ssm_norm, s)  # `_ssm_features`
        pack = None
        if features is not None and self.fading_window > 0 and self.tie_fading:
            pack = packed(self, "_decode_packed", cache, self._pack_sources, self._build_pack)
        if pack is None:
            q = self._token_query(x, cos, sin)
            k_raw, v = self._token_keys(x, features)  # (1 or 2, batch, kv_heads, D): the token's own, then fading
            kv, raw = torch.stack([apply_rotary_rolled(k_raw, cos, sin), v]), None
        else:
            q, kv, raw = self._packed_token(x, features, position, pack)
        self._write_token(cache, position, kv)
        out = self._token_output(_attend(q, cache.kv[0], cache.kv[1], cache.bias), s)
        if self.memory_size > 0:  # after the attention: a chunk's end puts the next chunk's memory in the slots
            if raw is None:
                raw = torch.stack([k_raw, v]).select(1, 0)
            self._advance_memory(cache, position, raw, features)
        return out

    # With tied fading projections the token and its SSM output both go through k_proj and
    # v_proj, and the token through q_proj: one product over the three weights packed side by
    # side (`decode_pack`) gives all of them, and one rotation, whose tables leave the value
    # heads as they are, rotates the keys and the query together.
    def _pack_sources(self) -> list[Tensor | None]:
        """What `_build_pack` reads."""
        return [t for m in (self.k_proj, self.v_proj, self.q_proj) for t in (m.weight, m.bias)]

    def _build_pack(self) -> tuple[Tensor, Tensor | None] | None:
        """k_proj, v_proj and q_proj as one weight and bias; None with per-head norms or non-plain projections."""
        if self.q_norm is not None or self.k_norm is not None or not plain_linears(self.k_proj, self.v_proj, self.q_proj):
            return None
        return linear_weights(self.k_proj, self.v_proj, self.q_proj)

    def _packed_token(self, x: Tensor, features: Tensor, position: int, pack: tuple[Tensor, Tensor | None]
                      ) -> tuple[Tensor, Tensor, Tensor]:
        """The rotated query (batch, q_heads, 1, D), the rotated keys and values (2, 2, batch, kv_heads, D) of the
        token and its SSM output, and the token's un-rotated key and value (2, batch, kv_heads, D), all views of
        one product and one rotation."""
        batch, kv, D = x.shape[0], self.kv_heads, self.head_dim
        layout = ((kv, True), (kv, False), (self.q_heads, True))  # [k | v | q] heads; values are not rotated
        cos, sin = self.rotary.at_position_for_heads(position, x.dtype, x.device, layout)
        out = F.linear(torch.cat([x, features]), *pack).view(2, batch, 2 * kv + self.q_heads, D)
        rotated = apply_rotary_rolled(out, cos, sin)
        q = rotated.select(0, 0).narrow(1, 2 * kv, self.q_heads).unsqueeze(2)
        kv_rotated = rotated.narrow(2, 0, 2 * kv).view(2, batch, 2, kv, D).permute(2, 0, 1, 3, 4)
        raw = out.select(0, 0).narrow(1, 0, 2 * kv).view(batch, 2, kv, D).transpose(0, 1)
        return q, kv_rotated, raw

    def _token_query(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """The token's rotated query (batch, q_heads, 1, D), as the attention reads it."""
        q = self.q_proj(x).view(x.shape[0], self.q_heads, 1, self.head_dim)
        return apply_rotary_rolled(q if self.q_norm is None else self.q_norm(q), cos, sin)

    def _token_heads(self, rows: Tensor, n: int, batch: int, heads: int, norm: nn.Module | None = None) -> Tensor:
        """Projected rows (n * batch, heads * D) as (n, batch, heads, D), normalised per head by `norm`."""
        out = rows.view(n, batch, heads, self.head_dim)
        return out if norm is None else norm(out)

    def _token_keys(self, x: Tensor, features: Tensor | None) -> tuple[Tensor, Tensor]:
        """Un-rotated keys and values (n, batch, kv_heads, D) of the token (row 0) and, with a fading path, of its
        SSM output (row 1).

        With tied fading projections the token and its SSM output share one product per projection.
        """
        batch, kv = x.shape[0], self.kv_heads
        if features is None or self.fading_window == 0:
            return self._token_heads(self.k_proj(x), 1, batch, kv, self.k_norm), self._token_heads(self.v_proj(x), 1, batch, kv)
        if self.tie_fading:
            both = torch.cat([x, features])  # (2 * batch, d)
            return self._token_heads(self.k_proj(both), 2, batch, kv, self.k_norm), self._token_heads(self.v_proj(both), 2, batch, kv)
        k = torch.stack([self.k_proj(x), self.k_fading_proj(features)])
        v = torch.stack([self.v_proj(x), self.v_fading_proj(features)])
        return self._token_heads(k, 2, batch, kv, self.k_norm), self._token_heads(v, 2, batch, kv)

    def _token_output(self, out: Tensor, s: Tensor | None = None) -> Tensor:
        """Attention output (batch, heads, 1, D) -> o_proj (batch, d), plus gain * S with `ssm_residual`."""
        out = out.reshape(out.shape[0], self.q_heads * self.head_dim)
        o_proj = self.o_proj
        mixed = F.linear(out, o_proj.weight, o_proj.bias) if type(o_proj) is nn.Linear else o_proj(out)
        if self.ssm_residual_gain is not None and s is not None:
            return torch.addcmul(mixed, self.ssm_residual_gain, s)
        return mixed

    # An A layer keeps every token's keys: token t in slot t of a buffer of `capacity` slots, read up to the
    # current token through the bias. Eagerly the buffer doubles when full; a compiled step cannot grow it (its
    # shapes are fixed), so it needs the capacity from the start (`BMojoCache(max_length=...)`), and writing past it
    # fails as an index out of range.
    def _fill_full_cache(self, cache: AttentionLayerCache, k: Tensor, v: Tensor) -> None:
        """Keys and values (batch, kv_heads, L, D) of a prompt into a buffer with room for more tokens."""
        batch, _, length, _ = k.shape
        capacity = max(cache.max_length or 0, 1 << length.bit_length())  # > length
        cache.kv = self._new_buffer(k, batch, capacity)
        cache.kv[:, :, :, :length] = torch.stack([k, v])
        cache.bias = torch.full((batch, 1, 1, capacity), float("-inf"), dtype=k.dtype, device=k.device)
        cache.bias[..., :length] = 0.0

    def _decode_full(self, x: Tensor, position: int | Tensor, cache: AttentionLayerCache, cos: Tensor, sin: Tensor
                     ) -> Tensor:
        """An A layer's decode step: the token's keys into slot `position`, attention over the slots so far."""
        if not isinstance(position, Tensor) and position >= cache.kv.shape[3]:
            cache.grow(2 * position)
        batch = x.shape[0]
        q = self._token_query(x, cos, sin)
        k = apply_rotary_rolled(self._token_heads(self.k_proj(x), 1, batch, self.kv_heads, self.k_norm), cos, sin)
        v = self._token_heads(self.v_proj(x), 1, batch, self.kv_heads)
        _put(cache.kv, 3, position, torch.cat([k, v]))
        _open(cache.bias, position)
        return self._token_output(_attend(q, cache.kv[0], cache.kv[1], cache.bias))

    def _write_token(self, cache: AttentionLayerCache, position: int | Tensor, kv: Tensor) -> None:
        """Write the token's rotated keys and values (2, 1 or 2, batch, kv_heads, D) into the rings (row 0: its
        own, row 1: its fading ones); move the fading key and value of the token leaving the window from the side
        ring into the fading ring.

        Eager writes are `select(...).copy_`: at one token per step, indexing syntax costs as much as the copy.
        """
        slots = self._slots()
        slot = position % slots.window
        _put(cache.kv, 3, slot, kv.select(1, 0))
        if _maybe(position < slots.window):  # filling the ring; afterwards every in-context slot stays readable
            _open(cache.bias, slot)
        if not slots.fading:
            return
        if slots.pending:
            # token position - w leaves the window and starts to fade. A compiled step moves the side ring's slot
            # at every position: before the window is full its target slot is unread (bias -inf) and later
            # overwritten with the key it should hold.
            if _maybe(position >= self.window):
                fading_slot = slots.window + (position - self.window) % slots.fading
                _put(cache.kv, 3, fading_slot, _take(cache.pending, 3, slot))
                if isinstance(position, Tensor):
                    _set_bias(cache.bias, fading_slot, position >= self.window)
                elif position - self.window < slots.fading:
                    cache.bias[..., fading_slot] = 0.0
            _put(cache.pending, 3, slot, kv.select(1, 1))
        else:  # overlapping fading keys are read from their own token on
            fading_slot = slots.window + position % slots.fading
            _put(cache.kv, 3, fading_slot, kv.select(1, 1))
            if _maybe(position < slots.fading):
                _open(cache.bias, fading_slot)

    def _advance_memory(self, cache, position: int | Tensor, kv_raw: Tensor, features: Tensor) -> None:
        """Add the token (un-rotated key and value (2, batch, kv_heads, D), SSM features (batch, d)) to the current
        chunk; when the chunk completes, score its innovations, pick, keep the new memory in the ring and put the
        memory the next chunk reads in the memory slots.

        The innovations are needed only at the chunk's end, so they are computed then, for the
        whole chunk in one product, from the SSM outputs kept per row.
        """
        at = position % self.chunk
        _put(cache.chunk_kv, 2, at, kv_raw)
        _put(cache.chunk_ssm_prev, 1, at, cache.prev_ssm_out)
        cache.prev_ssm_out.copy_(features)
        operands = (cache.chunk_kv, cache.chunk_ssm_prev, *cache.ring._tensors(), cache.kv, cache.bias)
        if isinstance(position, Tensor):
            chunk = position // self.chunk
            if torch.compiler.is_compiling():
                new = torch.cond(at == self.chunk - 1, self._end_chunk, self._keep_chunk, (chunk, *operands))
            else:
                new = (self._end_chunk if bool(at == self.chunk - 1) else self._keep_chunk)(chunk, *operands)
        elif at == self.chunk - 1:
            chunk = torch.tensor(position // self.chunk, device=cache.kv.device)
            new = self._end_chunk(chunk, *operands)
        else:
            return
        for ring, snapshot in zip(cache.ring._tensors(), new[:5]):
            _put(ring, 1, chunk % self.lag, snapshot)
        self._store_memory_slots(cache, *new[5:])

    def _end_chunk(self, chunk: Tensor, chunk_kv: Tensor, chunk_ssm_prev: Tensor, *ring_and_buffers: Tensor
                   ) -> tuple[Tensor, ...]:
        """At the end of chunk `chunk` (0-d): the memory after it (its five tensors, for ring slot chunk % g), and
        the keys, values (2, batch, kv_heads, M, D) and bias (batch, 1, 1, M) of the memory slots for the next
        chunk. Pure (a `torch.cond` branch): the caller writes the results."""
        ring = ring_and_buffers[:5]  # then the decode buffer and its bias, which `_keep_chunk` reads
        chunk_k, chunk_v = chunk_kv.unbind(0)
        innovation = self._innovation(chunk_k, self.innovation_proj(chunk_ssm_prev))
        previous = self._ring_entry(ring, (chunk - 1) % self.lag, chunk >= 1)  # the memory after chunk - 1
        memory = update_memory(previous, chunk_k, chunk_v, innovation, chunk * self.chunk, chunk, self.picks,
                               self.decay)
        # The next chunk reads the memory after chunk + 1 - g, in a slot the new memory does not overwrite (g >= 2).
        return _own_contiguous(*memory._tensors(), *self._memory_slots(ring, chunk + 1))

    def _keep_chunk(self, chunk: Tensor, chunk_kv: Tensor, chunk_ssm_prev: Tensor, *ring_and_buffers: Tensor
                    ) -> tuple[Tensor, ...]:
        """`_end_chunk`'s results for a token inside a chunk: what ring slot chunk % g and the memory slots hold."""
        ring, (kv, bias) = ring_and_buffers[:5], ring_and_buffers[5:]
        slots = self._slots()
        kept = [_take(t, 1, chunk % self.lag) for t in ring]
        return _own_contiguous(*kept, *(t.narrow(3, slots.memory_start, slots.memory) for t in (kv, bias)))

    def _ring_entry(self, ring: tuple[Tensor, ...], slot: Tensor, present: Tensor) -> MemoryState:
        """The memory in ring slot `slot` (0-d) where `present` (0-d bool), else an empty memory."""
        entry = MemoryState(*(_take(t, 1, slot) for t in ring))
        empty = self._empty_memory(entry.k)
        return MemoryState(*(torch.where(present, t, e) for t, e in zip(entry._tensors(), empty._tensors())))

    def _memory_slots(self, ring: tuple[Tensor, ...], chunk: Tensor) -> tuple[Tensor, Tensor]:
        """What chunk `chunk` (0-d) reads in the memory slots: the memory after chunk - g, rotated to the chunk's
        memory position, as keys and values (2, batch, kv_heads, M, D) and bias (batch, 1, 1, M)."""
        memory = self._ring_entry(ring, (chunk - self.lag) % self.lag, chunk >= self.lag)
        cos, sin = self.rotary(self._memory_rotation(chunk).view(1), memory.k.dtype)
        kv = torch.stack([apply_rotary(memory.k.transpose(1, 2), cos, sin), memory.v.transpose(1, 2)])
        bias = torch.zeros_like(memory.innovation).masked_fill(~memory.valid, float("-inf"))
        return kv, bias[:, None, None]

    def _store_memory_slots(self, cache, kv: Tensor, bias: Tensor) -> None:
        slots = self._slots()
        cache.kv.narrow(3, slots.memory_start, slots.memory).copy_(kv)
        cache.bias.narrow(3, slots.memory_start, slots.memory).copy_(bias)


@dataclass(frozen=True)
class DecodeSlots:
    """Slots of a B/F/S layer's decode buffer, ``[in-context ring | fading ring | memory]``, and its side ring.

    Token ``t``'s keys sit in in-context slot ``t % window``. Its fading keys are read
    from when it leaves the window for ``w_f`` tokens (from its own step with
    overlapping fading keys); they wait in side-ring slot ``t % pending`` (``pending =
    window``; 0 with overlapping fading keys) and then move to fading slot
    ``window + t % fading`` (``fading = w_f``, 0 without a fading path).
    """

    window: int
    fading: int
    memory: int
    pending: int

    @property
    def memory_start(self) -> int:
        return self.window + self.fading

    @property
    def total(self) -> int:
        """Slots the query reads (the side ring is not among them)."""
        return self.window + self.fading + self.memory


class HeadRMSNorm(RMSNorm):
    """RMSNorm over head_dim applied to every head (queries or keys); one weight shared by all heads.

    Under tensor parallelism each rank holds some of the heads, so each rank's gradient
    of the shared weight is partial: the weight enters the graph through
    `share_across_tp`, whose backward sums the gradient over the ranks.
    """

    def __init__(self, head_dim: int, eps: float, factory: LayerFactory) -> None:
        super().__init__(head_dim, eps=eps)
        self.factory = factory

    def forward(self, x: Tensor) -> Tensor:
        ct = torch.promote_types(x.dtype, torch.float32)
        weight = self.factory.share_across_tp(self.weight)
        return (rms_normalize(x.to(ct), self.eps) * weight.to(ct)).to(x.dtype)


def _put(buffer: Tensor, dim: int, index: int | Tensor, value: Tensor) -> None:
    """``buffer.select(dim, index) = value``, for an int index or a 0-d tensor (a compiled step's)."""
    if isinstance(index, Tensor):
        buffer.index_copy_(dim, index.view(1), value.unsqueeze(dim))
    else:
        buffer.select(dim, index).copy_(value)


def _take(buffer: Tensor, dim: int, index: int | Tensor) -> Tensor:
    """``buffer.select(dim, index)``, for an int index or a 0-d tensor."""
    if isinstance(index, Tensor):
        return buffer.index_select(dim, index.view(1)).squeeze(dim)
    return buffer.select(dim, index)


def _own_contiguous(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Contiguous copies: a `torch.cond` branch must not return its inputs, and both branches' results get one
    layout (torch 2.13 merges the two branches' strides, torch/_higher_order_ops/cond.py `_bound_stride`, and
    fails on some size-1 axes of differing strides)."""
    return tuple(t.clone(memory_format=torch.contiguous_format) for t in tensors)


def _maybe(condition: bool | Tensor) -> bool:
    """An eager branch's condition; True for a tensor condition (a compiled step makes the write either way)."""
    return True if isinstance(condition, Tensor) else condition


def _open(bias: Tensor, slot: int | Tensor) -> None:
    """Let queries read bias slot `slot` (last axis)."""
    if isinstance(slot, Tensor):
        bias.index_fill_(-1, slot.view(1), 0.0)
    else:
        bias[..., slot] = 0.0


def _set_bias(bias: Tensor, slot: Tensor, readable: Tensor) -> None:
    """Open bias slot `slot` where `readable` (0-d bool); leave it as it is elsewhere."""
    index = slot.view(1)
    bias.index_copy_(-1, index, torch.where(readable, 0.0, bias.index_select(-1, index)))


def _attend(q: Tensor, keys: Tensor, values: Tensor, bias: Tensor | None = None) -> Tensor:
    """Attention of one query (batch, q_heads, 1, D) over (batch, kv_heads, n, D) keys, in one fused op.

    `bias` (batch, 1, 1, n) is added to the scores (0 or -inf); None: every key is read.
    """
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=bias, enable_gqa=q.shape[1] != keys.shape[1])
