"""The pre-norm decoder block: ``x + Mixer(RMSNorm(x))``, then ``x + MLP(RMSNorm(x))``."""

from __future__ import annotations

from torch import Tensor
from transformers.modeling_layers import GradientCheckpointingLayer

from ..configuration_bmojo import BMojoConfig
from .attention import BMojoAttention
from .mlp import SwiGLU
from .norms import norm_rows
from .factory import get_layer_factory
from .ssm import build_ssm_mixer

RESIDUAL_OUTPUTS = ("o_proj", "out_proj", "down_proj")  # scaled down at init (GPT-2 scheme)


class BMojoDecoderLayer(GradientCheckpointingLayer):
    """One layer of kind ``config.layer_pattern[layer_idx]``: SSM-only (``M``) or attention (B, F, S, A)."""

    def __init__(self, config: BMojoConfig, layer_idx: int) -> None:
        super().__init__()
        self.kind = config.layer_kind(layer_idx)
        layers = get_layer_factory()
        self.mixer_norm = layers.norm(config.hidden_size, eps=config.rms_norm_eps)
        self.mixer = build_ssm_mixer(config, layer_idx) if self.kind == "M" else BMojoAttention(config, layer_idx)
        self.mlp_norm = self.mlp = None
        if config.intermediate_size > 0:
            self.mlp_norm = layers.norm(config.hidden_size, eps=config.rms_norm_eps)
            self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)
        for name, module in self.named_modules():
            if name.endswith(RESIDUAL_OUTPUTS):
                module.is_residual_output = True

    def forward(
        self, hidden_states: Tensor, start: int = 0, cache=None, real_tokens: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Returns the new hidden states and the layer's mean innovation (None without memory).

        `real_tokens` (batch, L) marks the real tokens of a packed padded batch
        (`bmojo_neuron.padding`); only they count in the mean innovation.
        """
        if cache is not None and hidden_states.shape[1] == 1 and (start > 0 or self.kind == "M"):
            return self.decode_token(hidden_states[:, 0], start, cache).unsqueeze(1), None
        innovation = None
        normed = self.mixer_norm(hidden_states)
        if self.kind == "M":
            mixed = self.mixer(normed, state=cache)
        else:
            mixed, innovation = self.mixer(normed, start=start, cache=cache, real_tokens=real_tokens)
        hidden_states = hidden_states + mixed
        if self.mlp is not None:
            hidden_states = hidden_states + self.mlp(self.mlp_norm(hidden_states))
        return hidden_states, innovation

    def decode_token(self, h: Tensor, position: int | Tensor, cache) -> Tensor:
        """One token's hidden state `h` (batch, d) at `position` (int or 0-d tensor) through the layer, advancing its `cache`.

        Rows in, rows out (the decode steps of the mixers work on rows): every linear then
        is one matrix product, with no sequence axis to add and drop around it.
        """
        normed = norm_rows(self.mixer_norm, h)
        mixed = self.mixer.step(normed, cache) if self.kind == "M" else self.mixer.decode_token(normed, position, cache)
        h = h + mixed
        if self.mlp is not None:
            h = h + self.mlp.rows(norm_rows(self.mlp_norm, h))
        return h
