"""The recurrent decode cache of a B'MOJO model (docs/design.md, "The model" and "Decode cache").

Per layer it holds only what the next token can read, so the work and memory per
generated token do not grow with the context (except for full-attention ``A``
layers, whose KV cache grows by design):

* SSM: conv and scan states (`SSMState`, owned by the mixer);
* windows and memory, for B/F/S layers: one preallocated buffer of rotated keys and
  values, ``[in-context ring (w) | fading ring (w_f) | memory (M)]``, an additive bias
  saying which slots the next query reads, and a side ring of the fading keys of the
  last ``w`` tokens, which start to fade when they leave the window; a token writes its
  keys in place (`layers.attention.DecodeSlots`). ``A`` layers keep every token's keys in
  a buffer with room for ``max_length`` tokens (eagerly it doubles when full);
* eidetic memory: a ring of the memories after the last ``g`` complete chunks (chunk
  ``j`` reads the one after chunk ``j - g``, the next chunk to complete updates the one
  after the last), and the current chunk's un-rotated keys, values and the SSM outputs
  its innovation predictor reads (preallocated, ``c`` rows; the innovations are scored
  when the chunk completes, which also puts the next chunk's memory in its slots);
* the previous SSM output.

Every tensor above has a fixed size and decoding writes into it in place; the position
is a 0-d tensor too (`BMojoCache.position`). So a one-token decode step has static shapes
and, given the position as a tensor, no Python branch on it: `torch.compile(model,
fullgraph=True)` runs it as one graph, and later steps reuse that graph (docs/hf.md,
"Compiled decoding"); with ``A`` layers the cache needs its ``max_length`` for that.

A padded batch (an ``attention_mask`` with zeros) keeps its rows in groups instead
(`BMojoCache.groups`): rows that hold different numbers of real tokens sit at
different positions, and a B layer's memory chunks end at different steps in each,
so only rows of equal length share a batched cache (docs/hf.md, "Padding").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .layers.eidetic_memory import MemoryState
from .layers.ssm_state import SSMState


@dataclass
class AttentionLayerCache:
    """Decode state of one B/F/S/A layer. Key/value buffers are (batch, kv_heads, n, head_dim)."""

    kv: Tensor | None = None  # (2, batch, kv_heads, slots, head_dim), [0] rotated keys, [1] values; A: token t in slot t
    bias: Tensor | None = None  # (batch, 1, 1, slots): 0 where the next query reads the slot, -inf elsewhere
    pending: Tensor | None = None  # (2, batch, kv_heads, w, head_dim): rotated fading keys and values not yet read
    ssm: SSMState | None = None
    prev_ssm_out: Tensor | None = None  # (batch, hidden)
    ring: MemoryState | None = None  # (batch, g, M, ...): slot j % g holds the memory after chunk j
    chunk_kv: Tensor | None = None  # (2, batch, c, kv_heads, head_dim): un-rotated keys, values; rows up to position % c are set
    chunk_ssm_prev: Tensor | None = None  # (batch, c, hidden): row i holds S of the token before the chunk's i-th
    max_length: int | None = None  # A: the tokens its buffer holds from the prompt on (`BMojoCache.max_length`)

    def __setstate__(self, state: dict) -> None:
        """Unpickling: a field added since the cache was pickled takes its default (every field has one); a field
        this layout no longer has (an older layout: separate keys and values, A layers' growing `ctx_k`, memory
        snapshots) cannot be converted, and raises one error naming it."""
        fields = {field.name: field.default for field in dataclasses.fields(self)}
        unknown = sorted(set(state) - set(fields))
        if unknown:
            raise ValueError(older_layout_error(f"its layers hold {', '.join(unknown)}"))
        self.__dict__.update(fields)
        self.__dict__.update(state)

    def reorder(self, index: Tensor) -> None:
        for name in ("bias", "prev_ssm_out", "chunk_ssm_prev"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.index_select(0, index))
        for name in ("kv", "pending", "chunk_kv"):  # keys and values stacked in front of the batch
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.index_select(1, index))
        if self.ssm is not None:
            self.ssm.reorder(index)
        if self.ring is not None:
            self.ring = self.ring.reorder(index)

    # Decoding writes into these in place (an A layer's buffer, when full, it replaces with a larger one: `grow`).
    WRITTEN_IN_PLACE = ("kv", "bias", "pending", "prev_ssm_out", "chunk_kv", "chunk_ssm_prev")

    def grow(self, capacity: int) -> None:
        """Room for `capacity` tokens in an A layer's buffer (new slots unread); eager decoding only.

        The larger buffer and bias replace the old ones, so they are marked static as the
        old ones were (`BMojoCache.note_new_tensors`): a compiled step run after this one
        then reads them where they are. They are inference tensors only if the old ones
        were, so `BMojoCache.holds_inference_tensors` stays true of the cache when an
        ordinary cache grows under `torch.inference_mode()`.
        """
        extra = capacity - self.kv.shape[3]
        with torch.inference_mode(self.kv.is_inference()):
            self.kv = torch.cat([self.kv, self.kv.new_zeros(*self.kv.shape[:3], extra, self.kv.shape[4])], dim=3)
            self.bias = F.pad(self.bias, (0, extra), value=float("-inf"))
        mark_static_addresses((self.kv, self.bias))

    def copy(self) -> AttentionLayerCache:
        """A cache that decodes independently of this one: the tensors decoding writes into are cloned."""
        ssm = self.ssm.copy() if self.ssm is not None else None
        ring = self.ring.clone() if self.ring is not None else None
        own = {name: getattr(self, name).clone() for name in self.WRITTEN_IN_PLACE if getattr(self, name) is not None}
        return dataclasses.replace(self, ssm=ssm, ring=ring, **own)

    def tensors(self) -> Iterator[Tensor]:
        """Every tensor this layer's decoding reads or writes."""
        yield from (getattr(self, name) for name in self.WRITTEN_IN_PLACE if getattr(self, name) is not None)
        if self.ssm is not None:
            yield from ssm_state_tensors(self.ssm)
        if self.ring is not None:
            yield from self.ring._tensors()


def older_layout_error(what: str) -> str:
    return (f"BMojoCache: this cache was pickled by an older bmojo-neuron ({what}), whose layout this version cannot "
            "continue; run the prompt through the model again to fill a new cache")


def mark_static_addresses(tensors: Iterable[Tensor]) -> None:
    """Mark decode tensors, which keep their addresses from step to step, with `torch._dynamo.mark_static_address`.

    So marked, CUDA graphs (``mode="reduce-overhead"``) read them where they are instead
    of copying each into the graph's own input buffers every step. transformers'
    StaticCache marks its buffers where it allocates them, outside compiled code
    (`mark_static_address` is refused there): src/transformers/cache_utils.py,
    `StaticLayer.lazy_initialization` (5.25.0). Eager code is unaffected.
    """
    if torch.compiler.is_compiling():
        return
    for tensor in tensors:
        torch._dynamo.mark_static_address(tensor)


def ssm_state_tensors(state: SSMState) -> Iterator[Tensor]:
    yield from state.conv_states.values()
    if state.ssm_state is not None:
        yield state.ssm_state
    yield state.counter


@dataclass
class RowGroup:
    """Rows of a padded batch that have read the same number of real tokens, sharing one batched cache."""

    rows: list[int]  # indices in the batch, in the order of `cache`'s rows
    cache: BMojoCache


class BMojoCache:
    """Cache passed to `BMojoForCausalLM.forward` / `generate()` (argument ``cache`` or ``past_key_values``).

    A fresh cache is filled by the first (parallel) forward; later calls advance it
    token by token. Once a padded batch arrives, the rows live in `groups`: rows that
    have read the same number of real tokens sit at the same position and share a
    batched cache; `layers` is then unused.
    """

    is_compileable = True

    def __init__(self, num_layers: int, max_length: int | None = None) -> None:
        if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
            raise ValueError(f"BMojoCache: max_length must be a positive int or None, got {max_length!r}")
        self.layers: list[AttentionLayerCache | SSMState | None] = [None] * num_layers
        # Tokens the A layers' buffers hold from the prompt on (None: the prompt's length, rounded up); a compiled
        # decode step cannot grow them, so it needs this.
        self.max_length = max_length
        # Input positions read, pads included: a 0-d long tensor on the model's device once a forward has read a
        # token (None before), advanced in place, so a compiled decode step reads it as an input, not a constant.
        self.position: Tensor | None = None
        # `position` as a host int, kept in step with it, so eager decoding never reads the tensor back (on CUDA a
        # read is a device sync per token). None while unknown: a compiled step advances the tensor without it
        # (reading it there would make the int a constant of the graph, guarded, recompiled every token).
        self._host_position: int | None = None
        self.holds_inference_tensors = False  # made under torch.inference_mode() (`note_new_tensors`)
        self.groups: list[RowGroup] | None = None

    def __setstate__(self, state: dict) -> None:
        """Unpickling. Attributes added since the cache was pickled are rebuilt: no `max_length` (A layers' buffers
        sized from their prompt, as they were), the host position unknown (read back from the tensor once, at the
        next use). The inference flag is taken from the loaded tensors, which unpickling makes ordinary tensors
        whatever they were, and they are marked static again (`note_new_tensors`). A cache that kept its position
        as an int (no `position` tensor) has an older layer layout too: one error says it cannot be continued."""
        if "position" not in state:
            raise ValueError(older_layout_error("its position an int, not a tensor"))
        self.__dict__.update(max_length=None, _host_position=None, holds_inference_tensors=False, groups=None)
        self.__dict__.update(state)
        self.note_new_tensors()

    @property
    def seen_tokens(self) -> int:
        """Input positions read so far, pads included (`position` as an int, read back only after compiled steps)."""
        if self.position is None:
            return 0
        if self._host_position is None:
            self._host_position = int(self.position)
        return self._host_position

    def advance(self, tokens: int, device: torch.device) -> None:
        """Count `tokens` more input positions read (none: nothing changes)."""
        if tokens == 0:
            return
        if self.position is None:
            self.position = torch.zeros((), dtype=torch.long, device=device)
            self._host_position = 0
        self.position.add_(tokens)
        if self._host_position is not None:
            self._host_position += tokens

    def count_decoded_token(self, static: bool) -> None:
        """Count one decoded token; `static` (a compiled step): the host int is left unknown (`_host_position`)."""
        self.position.add_(1)
        self._host_position = None if static else self._host_position + 1

    def tensors(self) -> Iterator[Tensor]:
        """The position and every layer's decode tensors (those of `groups` excluded: a padded batch is not
        compiled, `BMojoForCausalLM._valid_auto_compile_criteria`)."""
        if self.position is not None:
            yield self.position
        for layer in self.layers:
            if isinstance(layer, SSMState):
                yield from ssm_state_tensors(layer)
            elif layer is not None:
                yield from layer.tensors()

    def note_new_tensors(self) -> None:
        """After an eager forward that filled the cache, a reorder or a copy (new decode tensors): mark them static
        (`mark_static_addresses`; an A layer's buffer that grows marks its own, `AttentionLayerCache.grow`) and note
        whether they are inference tensors (`check_continuable`)."""
        if torch.compiler.is_compiling():
            return
        tensors = list(self.tensors())
        self.holds_inference_tensors = any(tensor.is_inference() for tensor in tensors)
        mark_static_addresses(tensors)

    def check_continuable(self) -> None:
        """Refuse, before any work, to continue outside `torch.inference_mode()` a cache filled under it.

        Its tensors are inference tensors, which torch lets no code outside inference mode
        update in place, as decoding does; transformers' StaticCache fails the same way, at
        its first write. A `copy` made outside inference mode holds ordinary tensors and
        continues. Checked on a flag, without reading the tensors (nor under compiling).
        """
        if torch.compiler.is_compiling():
            return
        if self.holds_inference_tensors and not torch.is_inference_mode_enabled():
            raise RuntimeError(
                "BMojoCache: this cache was filled under torch.inference_mode(), and its tensors cannot be updated "
                "outside it; continue it under torch.inference_mode() too, or continue its cache.copy() made outside "
                "it, or fill it under torch.no_grad() instead"
            )

    def start_row_groups(self, batch_size: int) -> None:
        """Move the batch's state into one group of all its rows (they have all read the same tokens so far)."""
        if self.groups is not None:
            return
        whole = BMojoCache(len(self.layers), self.max_length)
        whole.layers, whole.position, whole._host_position = self.layers, self.position, self._host_position
        whole.holds_inference_tensors = self.holds_inference_tensors
        self.groups = [RowGroup(list(range(batch_size)), whole)]
        self.layers = [None] * len(self.layers)

    def select_rows(self, index: Tensor) -> BMojoCache:
        """A new cache holding the rows `index` of this one (a row may appear twice); this one is unchanged."""
        new = self.copy()
        new.reorder_cache(index)
        return new

    def copy(self) -> BMojoCache:
        """A cache that decodes independently of this one (`AttentionLayerCache.copy`)."""
        new = BMojoCache(len(self.layers), self.max_length)
        new.position = None if self.position is None else self.position.clone()
        new._host_position = self._host_position
        new.layers = [None if layer is None else layer.copy() for layer in self.layers]
        if self.groups is not None:
            new.groups = [RowGroup(list(g.rows), g.cache.copy()) for g in self.groups]
        new.note_new_tensors()
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
        if self.groups is not None:
            self.groups = self._reordered_groups(beam_idx)
            return
        for layer in self.layers:
            if layer is not None:
                layer.reorder(beam_idx)
        self.note_new_tensors()

    def _reordered_groups(self, beam_idx: torch.LongTensor) -> list[RowGroup]:
        """New row i takes old row ``beam_idx[i]``: rows drawn from one group form a new group."""
        sources = beam_idx.tolist()
        groups = []
        for group in self.groups:
            offset = {row: k for k, row in enumerate(group.rows)}
            picked = [(i, offset[src]) for i, src in enumerate(sources) if src in offset]
            if picked:
                index = torch.tensor([k for _, k in picked], device=beam_idx.device)
                groups.append(RowGroup([i for i, _ in picked], group.cache.select_rows(index)))
        return groups

    def __len__(self) -> int:
        return len(self.layers)
