"""What a training step minimises: the model's own causal-LM loss (next-token cross-entropy plus its aux loss).

Backends call the objective once per micro-batch, inside the step (and inside the
autocast context on CPU / CUDA). It returns the loss to backpropagate and the three
numbers the run logs, ``[loss, lm_loss, aux_loss]``, detached. Another objective (a
distillation loss against a frozen teacher, say) is a callable with the same
signature, handed to the backend; the pipeline-parallel paths compute the model's
own loss on their last stage and take no objective.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor, nn


class Objective(Protocol):
    def __call__(self, model: nn.Module, input_ids: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """``(loss to backpropagate, [loss, lm_loss, aux_loss] detached)`` of one micro-batch."""


def causal_lm_loss(model: nn.Module, input_ids: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """The model's loss: next-token cross-entropy plus the aux loss it adds (B'MOJO's innovation loss)."""
    out = model(input_ids, labels=labels, use_cache=False)
    loss = out.loss.detach()
    aux = out.aux_loss.detach() if out.aux_loss is not None else torch.zeros_like(loss)
    return out.loss, torch.stack([loss, out.lm_loss.detach(), aux])


def objective_for(recipe: Any) -> Objective:
    """The objective a recipe trains with (every recipe today: the model's causal-LM loss)."""
    return causal_lm_loss
