"""What a training step minimises: the model's own causal-LM loss (next-token cross-entropy plus its aux loss).

Backends call the objective once per micro-batch, inside the step (and inside the
autocast context on CPU / CUDA). It returns the loss to backpropagate and the numbers
the run logs, detached, named by its ``metric_names`` (``loss`` first): here
``[loss, lm_loss, aux_loss]``. `objective_for` picks the recipe's: this one, or with a
``distill`` section the layer-by-layer distillation of a primed model
(`bmojo_neuron.priming.distill`). The pipeline-parallel paths compute the model's own
loss on their last stage and take no objective.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor, nn

from bmojo_neuron.priming.distill import LayerwiseDistillation


LM_METRICS = ("loss", "lm_loss", "aux_loss")


class Objective(Protocol):
    metric_names: tuple[str, ...]  # what the detached numbers are, ``loss`` first (absent: `LM_METRICS`)

    def __call__(self, model: nn.Module, input_ids: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """``(loss to backpropagate, the numbers of metric_names, detached)`` of one micro-batch."""


def causal_lm_loss(model: nn.Module, input_ids: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """The model's loss: next-token cross-entropy plus the aux loss it adds (B'MOJO's innovation loss)."""
    out = model(input_ids, labels=labels, use_cache=False)
    loss = out.loss.detach()
    aux = out.aux_loss.detach() if out.aux_loss is not None else torch.zeros_like(loss)
    return out.loss, torch.stack([loss, out.lm_loss.detach(), aux])


causal_lm_loss.metric_names = LM_METRICS


def objective_for(recipe: Any) -> Objective:
    """The objective `recipe` trains: the causal-LM loss, or with a ``distill`` section the distillation."""
    if recipe.distill is None:
        return causal_lm_loss
    d = recipe.distill
    return LayerwiseDistillation(d.hidden_weight, d.kl_weight, d.kl_temperature)
