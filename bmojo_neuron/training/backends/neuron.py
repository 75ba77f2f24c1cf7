"""The ``neuron`` backend: one torchrun process per NeuronCore, through torch-xla and NeuronX Distributed.

The same recipe semantics as the `local` backend: data order, global
``train.batch_size``, losses, schedule, checkpoints and the final export; a run on
one NeuronCore equals the one-process CPU run. What is specific to a compiled XLA
device:

- torch-xla and NeuronX Distributed (NxD) come in through `NeuronRuntime` (lazily;
  `NeuronUnavailableError` names what is missing); NxD is initialised from
  ``parallel.tp / pp / sp / zero1`` (`bmojo_neuron.parallel.nxd_training`) and the
  model is built with NxD's tensor-parallel layers, starting from the one-device
  initialisation's weights;
- the hot ops run on the NKI backend (``BMOJO_OPS_BACKEND`` may name another);
- ``train.precision: bf16`` builds the model in bf16 (NxD's layers for bf16, the
  rest cast with ``model.to``, as SDK 2.28 expects; no ``XLA_USE_BF16``); without
  ZeRO-1 the bf16 weights are updated with stochastic rounding, with ZeRO-1 NxD keeps
  fp32 master weights and fp32 gradient accumulation and rounds to nearest;
- the micro-batches arrive one at a time through ``MpDeviceLoader``, whose fetch
  cuts the graph before each: a step of ``train.grad_accum`` micro-batches is one
  graph per micro-batch (forward + backward, gradients accumulated on the device;
  every one after the first is the same graph), then, after a ``torch_xla.sync`` of its
  own, NxD's optimizer step (data-parallel gradient reduction, clipping, AdamW), the
  scheduler and ``zero_grad`` as one more graph, run by the step's final
  ``torch_xla.sync`` (`finish_step`). A single micro-batch and its update stay one graph.
  A step graph never grows with ``grad_accum`` (NxD's examples cut the same way).
  Nothing in the step reads a device value: losses are read by a step closure at log
  steps, after the graph ran; whether to stop is settled by a one-element all-reduce
  in each step's graph, read one step later (`finish_step`);
- eval and checkpoints run after the step's ``torch_xla.sync``, as graphs of their own; a
  checkpoint reads everything it saves in one host copy;
- torch-xla steps its RNG seed at every sync (eval, checkpoint rendezvous and start-up
  syncs included), so each step starts from the seed the previous step's final sync left
  (`step_seed`), which is what a checkpoint keeps and a resumed run starts its first
  step from: the resumed run's seed sequence is the uninterrupted run's whatever syncs
  its start-up and the save made;
- under ``neuron_parallel_compile``'s trial run (``NEURON_EXTRACT_GRAPHS_ONLY``, set
  by `bmojo-neuron precompile`) every graph is traced and cut as in a real run, but
  no device value is read (they are zeros there): no loss closures, evaluations
  report NaN, checkpoints trace their graph and write nothing, and no ``final/`` is
  exported.

With ``parallel.pp > 1`` the model is NxD's pipeline (``NxDPPModel`` over
`bmojo_neuron.parallel.nxd_pipeline.PipelineCausalLM`, cut after `split_layers`'
blocks) and a step is one ``run_train`` over the host rows of the whole step:
``parallel.microbatches × train.grad_accum`` NxD micro-batches, so the tied-embedding
gradient that NxD sums over the first and last stage is summed once per step. NxD
moves the micro-batches to the device and cuts the step into graphs itself (a
``xm.mark_step`` before and after ``run_train`` and after every task of its schedule);
the backend adds exactly one, for the optimizer step. The last stage's per-micro-batch
losses come from `PipelineStats` (NxD returns only the mean loss), are summed over the
stages inside the graph (the others contribute zeros) and read by the step closure,
as above. Eval runs through ``run_eval`` (`evaluate_pipeline`).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from bmojo_neuron.checkpoints import neuron as neuron_checkpoints
from bmojo_neuron.checkpoints.export import export_final
from bmojo_neuron.checkpoints.inference import check_initial_weights, initial_weights
from bmojo_neuron.checkpoints.layout import FINAL, latest_checkpoint
from bmojo_neuron.checkpoints.sharded import consolidated_model, parallel_meta
from bmojo_neuron.checkpoints.state import Checkpoint, TrainerState
from bmojo_neuron.evaluation import LengthResult
from bmojo_neuron.launch.plan import runtime_env, validate_for_trainium
from bmojo_neuron.neuron import import_neuron_module
from bmojo_neuron.ops.dispatch import ENV_VAR, use_backend
from bmojo_neuron.ops.reference.eager_cpu import fused_kernels_disabled
from bmojo_neuron.parallel.nxd_pipeline import PipelineStats
from bmojo_neuron.parallel.nxd_training import build_nxd_model, build_nxd_optimizer, nxd_config
from bmojo_neuron.parallel.sharding import shard_shapes, tied_names
from bmojo_neuron.training.data_order import seed_everything
from bmojo_neuron.training.neuron_data import MicroBatchRows, StepRows, step_loader, steps_of
from bmojo_neuron.training.neuron_eval import evaluate_on_device, evaluate_pipeline, length_eval_on_device
from bmojo_neuron.training.neuron_runtime import FEATURE, NeuronRuntime
from bmojo_neuron.training.objective import Objective, causal_lm_loss
from bmojo_neuron.training.optim import parameter_groups

DEFAULT_OPS_BACKEND = "nki"


def select_ops_backend() -> str:
    """The hot ops' backend on Trainium: NKI, unless ``BMOJO_OPS_BACKEND`` names another (e.g. ``torch``)."""
    return os.environ.get(ENV_VAR) or DEFAULT_OPS_BACKEND


class NeuronBackend:
    """This process's NeuronCore in a run: NxD's parallel state, the XLA device, step graphs."""

    def __init__(self, recipe: Any, runtime: NeuronRuntime, objective: Objective = causal_lm_loss) -> None:
        self.recipe, self.rt, self.objective = recipe, runtime, objective
        self.mqar = recipe.data.kind == "mqar"
        self.is_main = runtime.is_main
        validate_for_trainium(recipe, runtime.world)  # shapes the kernels tile, degrees, batch divisible by dp
        r = recipe  # NxD's config initialises its parallel state: the ranks below are NxD's from here on
        self.nxd_cfg = nxd_config(r.parallel, r.train.activation_checkpointing, r.train.precision == "bf16",
                                  model_config=r.model_config(), max_grad_norm=r.optim.grad_clip,
                                  grad_accum=r.train.grad_accum)
        self.stats: PipelineStats | None = None  # the last stage's loss hook under pp (set with the model)
        self.restored: dict[str, Tensor] = {}  # this rank's weights read on resume (ZeRO-1's fp32 masters)
        self.stop_flag: tuple[bool, Tensor] | None = None  # this rank's wish to stop, as the step graphs take it
        self.stop_votes: Tensor | None = None  # the last step graph's sum of the ranks' stop flags, unread
        # The XLA seed each step starts from: the one the previous step's final sync left (a checkpoint's, on
        # resume); None before the first step of a fresh run, which starts where the start-up left the seed.
        self.step_seed: int | None = None
        self.pipeline_ran = False  # NxD's pipeline ran a run_train / run_eval (its first infers the stage shapes)
        # For the whole run (undone by `close`): the hot ops on NKI, and where the torch backend is chosen, its
        # blocked attention (what an XLA graph runs), never the CPU-only fused kernels.
        self.ops = contextlib.ExitStack()
        self.ops.enter_context(use_backend(select_ops_backend()))
        self.ops.enter_context(fused_kernels_disabled())

    @classmethod
    def start(cls, recipe: Any, objective: Objective = causal_lm_loss) -> NeuronBackend:
        """Start the runtime (torch-xla, the ``xla`` process group, NxD) for `recipe`."""
        runtime = NeuronRuntime.start(runtime_env(recipe))
        try:
            return cls(recipe, runtime, objective)
        except BaseException:
            runtime.close()
            raise

    def close(self) -> None:
        self.ops.close()
        self.rt.close()

    # ------------------------------------------------------------------ set-up

    def seed(self, seed: int) -> None:
        seed_everything(seed)
        self.rt.seed(seed)

    def load_latest(self, run_dir: Path) -> Checkpoint | None:
        tied_copy = neuron_checkpoints.holds_tied_copy(self.rt, self.recipe.model_config())
        return neuron_checkpoints.load_latest(run_dir, self.rt, tied_copy)

    def build_model(self, previous: Checkpoint | None) -> nn.Module:
        """NxD's model (its pipeline under pp) from the one-device initialisation; on resume this rank's weights
        are loaded here, before the optimizer exists (ZeRO-1 copies them into its shards)."""
        config, rt = self.recipe.model_config(), self.rt
        path, start = self.recipe.init.weights, None
        if previous is None and path:
            start = initial_weights(path)
            check_initial_weights(start, shard_shapes(config, 1), path)
        dtype = torch.bfloat16 if self.recipe.train.precision == "bf16" else torch.float32
        # in `dtype` before the optimizer exists (ZeRO-1 takes its fp32 master copies from it)
        model = build_nxd_model(config, self.nxd_cfg, dtype=dtype, one_device_init=True, count_correct=self.mqar,
                                start_weights=start)
        if rt.pp > 1:
            self.stats = PipelineStats.of(model, self.nxd_cfg["pipeline_config"]["num_microbatches"], rt.last_stage)
        self.full_shapes = shard_shapes(config, 1)
        local_shapes = {**shard_shapes(config, rt.tp, rt.tp_rank),  # every stage's (a stage holds its own)
                        **{k: v.shape for k, v in model.state_dict().items()}}
        p = self.recipe.parallel
        self.meta = parallel_meta(self.full_shapes, local_shapes, rt.tp, rt.pp, rt.dp, p.sp, p.zero1)
        mark_tensor_shards(model, self.meta["split_dims"], rt.nxd_utils, rt.tp)
        if previous is not None:
            self.restored = neuron_checkpoints.restore_weights(model, previous, rt)
        if rt.pp == 1:  # under pp NxD's run_train / run_eval set the stages' mode themselves
            model.train()
        return model

    def build_optimizer(self, model: nn.Module) -> Any:
        o = self.recipe.optim
        return build_nxd_optimizer(parameter_groups(model, o.weight_decay, o.lr, o.lr_multipliers), self.nxd_cfg, o)

    def restore(self, previous: Checkpoint, model: nn.Module, optimizer: Any, scheduler: Any) -> None:
        """The checkpoint's training state; its XLA seed is set when the first step starts (`step`), after every
        sync of this run's start-up (each steps the seed), as the uninterrupted run's next step started from it."""
        neuron_checkpoints.restore_training_state(model, optimizer, scheduler, previous, self.restored, self.rt)
        if previous.scheduler is not None:  # not a warm start from an export, which has no training state
            self.step_seed = previous.rng.get("xla")

    def parameter_count(self, model: nn.Module, which: Callable[[str], bool] | None = None) -> int:
        skip = tied_names(self.recipe.model_config())
        return sum(torch.Size(s).numel() for k, s in self.full_shapes.items()
                   if k not in skip and (which is None or which(k)))

    # ------------------------------------------------------------------ a step

    def batches(self, train_data: Any, epoch: int, position: int, steps: int) -> Iterator[Any]:
        """Per remaining step: an iterator over its micro-batches on the device (torch-xla's ``MpDeviceLoader``
        over a host loader of this rank's rows, one micro-batch per item); under pp, the step's host rows
        (NxD takes host tensors and moves its micro-batches itself)."""
        t, rt, seed = self.recipe.train, self.rt, self.recipe.run.seed
        if rt.pp > 1:
            return iter(step_loader(train_data, StepRows(len(train_data), t.batch_size, seed, epoch, position,
                                                         t.grad_accum, rt.dp_rank, rt.dp, steps)))
        sampler = MicroBatchRows(len(train_data), t.batch_size, seed, epoch, position, rt.dp_rank, rt.dp,
                                 steps * t.grad_accum)
        loader_module = import_neuron_module("torch_xla.distributed.parallel_loader", FEATURE)
        return steps_of(iter(loader_module.MpDeviceLoader(step_loader(train_data, sampler), rt.device)),
                        t.grad_accum)

    def step(self, model: nn.Module, optimizer: Any, batch: Any) -> Tensor:
        """Trace one optimizer step (`finish_step` runs it); no host read inside."""
        rt = self.rt
        self.restart_seed()
        losses = self.pipeline_losses(model, batch) if rt.pp > 1 else self.accumulated_losses(model, batch)
        self.pipeline_ran = rt.pp > 1
        losses = rt.mean_over_dp(losses)  # the logged loss is the global batch's
        optimizer.step()  # NxD: gradients averaged over data ranks, clipped (grad_norm), AdamW
        grad_norm = optimizer.grad_norm
        grad_norm = torch.zeros((), device=rt.device) if grad_norm is None else grad_norm.detach().float()
        return torch.cat([losses, grad_norm.reshape(1)])

    def restart_seed(self) -> None:
        """Before a step's first sync: the XLA seed where the previous step's final sync left it (`step_seed`), so
        the eval and checkpoint syncs since then, or a resumed run's start-up syncs, do not move it. A fresh run's
        first step starts where the start-up left it."""
        if self.step_seed is None:
            return
        if self.rt.pp > 1 and not self.pipeline_ran:
            # NxD's first run_train of this model (a resumed run's first step) infers the stage shapes and syncs
            # once more before its schedule (pipeline/model.py 902-929 at v2.28.0): start one sync back, so the
            # schedule's graphs get the seeds they got in the uninterrupted run
            self.rt.set_rng_state_one_sync_back(self.step_seed)
        else:
            self.rt.set_rng_state(self.step_seed)

    def accumulated_losses(self, model: nn.Module, micro_batches: Iterator[dict[str, Tensor]]) -> Tensor:
        """Forward + backward of the step's ``train.grad_accum`` micro-batches, a graph each (the loader's fetch
        cuts it), then a cut before the optimizer step; the objective's numbers (``[loss, lm_loss, aux_loss]``
        for the causal-LM loss)."""
        losses: Tensor | None = None
        for micro in micro_batches:
            numbers = self.forward_backward(model, micro["input_ids"], micro["labels"])
            losses = numbers if losses is None else losses + numbers
        if self.recipe.train.grad_accum > 1:
            self.rt.sync()  # the last micro-batch's graph; the update gets a graph of its own
        return losses

    def forward_backward(self, model: nn.Module, ids: Tensor, labels: Tensor) -> Tensor:
        """One micro-batch; returns the objective's numbers / ``grad_accum``. A method of its own so the model
        output (and its logits) is dropped before ``torch_xla.sync``: every tensor still alive then becomes an output
        of the step graph."""
        accum = self.recipe.train.grad_accum
        loss, parts = self.objective(model, ids, labels)
        (loss / accum).backward()
        return parts.float() / accum

    def pipeline_losses(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """NxD's pipeline over the step's host rows (forward, backward, shared-gradient sums; its own
        ``xm.mark_step`` calls); ``[loss, lm_loss, aux_loss]`` of the last stage, on every stage."""
        model.run_train(input_ids=batch["input_ids"], labels=batch["labels"])
        return self.rt.sum_over_pp(self.stats.train_losses(self.rt.device))

    def finish_step(self, records: Sequence[Tensor], read: Callable[[Tensor], None], log: bool,
                    stop_requested: bool) -> bool:
        """The step's final ``torch_xla.sync``, and whether every rank stops after this step.

        At log steps `read` runs as a step closure, after the graph executed; at a stop step off the log cadence,
        after the stop is settled (never in a graph-extraction run: nothing there is worth reading).
        """
        records, rt = list(records), self.rt
        votes = self.vote_to_stop(stop_requested)
        if log and records and not rt.extracting:
            rt.add_step_closure(lambda: read(self.host_rows(records)))
        rt.sync()
        self.step_seed = rt.rng_state()  # where the next step starts (`step`), and what a checkpoint keeps
        stop = self.settle_stop(stop_requested, votes)
        if stop and not log and records and not rt.extracting:
            read(self.host_rows(records))
        return stop

    def host_rows(self, records: list[Tensor]) -> Tensor:
        return torch.stack(self.rt.to_cpu(records))

    def vote_to_stop(self, requested: bool) -> Tensor | None:
        """This rank's stop flag summed over every rank, traced into the pending step graph (None with one rank).

        The flag is a one-element device tensor, a graph input: the step graph is the same whatever it holds,
        and it is uploaded again only when this rank's wish changes.
        """
        if self.rt.world == 1:
            return None
        if self.stop_flag is None or self.stop_flag[0] != requested:
            self.stop_flag = (requested, torch.tensor([float(requested)]).to(self.rt.device))
        return self.rt.sum_over_world(self.stop_flag[1])

    def settle_stop(self, requested: bool, votes: Tensor | None) -> bool:
        """Whether the ranks stop after the step just queued: the previous step graph's sum of their flags.

        Reading a device value waits for the graph that computed it: in torch-xla 2.9 a read takes the device
        lock, which a queued graph holds only until it is handed to the runtime (``XLATensor::ToTensor``, then
        PJRT's ``ExecuteComputation``, which returns without waiting for the execution), then awaits that
        value's buffer. The previous step's graph ran while this step was traced, and this step's graph keeps the
        device busy during the read, so no step waits on its own graph; a read of this step's sum would. Every
        rank reads the same sum at the same step, so all stop together, one step after the request reached a
        step graph (docs/trn1.md, Stopping a run). One rank needs no agreement; a graph-extraction run reads no
        device value and goes by this rank's own flag.
        """
        if votes is None or self.rt.extracting:
            return requested
        previous, self.stop_votes = self.stop_votes, votes
        return previous is not None and self.rt.to_cpu([previous])[0].item() > 0

    # ------------------------------------------------------------------ eval, checkpoints, export

    def evaluate(self, model: nn.Module, eval_data: Any) -> dict[str, float]:
        r = self.recipe
        if self.rt.pp > 1:
            self.pipeline_ran = True
            return evaluate_pipeline(model, self.stats, eval_data, r.train.batch_size, r.train.grad_accum, self.rt,
                                     r.eval.batches, self.mqar)
        return evaluate_on_device(model, eval_data, r.train.batch_size, self.rt, r.eval.batches, self.mqar)

    def length_eval(self, model: nn.Module, eval_data: Any, multipliers: list[int]) -> list[LengthResult]:
        r = self.recipe
        self.pipeline_ran = self.rt.pp > 1
        return length_eval_on_device(model, r, eval_data, multipliers, r.train.batch_size, self.rt, r.eval.batches,
                                     self.stats)

    def save(self, run_dir: Path, model: nn.Module, optimizer: Any, scheduler: Any, state: TrainerState,
             recipe: dict[str, Any]) -> None:
        if self.rt.extracting:  # the save's graph, for the compile cache; no values to write
            neuron_checkpoints.trace_save(model, optimizer, self.rt)
            return
        neuron_checkpoints.save_checkpoint(run_dir, self.rt, model, optimizer, scheduler, state, recipe,
                                           self.recipe.checkpoint.keep_last, self.meta, self.step_seed)

    def export(self, run_dir: Path, model: nn.Module, recipe: dict[str, Any], tokenizer: str,
               metrics: dict[str, Any]) -> Path:
        """Rank 0 consolidates the last checkpoint (fp32 weights) into ``final/`` (nothing in a graph-extraction
        run, which writes no checkpoint)."""
        self.rt.barrier("export-open")
        if self.is_main and not self.rt.extracting:
            export_final(run_dir, consolidated_model(latest_checkpoint(run_dir)), recipe, tokenizer, metrics)
        self.rt.barrier("export-done")
        return run_dir / FINAL

    def agree_to_stop(self, requested: bool) -> bool:
        """Whether any rank asked to stop, the same answer on every rank, at once: a one-element all-reduce over
        the world and a host read of it. The finish calls it a few times per run, with no step graph to keep busy;
        the step loop settles its stops in `finish_step`. A graph-extraction run traces and cuts the same graph and
        goes by this rank's own flag."""
        if self.rt.world == 1:
            return requested
        votes = self.rt.sum_over_world(torch.tensor([float(requested)]).to(self.rt.device))
        if self.rt.extracting:
            self.rt.sync()
            return requested
        return self.rt.to_cpu([votes])[0].item() > 0

    def barrier(self, tag: str) -> None:
        self.rt.barrier(tag)


def mark_tensor_shards(model: nn.Module, split_dims: dict[str, int | None], nxd_utils: Any, tp: int) -> list[str]:
    """Give NxD's tensor-parallel attributes to the sharded parameters that are not NxD layers' own.

    The Mamba mixers build some tensors at 1/tp size themselves (``conv_x``, ``A_log``,
    ``D``, ``dt_bias``, the gated norm). NxD's gradient norm counts a parameter without
    ``tensor_model_parallel`` as replicated (its square divided by tp, summed over tp),
    which would under-count these shards; ``num_partitions`` is `tp` (NxD warns that its
    default "may not work correctly"). Returns the names it marked.
    """
    marked = []
    for name, param in model.named_parameters():
        name = name.replace(neuron_checkpoints.WRAPPER_INFIX, "")
        dim = split_dims.get(name)
        if dim is not None and not getattr(param, "tensor_model_parallel", False):
            nxd_utils.set_tensor_model_parallel_attributes(param, True, dim, 1, num_partitions=tp)
            marked.append(name)
    return marked
