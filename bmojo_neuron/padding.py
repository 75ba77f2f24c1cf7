"""Padded batches: a token whose ``attention_mask`` is 0 is removed from its sequence.

A recurrent layer cannot skip a token the way an attention mask can: everything it
reads enters its state. So instead of masking inside every layer, the model moves
each row's real tokens to the front of the row, in order ("packing"), runs the
unchanged layers, and reads every output back at its original place. In the packed
layout a row's real tokens sit at positions ``0 .. n - 1``, so positions, windows,
fading keys, memory chunks and the SSM state count real tokens only, and the pad
tokens come after every real token of their row: by causality nothing a real token
computes can depend on them. The result for each real token is that of its sequence
run alone with the masked tokens deleted, whether the padding is on the left, on the
right or in between (HF's attention models give the same for a mask with holes:
the masked token is not attended to and positions count real tokens).

Packing is a stable sort of the mask and two gathers: fixed shapes and no host
synchronisation, so a masked training step still traces to one static graph.

A masked position's output is that of the last real token before it in its row
(zeros before the first real token). That is what makes a right-padded prompt
generate correctly: the logits at its last (pad) position are those of its last real
token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .layers.factory import IGNORE_INDEX


@dataclass
class PackedLayout:
    """Where each row's real tokens go and where each original position reads its output.

    All fields are (batch, L).
    """

    order: Tensor  # long: original index of the token at each packed slot (real tokens first)
    real: Tensor  # bool: the packed slot holds a real token
    source: Tensor  # long: packed slot whose output each original position takes
    has_source: Tensor  # bool: a real token at or before the original position


def packed_layout(attention_mask: Tensor) -> PackedLayout:
    """The packing of `attention_mask` (batch, L); nonzero means a real token."""
    mask = attention_mask != 0
    # A float key: torch-xla lowers sort to the Neuron compiler's TopK, which refuses integer input.
    order = torch.sort(mask.to(torch.float32), dim=1, descending=True, stable=True).indices
    count = mask.long().cumsum(dim=1)
    return PackedLayout(order, mask.gather(1, order), (count - 1).clamp(min=0), count > 0)


def take_along_time(x: Tensor, index: Tensor) -> Tensor:
    """``x[b, index[b, t]]`` for x (batch, L, ...) and index (batch, L')."""
    expanded = index.view(*index.shape, *(1,) * (x.dim() - 2)).expand(*index.shape, *x.shape[2:])
    return x.gather(1, expanded)


def pack(x: Tensor, layout: PackedLayout) -> Tensor:
    """Original layout -> packed layout, for (batch, L, ...) inputs."""
    return take_along_time(x, layout.order)


def unpack(x: Tensor, layout: PackedLayout) -> Tensor:
    """Packed layout -> original layout; masked positions get the last real token's output (zeros before any)."""
    out = take_along_time(x, layout.source)
    keep = layout.has_source.view(*layout.has_source.shape, *(1,) * (x.dim() - 2))
    return out * keep.to(out.dtype)


def real_token_targets(labels: Tensor, attention_mask: Tensor) -> Tensor:
    """Targets aligned with the logits (like ``shift_labels``) for a padded batch.

    A real token is scored against the label of the next *real* token of its row;
    masked positions and each row's last real token get -100. With no zeros in the
    mask this is the usual shift (``labels[t + 1]``).
    """
    layout = packed_layout(attention_mask)
    packed = labels.gather(1, layout.order).masked_fill(~layout.real, IGNORE_INDEX)
    shifted = torch.cat([packed[:, 1:], packed.new_full((packed.shape[0], 1), IGNORE_INDEX)], dim=1)
    return shifted.gather(1, layout.source).masked_fill(attention_mask == 0, IGNORE_INDEX)


def masked_mean(values: Tensor, real: Tensor | None) -> Tensor:
    """Mean of `values` (batch, L) over the real tokens (all of them when `real` is None)."""
    if real is None:
        return values.mean()
    weight = real.to(values.dtype)
    return (values * weight).sum() / weight.sum().clamp(min=1)


def has_padding(attention_mask: Tensor) -> bool:
    """Whether any token is masked (reads the mask on the host: not for traced training steps)."""
    return not bool((attention_mask != 0).all())


def mask_for_inputs(attention_mask: Tensor, length: int) -> Tensor:
    """The columns of `attention_mask` that belong to the `length` new tokens.

    transformers passes a mask over the cached tokens and the new ones; only the last
    `length` columns describe this call's inputs.
    """
    if attention_mask.dim() != 2 or attention_mask.shape[1] < length:
        raise ValueError(
            f"attention_mask must be (batch, at least {length}) for {length} input tokens, "
            f"got shape {tuple(attention_mask.shape)}"
        )
    return attention_mask[:, attention_mask.shape[1] - length:]
