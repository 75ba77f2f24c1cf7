"""The ``torchrun`` backend: one rank of a parallel run on torch.distributed (CPU with gloo, CUDA with NCCL).

It is the `local` backend with this rank's share of the work:

- ranks form a ``dp × pp × tp`` grid (`bmojo_neuron.parallel.layout`, tp fastest);
- the model is initialised whole under ``run.seed`` and each rank keeps its tensor
  shard, so a parallel run starts from the very weights of the one-process run;
- ``train.batch_size`` stays the *global* micro-batch: data rank ``d`` takes block
  ``d`` of each batch the one-process loop would take, and gradients are averaged
  over data ranks, so a run equals the one-process run on the same recipe (exactly
  when every sequence has the same number of labelled tokens, as MQAR and text do);
- ZeRO-1 (``parallel.zero1``) is `torch.distributed.optim.ZeroRedundancyOptimizer`
  over the data-parallel group;
- pipeline parallelism (``parallel.pp``) keeps this rank's stage
  (`bmojo_neuron.parallel.pipeline`) and runs each micro-batch of the loop as a GPipe
  schedule of ``parallel.microbatches`` pieces; the last stage computes the losses
  (summed over the pipeline group for logging) and, with tied embeddings, the two
  copies of the embedding (stage 0, last stage) have their gradients summed over an
  "embedding group";
- checkpoints are sharded per rank (`bmojo_neuron.checkpoints.sharded`, this rank's files
  `bmojo_neuron.checkpoints.torch_sharded`) and published atomically by rank 0 after a barrier.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.optim import ZeroRedundancyOptimizer

from bmojo_neuron.checkpoints import sharded as fmt
from bmojo_neuron.checkpoints import torch_sharded
from bmojo_neuron.checkpoints.export import export_final
from bmojo_neuron.checkpoints.layout import FINAL, latest_checkpoint
from bmojo_neuron.checkpoints.state import Checkpoint, TrainerState
from bmojo_neuron.layers.factory import TensorParallelSplitError, use_layer_factory
from bmojo_neuron.modeling_bmojo import BMojoForCausalLM
from bmojo_neuron.parallel import TorchTensorParallelFactory, shard_state_dict, sync_sequence_parallel_grads
from bmojo_neuron.parallel.layout import ParallelLayout, ProcessGroups, torchrun_env
from bmojo_neuron.parallel.pipeline import PipelineRunner, PipelineStage, check_pipeline_config
from bmojo_neuron.parallel.sharding import load_into, shard_shapes, tied_names
from bmojo_neuron.training.objective import Objective, causal_lm_loss
from bmojo_neuron.training.optim import build_optimizer, parameter_groups

from .local import LocalBackend


def wants_parallel(recipe: Any) -> bool:
    """True when the recipe asks for parallelism or the process was launched by torchrun with several ranks."""
    p = recipe.parallel
    world = dist.get_world_size() if dist.is_initialized() else torchrun_env()[2]
    return world > 1 or p.tp > 1 or p.pp > 1 or p.zero1


def check_parallel_recipe(recipe: Any, world: int) -> ParallelLayout:
    """Fail fast, before any process group or weights exist, on degrees this trainer cannot run."""
    p, t = recipe.parallel, recipe.train
    if world == 1 and p.tp * p.pp > 1:  # a plain `bmojo-neuron train`: say how to start the ranks
        raise ValueError(f"parallel.tp × parallel.pp = {p.tp} × {p.pp} needs {p.tp * p.pp} ranks and this is one "
                         f"process (world size 1): launch it with torchrun --nproc-per-node {p.tp * p.pp} "
                         "-m bmojo_neuron.cli train RECIPE ... (docs/parallel.md)")
    layout = ParallelLayout.from_world(world, p.tp, p.pp)
    if p.pp == 1 and p.microbatches != 1:
        raise ValueError("parallel.microbatches only applies to pipeline parallelism (parallel.pp > 1); "
                         "use train.grad_accum")
    if t.batch_size % layout.dp:
        raise ValueError(f"train.batch_size ({t.batch_size}) is the global micro-batch and must be divisible by "
                         f"the data-parallel degree {layout.dp} (world {world} / (tp {p.tp} × pp {p.pp}))")
    if p.pp > 1:
        per_rank = t.batch_size // layout.dp
        if per_rank % p.microbatches:
            raise ValueError(f"parallel.microbatches ({p.microbatches}) must divide the per-data-rank batch "
                             f"train.batch_size / dp = {t.batch_size} / {layout.dp} = {per_rank}")
        check_pipeline_config(recipe.model_config(), p.pp, allow_tied=True)
    if p.sp:
        length = recipe.data.seq_len if recipe.data.kind == "mqar" else recipe.data.block_size
        if length % p.tp:
            raise ValueError(f"parallel.sp needs the sequence length ({length}) divisible by parallel.tp ({p.tp})")
    if p.tp > 1:  # the model's divisibility errors (heads, groups, vocabulary), on the meta device: instant
        try:
            shard_shapes(recipe.model_config(), p.tp)
        except TensorParallelSplitError as e:
            raise ValueError(f"model.{e.field} ({e.value}{_derivation(e.field)}) must be divisible by parallel.tp "
                             f"({e.tp})") from None
    return layout


# Config sizes that no recipe key sets directly: the model keys they are computed from.
_DERIVED_SIZES = {"ssm_num_heads": "ssm_expand·hidden_size / ssm_head_dim", "ssm_inner_size": "ssm_expand·hidden_size"}


def _derivation(field: str) -> str:
    """``", from <keys>"`` for a computed model size, so the user knows which recipe keys to change."""
    derived = _DERIVED_SIZES.get(field)
    return f", from {derived}" if derived else ""


def _init_process_group(backend: str, rank: int, world: int) -> None:
    """The default process group: torchrun's rendezvous (``env://``), or, for a parallel recipe run as one
    plain process (``parallel.zero1`` or ``sp`` at one rank, no launcher), an in-memory store of its own."""
    if world == 1 and "MASTER_ADDR" not in os.environ:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        return
    dist.init_process_group(backend, rank=rank, world_size=world)


class TorchrunBackend(LocalBackend):
    """One rank of a parallel training run."""

    def __init__(self, recipe: Any, objective: Objective = causal_lm_loss) -> None:
        super().__init__(recipe, objective)
        device = self.device
        rank, local_rank, world = torchrun_env()
        if dist.is_initialized():
            rank, world = dist.get_rank(), dist.get_world_size()
        layout = check_parallel_recipe(recipe, world)
        self.layout = ParallelLayout(layout.tp, layout.pp, layout.dp, rank)
        self.p = recipe.parallel
        self.device = torch.device(f"cuda:{local_rank}") if device.type == "cuda" else device
        if not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(self.device)
            _init_process_group("nccl" if device.type == "cuda" else "gloo", rank, world)
        self.groups = ProcessGroups.create(self.layout)
        self.embedding_group = self._embedding_group(recipe)
        self.is_main = rank == 0
        self.dims: dict[str, int | None] = {}
        self.pipeline: PipelineRunner | None = None  # set by `build_model` when pp > 1

    def _embedding_group(self, recipe: Any) -> Any:
        """With tied embeddings under pp > 1: this rank's pair (stage 0, last stage) of the same tensor and
        data rank, if it is in one. Every rank creates every pair, in the same order (`new_group` is collective)."""
        lay = self.layout
        if lay.pp == 1 or not recipe.model_config().tie_word_embeddings:
            return None
        mine = None
        for d in range(lay.dp):
            for t in range(lay.tp):
                ranks = [lay.rank_of(d, 0, t), lay.rank_of(d, lay.pp - 1, t)]
                group = dist.new_group(ranks)
                if lay.rank in ranks:
                    mine = group
        return mine

    @staticmethod
    def core(model: nn.Module) -> nn.Module:
        """The `BMojoForCausalLM` (this stage's part of it under pp), whose names are the full model's."""
        return model.model if isinstance(model, PipelineStage) else model

    def tied_copy(self, model: nn.Module) -> bool:
        """True on a last stage that holds a copy of a tied embedding (the copy is stored by stage 0)."""
        return isinstance(model, PipelineStage) and model.holds_tied_copy

    # ------------------------------------------------------------------ model and optimizer

    def build_model(self, previous: Checkpoint | None) -> nn.Module:
        """This rank's shard (and stage) of the model the one-process run would initialise (same seed, same
        weights); a `PipelineStage` under pp."""
        model = self.shard_model(start_weights=previous is None)
        if self.recipe.train.activation_checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable()
        return model.train()

    def shard_model(self, start_weights: bool = True) -> nn.Module:
        config = self.recipe.model_config()
        full = self.init_model(start_weights)
        after_init = torch.get_rng_state()
        self.full_shapes = {k: v.shape for k, v in full.state_dict().items()}
        if self.layout.tp == 1:
            model = full
        else:
            with use_layer_factory(TorchTensorParallelFactory(self.groups.tp, sequence_parallel=self.p.sp)):
                model = BMojoForCausalLM(config)
            torch.set_rng_state(after_init)  # as if only the full model had been built
            shapes = {k: v.shape for k, v in model.state_dict().items()}
            load_into(model, shard_state_dict(full.state_dict(), shapes, self.layout.tp_rank, self.layout.tp),
                          "the tensor shard")
        self.local_shapes = {k: v.shape for k, v in model.state_dict().items()}
        self.meta = fmt.parallel_meta(self.full_shapes, self.local_shapes, self.layout.tp, self.layout.pp,
                                      self.layout.dp, self.p.sp, self.p.zero1)
        self.dims = self.meta["split_dims"]
        if self.layout.pp == 1:
            return model.to(self.device)
        bf16 = torch.bfloat16 if self.recipe.train.precision == "bf16" else None
        stage = PipelineStage(model, self.layout.pp_rank, self.layout.pp, autocast_dtype=bf16).to(self.device)
        last = self.groups.ranks["pp"][-1]
        self.pipeline = PipelineRunner(stage, self.groups.pp, self.p.microbatches, last)
        return stage

    def parameter_count(self, model: nn.Module, which: Callable[[str], bool] | None = None) -> int:
        """Parameters of the whole model (every shard), the tied lm_head counted once."""
        skip = tied_names(self.recipe.model_config())
        return sum(torch.Size(s).numel() for k, s in self.full_shapes.items()
                   if k not in skip and (which is None or which(k)))

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """AdamW as in one process; with ZeRO-1 its states are partitioned over the data-parallel group."""
        o = self.recipe.optim
        model = self.core(model)
        if not self.p.zero1:
            return build_optimizer(model, o.lr, o.weight_decay, o.betas, o.eps, self.device.type, o.lr_multipliers)
        b1, b2 = (float(b) for b in o.betas)
        groups = parameter_groups(model, o.weight_decay, o.lr, o.lr_multipliers)
        return ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW,
                                       process_group=self.groups.dp, lr=o.lr, betas=(b1, b2), eps=o.eps,
                                       foreach=False)

    # ------------------------------------------------------------------------- one step

    def local_rows(self, rows: list[int]) -> list[int]:
        """This data rank's block of the global micro-batch."""
        per = len(rows) // self.layout.dp
        return rows[self.layout.dp_rank * per:(self.layout.dp_rank + 1) * per]

    def forward_backward(self, model: nn.Module, input_ids: Tensor, labels: Tensor) -> Tensor:
        """pp > 1: a GPipe schedule runs forward and backward of this micro-batch (losses on the last stage)."""
        if self.pipeline is None:
            return super().forward_backward(model, input_ids, labels)
        return self.pipeline.train_step(input_ids, labels, self.recipe.train.grad_accum)

    def reduce(self, model: nn.Module, losses: Tensor) -> Tensor:
        self.reduce_grads(model)
        return self.average(losses)

    def clip(self, model: nn.Module, max_norm: float) -> Tensor:
        return self.clip_grad_norm(model, max_norm)

    def reduce_grads(self, model: nn.Module) -> None:
        """Sequence-parallel norm gradients summed over tp; every gradient averaged over data ranks; the two
        copies of a tied embedding under pp (stage 0, last stage) get the sum of their gradients."""
        if self.p.sp and self.layout.tp > 1:
            sync_sequence_parallel_grads(model, self.groups.tp)
        if self.layout.dp > 1:
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=self.groups.dp)
            flat /= self.layout.dp
            for g, part in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(part.view_as(g))
        if self.embedding_group is not None:
            weight = model.tied_weight()
            if weight.grad is None:
                weight.grad = torch.zeros_like(weight)
            dist.all_reduce(weight.grad, group=self.embedding_group)

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> Tensor:
        """`clip_grad_norm_` of the whole (unsharded) model: shards' squares are summed over tp, stages'
        over pp (a tied embedding's copy on the last stage is not counted twice)."""
        sharded = torch.zeros((), dtype=torch.float64, device=self.device)
        replicated = torch.zeros((), dtype=torch.float64, device=self.device)
        grads = []
        skip = tied_names(self.core(model).config) if self.tied_copy(model) else set()
        for name, param in self.core(model).named_parameters():
            if param.grad is None:
                continue
            grads.append(param.grad)
            if name in skip:
                continue
            square = param.grad.detach().double().pow(2).sum()
            if self.dims.get(name) is None:
                replicated += square
            else:
                sharded += square
        if self.layout.tp > 1:
            dist.all_reduce(sharded, group=self.groups.tp)
        squares = sharded + replicated
        if self.layout.pp > 1:
            dist.all_reduce(squares, group=self.groups.pp)
        total = squares.sqrt().float()
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))
        return total

    def average(self, x: Tensor) -> Tensor:
        """The logged losses: mean over data ranks; under pp, the last stage's (the others hold zeros)."""
        if self.layout.dp > 1:
            x = x.clone()
            dist.all_reduce(x, group=self.groups.dp)
            x /= self.layout.dp
        if self.layout.pp > 1:
            x = x.clone()
            dist.all_reduce(x, group=self.groups.pp)
        return x

    def agree_to_stop(self, requested: bool) -> bool:
        """One tiny all-reduce per step: ranks must all save at the same step, or the save waits forever."""
        flag = torch.tensor([int(requested)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def barrier(self, tag: str = "") -> None:
        dist.barrier()

    def close(self) -> None:
        pass  # the process group outlives the run: torchrun (or the caller) created it or may reuse it

    # ------------------------------------------------------------------------ checkpoints

    def save(self, run_dir: Path, model: nn.Module, optimizer: Any, scheduler: Any, state: TrainerState,
             recipe: dict[str, Any]) -> None:
        """Every rank writes its files into one temp dir; rank 0 publishes it after a barrier."""
        core = self.core(model)
        fmt.save_sharded(run_dir, state, self.is_main, self.barrier,
                         lambda tmp: torch_sharded.write_rank_files(tmp, self.layout, core, optimizer, scheduler),
                         self.meta, recipe, core.config, self.recipe.checkpoint.keep_last)

    def load_latest(self, run_dir: Path) -> Checkpoint | None:
        """This rank's view of the latest checkpoint: its optimizer states and RNG; weights via `restore`."""
        tied_copy = self.embedding_group is not None and self.layout.pp_rank == self.layout.pp - 1
        return fmt.load_rank_view(run_dir, self.layout, tied_copy)

    def restore(self, previous: Checkpoint, model: nn.Module, optimizer: Any, scheduler: Any) -> None:
        torch_sharded.restore_rank(previous, self.layout, self.core(model), optimizer, scheduler,
                                   self.tied_copy(model))

    def export(self, run_dir: Path, model: nn.Module, recipe: dict[str, Any], tokenizer: str,
               metrics: dict[str, Any]) -> Path:
        """Rank 0 consolidates the last checkpoint into ``final/`` (`save_pretrained`)."""
        self.barrier()
        if self.is_main:
            export_final(run_dir, fmt.consolidated_model(latest_checkpoint(run_dir)), recipe, tokenizer, metrics)
        self.barrier()
        return run_dir / FINAL
