"""Rotary position embeddings (RoPE), rotate-half convention, with optional frequency scaling.

Angles are ``position / theta^(2i / head_dim)``, computed in float32 (float64 for a
float64 model). Hugging Face's Llama and Qwen compute ``position * (1 / theta^(2i / head_dim))``:
the same numbers up to rounding, so a primed all-attention model matches its source
to about 1e-6 (relative), not bit for bit.

Scaling (``config.rope_scaling_params``; ``None`` means none):

* ``{"rope_type": "linear", "factor": f}``: every inverse frequency divided by ``f``;
* ``{"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
  "original_max_position_embeddings"}``: the Llama 3.1 rule -- wavelengths shorter
  than ``original / high_freq_factor`` are kept, those longer than
  ``original / low_freq_factor`` are divided by ``factor``, the band in between is
  interpolated linearly in ``original / wavelength``.

Both are static (independent of the sequence length), so decoding and the parallel
forward agree at any length. Types that change with the length (``dynamic``) or that
rescale cos/sin (``yarn``, ``longrope``) are not supported.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .. import ops
from .eager_gate import keeps_eager_constants


def rotation_periods(
    head_dim: int, theta: float, scaling: Mapping[str, Any] | None = None, dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
) -> Tensor:
    """The head_dim / 2 divisors ``p_i`` of the rotation angles (``angle_i = position / p_i``), in `dtype`, on
    `device`.

    Unscaled, ``p_i = theta^(2i / head_dim)``; a scaling divides the inverse frequencies
    ``1 / p_i`` as `scaling` says. Made where they are used: inside a forward on XLA, a table made on the
    host and moved over would be a host-to-device copy at every step.
    """
    periods = theta ** (torch.arange(0, head_dim, 2, dtype=dtype, device=device) / head_dim)
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type == "linear":
        return periods * scaling["factor"]
    if rope_type == "llama3":
        return 1.0 / _llama3_scaled(1.0 / periods, scaling)
    return periods


def _llama3_scaled(inv_freq: Tensor, params: Mapping[str, Any]) -> Tensor:
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    original = params["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv_freq
    long_waves = torch.where(wavelength > original / low, inv_freq / factor, inv_freq)
    blend = (original / wavelength - low) / (high - low)
    blended = (1 - blend) * long_waves / factor + blend * long_waves
    in_band = (wavelength >= original / high) & (wavelength <= original / low)
    return torch.where(in_band, blended, long_waves)


class RotaryEmbedding(nn.Module):
    """Produces cos/sin tables for arbitrary integer positions.

    The frequencies are recomputed per call (head_dim / 2 numbers) rather than kept in a
    buffer: a non-persistent buffer is not restored by `from_pretrained`'s meta-device load.
    """

    def __init__(self, head_dim: int, theta: float, scaling: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.scaling = dict(scaling) if scaling is not None else None
        # Decoding asks for one position per token and layer: the periods and signs it
        # needs are kept per (dtype, device), a plain attribute (not a buffer, see above).
        self._decode_constants: dict[tuple[torch.dtype, torch.device], tuple[Tensor, Tensor]] = {}
        self._settings = (head_dim, theta, repr(sorted(self.scaling.items())) if self.scaling else None)

    # Every layer of a model asks for the same position in turn, and layers with the same
    # settings get the same tables: the last position's tables are kept per settings, dtype and
    # device, shared by all instances (never written after they are made).
    _last_position: dict[tuple, tuple[int, Tensor, Tensor]] = {}

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, sin of shape ``positions.shape + (head_dim,)``.

        Computed in float32 (Trainium has no float64), or float64 for a float64 model.
        """
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        periods = rotation_periods(self.head_dim, self.theta, self.scaling, compute, positions.device)
        freqs = positions.to(compute)[..., None] / periods
        angles = torch.cat([freqs, freqs], dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    # The tables of positions 0..L-1, the ones every forward over L tokens asks for (once per attention layer),
    # kept on eager runs per settings, length, dtype and device, shared by all instances, never written after
    # they are made; the oldest is dropped beyond `_PREFIX_TABLES_KEPT` (a few lengths: training and
    # evaluation, at most ~8 MB a table at 16K tokens and head_dim 64 in float32).
    _prefix_tables: OrderedDict[tuple, tuple[Tensor, Tensor]] = OrderedDict()
    _PREFIX_TABLES_KEPT = 4

    def prefix(self, length: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """`forward` of positions ``0..length-1`` in `like`'s dtype and on its device, (length, head_dim) each.

        Made once and handed out again where `keeps_eager_constants(like)` (eager CPU and CUDA); a traced graph
        makes them in the graph at every call, as `forward` does (on Neuron, constants the compiler folds).
        """
        if not keeps_eager_constants(like):
            return self(torch.arange(length, device=like.device), like.dtype)
        key = (self._settings, length, like.dtype, like.device)
        kept = RotaryEmbedding._prefix_tables
        if key in kept:
            kept.move_to_end(key)
            return kept[key]
        with torch.inference_mode(False), torch.no_grad():  # usable by a later training step, too
            tables = self(torch.arange(length, device=like.device), like.dtype)
        kept[key] = tables
        while len(kept) > RotaryEmbedding._PREFIX_TABLES_KEPT:
            kept.popitem(last=False)
        return tables

    def at_position(self, position: int | Tensor, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        """cos and *signed* sin (head_dim,) of one position, for `apply_rotary_rolled` (decoding).

        The same numbers as ``forward`` at that position (the angle is the same float
        division), with sin's first half negated, so the rotation needs a roll instead of
        the negated, concatenated halves. `position` is an int (eager decoding: tables kept
        per position) or a 0-d tensor (a compiled step: computed in the graph).
        """
        if isinstance(position, Tensor):
            return self._tables_at(position, dtype, device)
        shared = (self._settings, dtype, device)
        last = RotaryEmbedding._last_position.get(shared)
        if last is not None and last[0] == position:
            return last[1], last[2]
        cos, sin = self._tables_at(position, dtype, device)
        RotaryEmbedding._last_position[shared] = (position, cos, sin)
        return cos, sin

    def at_position_for_heads(self, position: int | Tensor, dtype: torch.dtype, device: torch.device,
                              layout: tuple[tuple[int, bool], ...]) -> tuple[Tensor, Tensor]:
        """`at_position`'s tables for consecutive groups of heads, (heads, head_dim): `layout` lists (heads,
        rotated); heads that are not rotated get cos 1 and sin 0, so `apply_rotary_rolled` returns them exactly.

        Lets one rotation cover keys, values and queries projected side by side (decoding).
        """
        shared = (self._settings, dtype, device, layout)
        last = None if isinstance(position, Tensor) else RotaryEmbedding._last_position.get(shared)
        if last is not None and last[0] == position:
            return last[1], last[2]
        cos, sin = self.at_position(position, dtype, device)
        one, zero = torch.ones_like(cos), torch.zeros_like(sin)
        cos = torch.cat([(cos if rotated else one).expand(heads, -1) for heads, rotated in layout])
        sin = torch.cat([(sin if rotated else zero).expand(heads, -1) for heads, rotated in layout])
        if not isinstance(position, Tensor):
            RotaryEmbedding._last_position[shared] = (position, cos, sin)
        return cos, sin

    def _tables_at(self, position: int | Tensor, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        if isinstance(position, Tensor):  # a compiled step: constants made in the graph (folded by the compiler)
            periods, sign = self._periods_and_sign(compute, device)
            angles = position.to(compute) / periods
        else:
            key = (dtype, torch.device(device))
            if key not in self._decode_constants:
                self._decode_constants[key] = self._periods_and_sign(compute, device)
            periods, sign = self._decode_constants[key]
            angles = torch.full_like(periods, float(position)).div_(periods)
        cos, sin = angles.cos(), angles.sin().mul_(sign)
        return (cos, sin) if dtype == compute else (cos.to(dtype), sin.to(dtype))

    def _periods_and_sign(self, compute: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        """The head_dim periods (each half's) and the sign of sin per channel, -1 on the first half; made on
        `device` (in a compiled step, host-made constants would be copied over at every token)."""
        periods = rotation_periods(self.head_dim, self.theta, self.scaling, compute, device)
        half = periods.shape[0]
        sign = torch.ones(2 * half, dtype=compute, device=device)
        sign[:half] = -1.0
        return torch.cat([periods, periods]), sign


def apply_rotary_rolled(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """`apply_rotary` with `RotaryEmbedding.at_position`'s tables: ``x cos + roll(x, D/2) signed_sin``.

    Rolling the last axis by half swaps the halves, and the sign of sin's first half makes
    it the rotate-half of `apply_rotary`: the same products and sums, in fewer ops.
    """
    return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * signed_sin


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate `x` (..., L, head_dim) by tables broadcastable to it: the `rotary` op (`ops.reference.rotary`), so
    the active ops backend runs it (the torch one: an in-place form on eager CPU tensors, the plain
    expression elsewhere)."""
    return ops.rotary(x, cos, sin)
