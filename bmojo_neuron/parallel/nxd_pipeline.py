"""The B'MOJO causal LM in the form NxD's pipeline (``NxDPPModel``) traces and cuts.

NxD 0.17 pipelines a model by tracing its ``forward`` with ``torch.fx`` (transformer
layers and NxD's parallel layers stay leaf calls), cutting the graph after chosen
layer calls and running each piece on its stage. `BMojoForCausalLM.forward` does not
suit that: it collects the layers' innovations in a Python list with ``is not None``
checks (an FX proxy is never None) and reports several losses in a model output
object. `PipelineCausalLM` runs the same computation written for the tracer:

- it holds the causal LM's own submodules (``model.embed_tokens``, ``model.layers.N``,
  ``model.norm``, ``lm_head``), so every parameter keeps its full-model name and a
  tied ``lm_head.weight`` stays the very Parameter of ``model.embed_tokens.weight``
  (NxD finds a Parameter used by two stages and sums its gradients over them);
- every decoder layer becomes a `PipelineDecoderLayer`, which carries the running sum
  of the eidetic-memory innovations next to the hidden states, as a ``(1,)`` float32
  tensor: what crosses a cut is the output of the cut layer, and NxD's XLA send
  needs a leading dimension (``send`` reads ``tensor.size(0)``), which a scalar lacks;
- ``forward(input_ids, labels)`` returns ``(loss, stats)``: ``loss`` (what NxD
  back-propagates, ``output_loss_value_spec=(True, False)``; the last piece returns a
  tuple, as FX's ``split_module`` builds it) and ``stats``, the detached
  ``[loss, lm_loss, aux_loss, labelled tokens, right answers]`` of the micro-batch,
  which `PipelineStats` reads on the last stage for logging and evaluation (NxD
  itself hands back only the averaged ``loss``).

The numbers equal `BMojoForCausalLM`'s: ``aux_loss = innovation_loss_weight · mean``
of the memory layers' innovations (summed in float32, then divided).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..layers.decoder import BMojoDecoderLayer
from ..layers.factory import IGNORE_INDEX
from ..modeling_bmojo import causal_lm_loss
from .pipeline import split_layers

LOSS_SPEC = (True, False)  # NxD's output_loss_value_spec for (loss, stats)
STATS = ("loss", "lm_loss", "aux_loss", "tokens", "correct")
INPUT_NAMES = ["input_ids", "labels"]


class PipelineDecoderLayer(BMojoDecoderLayer):
    """A decoder layer whose forward carries the innovation sum: ``(hidden, aux) -> (hidden, aux')``.

    Made from an existing layer by `adopt` (same object, same parameters and names).
    """

    @classmethod
    def adopt(cls, layer: BMojoDecoderLayer) -> PipelineDecoderLayer:
        if not isinstance(layer, BMojoDecoderLayer):
            raise TypeError(f"expected a BMojoDecoderLayer, got {type(layer).__name__}")
        layer.__class__ = cls  # adds behaviour only: no state of its own
        return layer  # type: ignore[return-value]

    def forward(self, hidden_states: Tensor, aux: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        hidden_states, innovation = super().forward(hidden_states)
        if innovation is not None:
            aux = aux + innovation.float().reshape(1)
        return hidden_states, aux


def has_memory(layer: nn.Module) -> bool:
    """Whether a decoder layer reports an innovation (an attention mixer with eidetic memory)."""
    return getattr(layer.mixer, "memory_size", 0) > 0


def pipeline_cuts(num_layers: int, stages: int) -> list[str]:
    """NxD ``pipeline_cuts``: the last layer of every stage but the last, for `split_layers`' blocks.

    NxD's ``auto_partition`` gives the remainder of an uneven split to the last stages;
    `split_layers` (the torch pipeline, ``checkpoint shard``, the memory plan) to the
    first. Naming the cuts keeps one stage layout everywhere.
    """
    return [f"model.layers.{block[-1]}" for block in split_layers(num_layers, stages)[:-1]]


class PipelineCausalLM(nn.Module):
    """`BMojoForCausalLM`'s training forward for NxD's traced pipeline; see the module docstring.

    `count_correct` adds the right answers (argmax over the full vocabulary) to ``stats``,
    for MQAR accuracy; it costs a vocabulary gather under tensor parallelism.
    """

    def __init__(self, causal_lm: nn.Module, count_correct: bool = False) -> None:
        super().__init__()
        config = causal_lm.config
        if config.tie_word_embeddings and causal_lm.lm_head.weight is not causal_lm.model.embed_tokens.weight:
            raise ValueError("model.tie_word_embeddings is true but lm_head.weight is not the embedding Parameter; "
                             "NxD's pipeline could not share it between stages")
        self.config = config
        self.model = causal_lm.model
        self.lm_head = causal_lm.lm_head
        self.factory = causal_lm.factory
        self.count_correct = count_correct
        self.memory_layers = sum(has_memory(layer) for layer in self.model.layers)
        for layer in self.model.layers:
            PipelineDecoderLayer.adopt(layer)

    def forward(self, input_ids: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        hidden = self.model.embed_tokens(input_ids)
        if self.factory.sequence_parallel:
            hidden = self.factory.scatter_sequence(hidden)
        aux = hidden.new_zeros(1, dtype=torch.float32)
        for layer in self.model.layers:  # leaf calls in the trace; NxD cuts after some of them
            out = layer(hidden, aux)
            hidden, aux = out[0], out[1]
        logits = self.lm_head(self.model.norm(hidden)).float()  # this rank's vocabulary shard
        lm_loss = causal_lm_loss(logits, labels, self.factory)
        aux_loss = aux.sum() * (self.config.innovation_loss_weight / max(self.memory_layers, 1))
        loss = lm_loss + aux_loss
        return loss, self._stats(loss, lm_loss, aux_loss, logits, labels)

    def _stats(self, loss: Tensor, lm_loss: Tensor, aux_loss: Tensor, logits: Tensor, labels: Tensor) -> Tensor:
        targets = labels[:, 1:]
        scored = targets != IGNORE_INDEX
        tokens = scored.sum().float()
        if self.count_correct:
            guesses = self.factory.gather_vocab(logits)[:, :-1].argmax(-1)
            correct = ((guesses == targets) & scored).sum().float()
        else:
            correct = tokens * 0
        return torch.stack([loss, lm_loss, aux_loss, tokens, correct]).detach()


class PipelineStats:
    """The last stage's per-micro-batch ``stats`` of `PipelineCausalLM`, captured by a forward hook.

    NxD's ``run_train`` / ``run_eval`` return only the mean loss (of the last stage),
    so the hook on that stage's module keeps the stats of every micro-batch it runs.
    The first run also makes NxD's shape-inference forward on every stage (NxD 0.17:
    ``NxDPPModel.tracing`` is set meanwhile); nothing of it is kept, since NxD drops
    every tensor of that pass so that its ``mark_step`` runs no graph (a kept tensor
    would make this stage run a receive the previous stage never sends). Off the last
    stage there is nothing to record and `take` returns None.
    """

    def __init__(self, stage_module: nn.Module | None, microbatches: int, pipeline: Any = None) -> None:
        self.microbatches, self.pipeline = microbatches, pipeline
        self.records: list[Tensor] = []
        self._hook = stage_module.register_forward_hook(self._record) if stage_module is not None else None

    @classmethod
    def of(cls, model: Any, microbatches: int, last_stage: bool) -> PipelineStats:
        """For an NxD pipeline model (``NxDModel`` around ``NxDPPModel``): its local stage module when this
        is the last stage."""
        return cls(model.local_modules()[-1] if last_stage else None, microbatches, model.module)

    def _record(self, module: nn.Module, args: Any, output: tuple[Tensor, Tensor]) -> None:
        if not getattr(self.pipeline, "tracing", False):
            self.records.append(output[1])

    def take(self) -> Tensor | None:
        """``(microbatches, len(STATS))`` of the last run (records cleared); None off the last stage."""
        if self._hook is None:
            return None
        rows, self.records = self.records, []
        if len(rows) != self.microbatches:
            raise RuntimeError(f"the last pipeline stage ran {len(rows)} micro-batches, expected {self.microbatches}")
        return torch.stack(rows)

    def train_losses(self, device: torch.device) -> Tensor:
        """``[loss, lm_loss, aux_loss]``, the mean over the run's micro-batches (zeros off the last stage)."""
        rows = self.take()
        return torch.zeros(3, device=device) if rows is None else rows[:, :3].mean(0)

    def eval_sums(self, device: torch.device) -> Tensor:
        """``[summed nll, labelled tokens, right answers]`` of the run (zeros off the last stage)."""
        rows = self.take()
        if rows is None:
            return torch.zeros(3, device=device)
        return torch.stack([rows[:, 1] * rows[:, 3], rows[:, 3], rows[:, 4]], 1).sum(0)


__all__ = ["INPUT_NAMES", "LOSS_SPEC", "PipelineCausalLM", "PipelineDecoderLayer", "PipelineStats", "STATS",
           "pipeline_cuts"]
