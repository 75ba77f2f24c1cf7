"""Pipeline parallelism off Trainium: `torch.distributed.pipelining` over contiguous blocks of decoder layers.

The stage split is the one NxD's pipeline uses for the same degree (`split_layers`):
stage 0 owns the embedding, the last stage the final norm and ``lm_head``. Each
decoder layer returns ``(hidden, innovation)``; the innovation auxiliary loss is
carried between stages as a second activation, ``aux`` of shape ``(batch,)``
holding the running sum of the B layers' innovations (one value per row so that
micro-batching can split it like the hidden states), and the last stage's loss is
``lm_loss + innovation_loss_weight * aux.mean() / (number of B layers)``, the
model's own loss.

Tied embeddings (``tie_word_embeddings: true``) are handled Megatron-style: the last
stage keeps a copy of the embedding matrix as its ``lm_head.weight`` (initialised
equal), and after backward the two gradients are summed over the ranks of stage 0
and the last stage (`bmojo_neuron.training.backends.torchrun`), so both copies stay equal.

Tensor (and sequence) parallelism compose: a stage is cut from the tensor-parallel
model, the activations that travel are this tensor rank's (under SP, its slice of the
sequence), and the last stage's logits are its vocabulary shard (the factory's
cross-entropy combines them). Schedules get static shapes (`stage_io`): no shape
inference pass, and every micro-batch of a schedule has the same shapes.

Parameters keep the full model's names (``model.layers.3....``; `stage_of` says which
stage holds a name) so every stage's checkpoint files consolidate into one model.
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from transformers.utils import logging as hf_logging

from bmojo_neuron.layers.factory import get_layer_factory
from bmojo_neuron.modeling_bmojo import causal_lm_loss


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


def stage_of(name: str, config: Any, stages: int) -> int:
    """The pipeline stage holding the full-model tensor `name` (a tied ``lm_head.weight``: the last)."""
    if name.startswith("model.embed_tokens."):
        return 0
    if name.startswith(("model.norm.", "lm_head.")):
        return stages - 1
    if name.startswith("model.layers."):
        layer = int(name.split(".")[2])
        for stage, layers in enumerate(split_layers(config.num_hidden_layers, stages)):
            if layer in layers:
                return stage
    raise ValueError(f"{name!r} is not a tensor of a B'MOJO model with {config.num_hidden_layers} layers")


def check_pipeline_config(config: Any, stages: int, allow_tied: bool = True) -> None:
    """Clear errors before any stage is built.

    Both pipeline wirings share a tied embedding between the first and last stage (the
    torch path keeps a copy on the last stage, NxD's pipeline shares the Parameter), so
    tied embeddings are accepted; ``allow_tied=False`` refuses them, for a wiring that
    cannot share the weight.
    """
    split_layers(config.num_hidden_layers, stages)
    if stages > 1 and config.tie_word_embeddings and not allow_tied:
        raise ValueError("this pipeline wiring cannot share a tied embedding between stages: set "
                         "model.tie_word_embeddings=false")


class PipelineStage(nn.Module):
    """Stage `stage` of `stages` of a `BMojoForCausalLM` (or a tensor shard of one); the other stages'
    modules are dropped.

    ``forward(input_ids)`` on stage 0, ``forward(hidden, aux)`` on the others; the last
    returns ``(logits, aux)`` (this tensor rank's vocabulary shard) for `PipelineLoss`,
    the others ``(hidden, aux)``. `autocast_dtype` (bf16) runs the forward under autocast.
    """

    def __init__(self, model: nn.Module, stage: int, stages: int,
                 autocast_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        config = model.config
        check_pipeline_config(config, stages, allow_tied=True)
        self.stage, self.stages = stage, stages
        self.first, self.last = stage == 0, stage == stages - 1
        self.layer_ids = list(split_layers(config.num_hidden_layers, stages)[stage])
        self.autocast_dtype = autocast_dtype
        self.factory = model.factory
        self.act_dtype = next(model.parameters()).dtype  # what travels between stages
        inner = model.model
        for i in range(config.num_hidden_layers):
            if i not in self.layer_ids:
                inner.layers[i] = nn.Identity()
        if not self.first:
            inner.embed_tokens = None
        if not self.last:
            inner.norm = None
            model.lm_head = None
        # Tied embeddings: the embedding stays on stage 0; the last stage keeps its own copy
        # as the head weight, kept equal by summing both gradients over the embedding group.
        self.holds_tied_copy = stages > 1 and self.last and bool(config.tie_word_embeddings)
        if self.holds_tied_copy:
            model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
        self.model = model  # parameter names: "model." + the full model's names

    @property
    def config(self) -> Any:
        return self.model.config

    def tied_weight(self) -> nn.Parameter | None:
        """This stage's copy of a tied embedding (stage 0: the embedding, last stage: the head), if any."""
        if self.stages == 1 or not self.config.tie_word_embeddings:
            return None
        if self.first:
            return self.model.model.embed_tokens.weight
        return self.model.lm_head.weight if self.last else None

    def activation_checkpointing_enable(self, **kwargs: Any) -> None:
        """Activation checkpointing of this stage's decoder layers."""
        enable = getattr(self.model, "activation_checkpointing_enable", None) or \
            self.model.gradient_checkpointing_enable
        # transformers warns that a later stage has no input embedding to hook; it needs none, as the
        # activations it receives already require grad
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            enable(**kwargs)
        finally:
            hf_logging.set_verbosity(verbosity)

    gradient_checkpointing_enable = activation_checkpointing_enable

    def forward(self, x: Tensor, aux: Tensor | None = None) -> tuple[Tensor, Tensor]:
        device_type = next(self.parameters()).device.type
        with (torch.autocast(device_type, dtype=self.autocast_dtype) if self.autocast_dtype else nullcontext()):
            return self._forward(x, aux)

    def _forward(self, x: Tensor, aux: Tensor | None) -> tuple[Tensor, Tensor]:
        inner = self.model.model
        if self.first:
            hidden = inner.embed_tokens(x)
            if self.factory.sequence_parallel:
                hidden = self.factory.scatter_sequence(hidden)
            aux = hidden.new_zeros(hidden.shape[0])
        else:
            hidden, aux = _link_received(x, aux)
        for i in self.layer_ids:
            hidden, innovation = inner.layers[i](hidden, 0, None)
            if innovation is not None:
                aux = aux + innovation
        if not self.last:  # fixed dtypes: the receiving stage's buffers were allocated from `stage_io`
            return hidden.to(self.act_dtype), aux.to(self.act_dtype)
        logits = self.model.lm_head(inner.norm(hidden))
        return logits.to(torch.promote_types(logits.dtype, torch.float32)), aux.to(self.act_dtype)

    def full_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Parameters under the full model's names."""
        return list(self.model.named_parameters())


def _link_received(hidden: Tensor, aux: Tensor) -> tuple[Tensor, Tensor]:
    """`hidden` and `aux` with a zero-weighted dependency on each other (values unchanged).

    torch.distributed.pipelining before 2.13 demands a gradient for every tensor a stage
    received and fails ("has gradients None and is expecting to send gradients") when
    one is unused on a path; the link gives each received tensor an exact-zero gradient
    there, so the schedule runs the same on every torch >= 2.9.
    """
    link = (hidden.sum() + aux.sum()) * 0
    return hidden + link.to(hidden.dtype), aux + link.to(aux.dtype)


class FullLogits(nn.Module):
    """Forward-only view of a stage for evaluation: the last stage returns full-vocabulary logits."""

    def __init__(self, stage: PipelineStage) -> None:
        super().__init__()
        self.stage = stage

    def forward(self, x: Tensor, aux: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        out = self.stage(x, aux)
        return self.stage.factory.gather_vocab(out[0]) if self.stage.last else out


class PipelineLoss:
    """The schedule's loss of one micro-batch, divided by `parts` (micro-batches × accumulation steps) so
    the summed gradients are those of the mean loss; records ``[loss, lm_loss, aux_loss]`` of each call."""

    def __init__(self, config: Any, factory: Any, parts: int) -> None:
        self.config, self.factory, self.parts = config, factory, parts
        self.b_layers = config.layer_pattern.count("B") if hasattr(config, "layer_pattern") else 0
        self.records: list[Tensor] = []

    def __call__(self, output: tuple[Tensor, Tensor], labels: Tensor) -> Tensor:
        logits, aux = output
        lm_loss = causal_lm_loss(logits, labels, self.factory)
        aux_loss = (self.config.innovation_loss_weight * aux.mean() / self.b_layers if self.b_layers
                    else lm_loss.new_zeros(()))
        loss = lm_loss + aux_loss
        self.records.append(torch.stack([loss, lm_loss, aux_loss]).detach())
        return loss / self.parts


def pipeline_loss(config: Any, microbatches: int, factory: Any = None) -> PipelineLoss:
    """`PipelineLoss` for `microbatches` micro-batches (default factory: the active one)."""
    return PipelineLoss(config, factory or get_layer_factory(), microbatches)


def stage_io(stage: PipelineStage, rows: int, length: int, train: bool,
             full_vocab: bool = False) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """Example inputs and outputs of one micro-batch of `rows` sequences of `length` tokens.

    Every inter-stage activation is declared as requiring grad when training, on both
    sides of each link, so that each stage expects exactly the gradients its
    neighbour sends (an ``aux`` that needs no gradient on its stage just ignores it).
    """
    config, factory, device = stage.config, stage.factory, next(stage.parameters()).device
    hidden_len = length // factory.tp_size if factory.sequence_parallel else length
    vocab = config.vocab_size if full_vocab else config.vocab_size // factory.tp_size

    def example(shape: tuple[int, ...], dtype: torch.dtype, grad: bool) -> Tensor:
        return torch.zeros(shape, dtype=dtype, device=device).requires_grad_(grad)

    def activations() -> tuple[Tensor, Tensor]:
        return (example((rows, hidden_len, config.hidden_size), stage.act_dtype, train),
                example((rows,), stage.act_dtype, train))

    inputs = (example((rows, length), torch.long, False),) if stage.first else activations()
    if not stage.last:
        return inputs, activations()
    logits = example((rows, length, vocab), torch.promote_types(stage.act_dtype, torch.float32), train)
    return inputs, ((logits,) if full_vocab else (logits, example((rows,), stage.act_dtype, train)))


def build_schedule(stage_module: PipelineStage, group: Any, microbatches: int, loss_fn: Callable | None = None,
                   io: tuple[tuple[Tensor, ...], tuple[Tensor, ...]] | None = None,
                   module: nn.Module | None = None) -> Any:
    """A GPipe schedule of `stage_module` over the pipeline process `group` (one stage per rank).

    `io` (from `stage_io`) gives static shapes; without it torch infers them on the first
    step. `module` replaces the module the schedule runs (e.g. `FullLogits` for eval);
    ``loss_fn=None`` gives a forward-only schedule.
    """
    # torch.distributed.pipelining builds on torch.fx and export: imported only when a pipeline is built
    from torch.distributed.pipelining import PipelineStage as TorchStage
    from torch.distributed.pipelining import ScheduleGPipe

    device = next(stage_module.parameters()).device
    shapes = {"input_args": io[0], "output_args": io[1]} if io is not None else {}
    stage = TorchStage(module or stage_module, stage_module.stage, stage_module.stages, device, group=group,
                       **shapes)
    # scale_grads=False: the loss is already divided by the micro-batch count (the reported losses sum to the mean)
    return ScheduleGPipe(stage, microbatches, loss_fn=loss_fn, scale_grads=False)


class PipelineRunner:
    """Runs one rank's stage through GPipe schedules over its pipeline group: training steps and
    forward-only evaluation. Schedules are built on first use for each shape and reused."""

    def __init__(self, stage: PipelineStage, group: Any, microbatches: int, last_rank: int) -> None:
        self.stage, self.group, self.microbatches = stage, group, microbatches
        self.last_rank = last_rank  # global rank of this pipeline's last stage
        self._train: dict[tuple[int, int, int], tuple[Any, PipelineLoss]] = {}
        self._eval: dict[tuple[int, int, int], Any] = {}

    def _run(self, schedule: Any, input_ids: Tensor, labels: Tensor | None) -> Any:
        args = (input_ids,) if self.stage.first else ()
        kwargs = {"target": labels} if self.stage.last and labels is not None else {}
        if labels is not None and "return_outputs" in inspect.signature(schedule.step).parameters:
            kwargs["return_outputs"] = False  # training keeps no logits once the loss is taken
        return schedule.step(*args, **kwargs)

    def train_step(self, input_ids: Tensor, labels: Tensor, accumulation: int) -> Tensor:
        """Forward and backward of one batch (gradients accumulate into the stage's parameters).

        Returns ``[loss, lm_loss, aux_loss] / accumulation`` (means over the batch) on the
        last stage, zeros on the others.
        """
        rows, length = input_ids.shape
        if rows % self.microbatches:
            raise ValueError(f"a batch of {rows} rows does not split into parallel.microbatches="
                             f"{self.microbatches}")
        key = (rows, length, accumulation)
        if key not in self._train:
            loss = PipelineLoss(self.stage.config, self.stage.factory, self.microbatches * accumulation)
            io = stage_io(self.stage, rows // self.microbatches, length, train=True)
            self._train[key] = (build_schedule(self.stage, self.group, self.microbatches, loss, io), loss)
        schedule, loss = self._train[key]
        loss.records.clear()
        self._run(schedule, input_ids, labels)
        if not self.stage.last:
            return torch.zeros(3, device=input_ids.device)
        return torch.stack(loss.records).mean(0) / accumulation

    @torch.no_grad()
    def logits(self, input_ids: Tensor) -> Tensor | None:
        """Full-vocabulary logits of `input_ids` on the last stage (None on the others), forward only."""
        rows, length = input_ids.shape
        parts = self.microbatches if rows % self.microbatches == 0 else 1
        key = (rows, length, parts)
        if key not in self._eval:
            io = stage_io(self.stage, rows // parts, length, train=False, full_vocab=True)
            self._eval[key] = build_schedule(self.stage, self.group, parts, None, io, FullLogits(self.stage))
        out = self._run(self._eval[key], input_ids, None)
        return out if self.stage.last else None

    def share(self, values: list[float]) -> list[float]:
        """The last stage's `values` on every rank of the pipeline (float64, exact for Python floats)."""
        device = next(self.stage.parameters()).device
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.broadcast(t, src=self.last_rank, group=self.group)
        return t.tolist()
