"""Distillation: train a primed model's new paths to do what the attention they replace did.

The teacher is the source transformer, and it is already inside the primed model: every
``A``, ``S``, ``F`` and ``B`` layer holds the source's q/k/v/o, norms and MLP, so running
each layer as full causal attention (`BMojoAttention.full_attention`) *is* the source.
No second model is loaded and no weight is duplicated.

`LayerwiseDistillation` is a training objective (``objective(model, input_ids, labels)
-> (loss, metrics)``). Per micro-batch:

1. teacher pass, without gradients: ``h_0 = embed(ids)``, ``h_{i+1} = teacher_layer_i(h_i)``;
2. each distilled layer (a ``B`` or ``F`` layer with an SSM) runs as the student on the
   teacher's input, ``y_i = layer_i(h_i)``, and ``hidden_mse = mean_i mean((y_i - h_{i+1})^2)``
   over the distilled layers (the layers train independently, in parallel);
3. optionally (``kl_weight > 0``) the student runs end to end and
   ``kl = T^2 KL(softmax(teacher / T) || softmax(student / T))`` per token;
4. ``loss = hidden_weight * hidden_mse + kl_weight * kl + aux``, where ``aux`` is the
   innovation loss of the ``B`` layers (it trains their predictors, as in pre-training).

`freeze_shared` leaves only the parameters priming added trainable (`new_parameter_names`):
the SSMs (with their residual gains and `fading_norm` norms), untied fading projections and
innovation predictors. ``M`` layers are refused:
they keep no attention weights, so the model holds no teacher for them.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Inside a B, F or S layer: the parameters priming adds (everything else is the source's).
NEW_PARAMETER_PARTS = ("mixer.ssm.", "mixer.ssm_norm.", "mixer.ssm_residual_gain", "mixer.k_fading_proj.",
                       "mixer.v_fading_proj.", "mixer.innovation_proj.")
METRIC_NAMES = ("loss", "hidden_mse", "kl", "aux_loss")  # what the objective returns besides the loss


LAYER_NAME = re.compile(r"(?:^|\.)model\.layers\.(\d+)\.(.*)$")  # also inside a wrapper (NxD, pipeline stage)


def is_new_parameter(name: str, layer_pattern: str) -> bool:
    """Whether parameter `name` of a B'MOJO model (possibly inside a wrapper) is one its source did not have."""
    match = LAYER_NAME.search(name)
    if match is None:
        return False
    kind, inner = layer_pattern[int(match.group(1))], match.group(2)
    return (kind == "M" and inner.startswith("mixer.")) or inner.startswith(NEW_PARAMETER_PARTS)


def new_parameter_names(model: nn.Module, config: Any = None) -> list[str]:
    """Names of the parameters of `model` (a `BMojoForCausalLM`, possibly wrapped) that its source transformer
    did not have; `config` defaults to ``model.config``."""
    pattern = (config or model.config).layer_pattern
    return [name for name, _ in model.named_parameters() if is_new_parameter(name, pattern)]


def freeze_shared(model: nn.Module, config: Any = None) -> int:
    """Freeze every parameter but the new ones; returns how many values stay trainable (this rank's)."""
    config = config or model.config
    new = set(new_parameter_names(model, config))
    trainable = 0
    for name, param in model.named_parameters():
        param.requires_grad_(name in new)
        trainable += param.numel() if name in new else 0
    if not trainable:
        raise ValueError("distillation: the model has no new parameters to train (layer_pattern "
                         f"{config.layer_pattern!r} has no B, F or M layer with an SSM)")
    return trainable


def distilled_layers(config: Any) -> list[int]:
    """Indices of the layers the objective compares with the teacher: the B and F layers that have an SSM."""
    if "M" in config.layer_pattern:
        raise ValueError(f"distillation: layer_pattern {config.layer_pattern!r} has M layers; an M layer keeps no "
                         "attention weights, so the primed model holds no teacher for it (use B or F layers)")
    layers = config.ssm_layers()
    if not layers:
        raise ValueError(f"distillation: layer_pattern {config.layer_pattern!r} (fading_window "
                         f"{config.fading_window}, memory_size {config.memory_size}) has no new path to distil")
    return layers


class LayerwiseDistillation:
    """The distillation objective: teacher = the primed model's own attention (see the module docstring)."""

    metric_names = METRIC_NAMES

    def __init__(self, hidden_weight: float = 1.0, kl_weight: float = 0.0, kl_temperature: float = 1.0) -> None:
        if hidden_weight < 0 or kl_weight < 0 or hidden_weight + kl_weight == 0:
            raise ValueError("distill.hidden_weight and distill.kl_weight must be >= 0, not both 0")
        if kl_temperature <= 0:
            raise ValueError(f"distill.kl_temperature must be > 0, got {kl_temperature}")
        self.hidden_weight, self.kl_weight, self.temperature = hidden_weight, kl_weight, kl_temperature

    def __call__(self, model: nn.Module, input_ids: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(loss, [loss, hidden_mse, kl, aux_loss] detached)`` of one micro-batch."""
        core = model.model
        if core.factory.sequence_parallel:
            raise ValueError("distillation does not run with sequence parallelism (parallel.sp: false)")
        distilled = distilled_layers(model.config)
        teacher = self.teacher_states(model, input_ids)
        mse, innovations = [], []
        for i in distilled:
            student, innovation = core.layers[i](teacher[i])
            mse.append((student.float() - teacher[i + 1].float()).pow(2).mean())
            if innovation is not None:
                innovations.append(innovation)
        hidden_mse = torch.stack(mse).mean()
        zero = hidden_mse.new_zeros(())
        aux = model.config.innovation_loss_weight * torch.stack(innovations).mean() if innovations else zero
        kl = self.logits_kl(model, input_ids, teacher[-1]) if self.kl_weight else zero
        loss = self.hidden_weight * hidden_mse + self.kl_weight * kl + aux
        return loss, torch.stack([loss, hidden_mse, kl, aux]).detach()

    @torch.no_grad()
    def teacher_states(self, model: nn.Module, input_ids: Tensor) -> list[Tensor]:
        """``[h_0, ..., h_L]``: the embeddings and every layer's output of the source transformer."""
        core = model.model
        states = [core.embed_tokens(input_ids)]
        for layer in core.layers:
            states.append(teacher_layer(layer, states[-1]))
        return states

    def logits_kl(self, model: nn.Module, input_ids: Tensor, teacher_last: Tensor) -> Tensor:
        """Mean per-token ``T^2 KL(teacher || student)`` of the next-token distributions."""
        core, temperature = model.model, self.temperature
        with torch.no_grad():
            teacher = model.factory.gather_vocab(model.lm_head(core.norm(teacher_last))).float()
        student = model(input_ids).logits.float()
        log_student = F.log_softmax(student / temperature, dim=-1)
        log_teacher = F.log_softmax(teacher / temperature, dim=-1)
        per_token = (log_teacher.exp() * (log_teacher - log_student)).sum(-1)
        return per_token.mean() * temperature**2


def teacher_layer(layer: nn.Module, hidden: Tensor) -> Tensor:
    """One decoder layer of the source: the layer's own norms and MLP around full causal attention."""
    hidden = hidden + layer.mixer.full_attention(layer.mixer_norm(hidden))
    if layer.mlp is not None:
        hidden = hidden + layer.mlp(layer.mlp_norm(hidden))
    return hidden
