"""Pipeline parallelism off Trainium: `torch.distributed.pipelining` over contiguous blocks of decoder layers.

The stage split is the one NxD's pipeline uses for the same degree (`split_layers`):
stage 0 owns the embedding, the last stage the final norm and ``lm_head``. Each
decoder layer returns ``(hidden, innovation)``; the innovation auxiliary loss is
carried between stages as a second activation, ``aux`` of shape ``(batch,)``
holding the running sum of the B layers' innovations (one value per row so that
micro-batching can split it like the hidden states), and the last stage's loss is
``lm_loss + innovation_loss_weight * aux.mean() / (number of B layers)``, the
model's own loss. Embeddings must be untied (``tie_word_embeddings: false``): the
embedding and the head live on different ranks.

Parameters keep the full model's names (``model.layers.3....``) so checkpoints of
every stage consolidate with `consolidate_state_dicts` per stage.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn


def split_layers(num_layers: int, stages: int) -> list[range]:
    """Contiguous, balanced blocks of layer indices (the first stages take the remainder)."""
    if stages < 1 or num_layers < stages:
        raise ValueError(f"parallel.pp ({stages}) must be between 1 and num_hidden_layers ({num_layers})")
    base, extra = divmod(num_layers, stages)
    out, start = [], 0
    for s in range(stages):
        size = base + (s < extra)
        out.append(range(start, start + size))
        start += size
    return out


def check_pipeline_config(config: Any, stages: int) -> None:
    """Clear errors before any stage is built."""
    split_layers(config.num_hidden_layers, stages)
    if stages > 1 and config.tie_word_embeddings:
        raise ValueError("pipeline parallelism needs untied embeddings (the embedding and lm_head sit on different "
                         "stages): set model.tie_word_embeddings=false")


class PipelineStage(nn.Module):
    """Stage `stage` of `stages` of a `BMojoForCausalLM`; the other stages' modules are dropped.

    ``forward(input_ids)`` on stage 0, ``forward(hidden, aux)`` on the others; the last
    returns ``(logits, aux)`` for `pipeline_loss`, the others ``(hidden, aux)``.
    """

    def __init__(self, model: nn.Module, stage: int, stages: int) -> None:
        super().__init__()
        check_pipeline_config(model.config, stages)
        self.stage, self.stages = stage, stages
        self.first, self.last = stage == 0, stage == stages - 1
        self.layer_ids = list(split_layers(model.config.num_hidden_layers, stages)[stage])
        inner = model.model
        for i in range(model.config.num_hidden_layers):
            if i not in self.layer_ids:
                inner.layers[i] = nn.Identity()
        if not self.first:
            inner.embed_tokens = None
        if not self.last:
            inner.norm = None
            model.lm_head = None
        self.model = model  # parameter names: "model." + the full model's names

    def forward(self, x: Tensor, aux: Tensor | None = None) -> tuple[Tensor, Tensor]:
        inner = self.model.model
        if self.first:
            hidden = inner.embed_tokens(x)
            aux = hidden.new_zeros(hidden.shape[0])
        else:
            hidden = x
        for i in self.layer_ids:
            hidden, innovation = inner.layers[i](hidden, 0, None)
            if innovation is not None:
                aux = aux + innovation
        if not self.last:
            return hidden, aux
        logits = self.model.lm_head(inner.norm(hidden))
        return logits.to(torch.promote_types(logits.dtype, torch.float32)), aux

    def full_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Parameters under the full model's names."""
        return [(name.removeprefix("model."), p) for name, p in self.named_parameters()]


def pipeline_loss(config: Any, microbatches: int) -> Callable[[tuple[Tensor, Tensor], Tensor], Tensor]:
    """The schedule's loss of one micro-batch, scaled so the summed gradients are those of the mean loss."""
    from bmojo_neuron.layers.factory import get_layer_factory
    from bmojo_neuron.modeling_bmojo import causal_lm_loss

    b_layers = config.layer_pattern.count("B") if hasattr(config, "layer_pattern") else 0
    factory = get_layer_factory()

    def loss_fn(output: tuple[Tensor, Tensor], labels: Tensor) -> Tensor:
        logits, aux = output
        loss = causal_lm_loss(logits, labels, factory)
        if b_layers:
            loss = loss + config.innovation_loss_weight * aux.mean() / b_layers
        return loss / microbatches

    return loss_fn


def build_schedule(stage_module: PipelineStage, group: Any, microbatches: int, config: Any,
                   device: torch.device | str = "cpu") -> Any:
    """A GPipe schedule of `stage_module` over the pipeline process `group` (one stage per rank)."""
    from torch.distributed.pipelining import PipelineStage as TorchStage
    from torch.distributed.pipelining import ScheduleGPipe

    stage = TorchStage(stage_module, stage_module.stage, stage_module.stages, torch.device(device), group=group)
    # scale_grads=False: the loss is already divided by the micro-batch count (the reported losses sum to the mean)
    return ScheduleGPipe(stage, microbatches, loss_fn=pipeline_loss(config, microbatches), scale_grads=False)
