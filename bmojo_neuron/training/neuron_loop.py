"""The trainer on Trainium: `train_on_neuron`, what `train()` runs for ``run.device: neuron``.

The same recipe semantics as the CPU loop (`bmojo_neuron.training.loop`): data
order, global ``train.batch_size``, losses, schedule, metrics, checkpoints and the
final export; a run on one NeuronCore equals the one-process CPU run. What is
specific to a compiled XLA device:

- torch-xla and NeuronX Distributed (NxD) come in through `NeuronRuntime` (lazily;
  `NeuronUnavailableError` names what is missing); NxD is initialised from
  ``parallel.tp / pp / sp / zero1`` (`bmojo_neuron.parallel.nxd_training`) and the
  model is built with NxD's tensor-parallel layers, starting from the one-device
  initialisation's weights;
- the hot ops run on the NKI backend (``BMOJO_OPS_BACKEND`` may name another);
- ``train.precision: bf16`` casts the model to bf16 (``model.to(torch.bfloat16)``,
  as SDK 2.28 expects; no ``XLA_USE_BF16``), with stochastic rounding and, under
  ZeRO-1, NxD's fp32 master weights;
- a step is one graph: the host batch of the whole step arrives through
  ``MpDeviceLoader``; forward/backward of its ``grad_accum`` micro-batches,
  NxD's optimizer step (data-parallel gradient reduction, clipping, AdamW), the
  scheduler and ``zero_grad`` are traced, then exactly one ``mark_step`` runs it.
  Nothing in the step reads a device value: losses are read by a step closure at
  log steps, after the graph ran;
- eval and checkpoints run after the step's ``mark_step``, as graphs of their own.

With ``parallel.pp > 1`` the model is NxD's pipeline (``NxDPPModel`` over
`bmojo_neuron.parallel.nxd_pipeline.PipelineCausalLM`, cut after `split_layers`'
blocks) and a step is one ``run_train`` over the host rows of the whole step:
``parallel.microbatches × train.grad_accum`` NxD micro-batches, so the tied-embedding
gradient that NxD sums over the first and last stage is summed once per step. NxD
moves the micro-batches to the device and cuts the step into graphs itself (a
``mark_step`` before and after ``run_train`` and after every task of its schedule);
the loop adds exactly one, for the optimizer step. The last stage's per-micro-batch
losses come from `PipelineStats` (NxD returns only the mean loss), are summed over the
stages inside the graph (the others contribute zeros) and read by the step closure,
as above. Eval runs through ``run_eval`` (`evaluate_pipeline`).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bmojo_neuron.checkpoints import layout as ckpt
from bmojo_neuron.checkpoints.export import export_final
from bmojo_neuron.checkpoints.sharded import consolidated_model
from bmojo_neuron.checkpoints.state import Checkpoint, TrainerState
from bmojo_neuron.evaluation import LengthResult, format_length_table, plot_length
from bmojo_neuron.fsutil import write_text_atomic
from bmojo_neuron.recipes import resume_conflicts
from bmojo_neuron.training.data_order import position_after, seed_everything
from bmojo_neuron.training.metrics import MetricsLogger, RecordsOnly, plot_training
from bmojo_neuron.training.neuron_data import StepRows, micro_batches, step_loader
from bmojo_neuron.training.progress import Progress
from bmojo_neuron.training.result import LENGTH_FILE, LENGTH_PLOT, PLOT_FILE, TrainResult, tokenizer_name
from bmojo_neuron.training.neuron_runtime import FEATURE, NeuronRuntime, rank0_first

DEFAULT_OPS_BACKEND = "nki"


def select_ops_backend() -> str:
    """The hot ops' backend on Trainium: NKI, unless ``BMOJO_OPS_BACKEND`` names another (e.g. ``torch``)."""
    from bmojo_neuron.ops.dispatch import ENV_VAR

    return os.environ.get(ENV_VAR) or DEFAULT_OPS_BACKEND


def train_on_neuron(recipe: Any, output_dir: str | Path | None = None, resume: bool = False, progress: bool = True,
                    stop_after: int | None = None, datasets: tuple[Any, Any] | None = None) -> TrainResult:
    """`bmojo_neuron.training.loop.train` on a NeuronCore (one torchrun process per core)."""
    started = time.perf_counter()
    recipe.check()
    runtime = NeuronRuntime.start(bf16=recipe.train.precision == "bf16")
    from bmojo_neuron.ops.dispatch import use_backend

    try:
        with use_backend(select_ops_backend()):
            return NeuronTrainer(recipe, runtime, Path(output_dir or recipe.run.output_dir)).run(
                resume, progress, stop_after, datasets, started)
    finally:
        runtime.close()


class NeuronTrainer:
    """One training run on this process's NeuronCore; `run` is the whole of it."""

    def __init__(self, recipe: Any, runtime: NeuronRuntime, run_dir: Path) -> None:
        self.recipe, self.rt, self.run_dir = recipe, runtime, run_dir
        self.recipe_dict = recipe.record()
        self.mqar = recipe.data.kind == "mqar"
        self.stats: Any = None  # `PipelineStats` under pp (set with the model)

    # ------------------------------------------------------------------ set-up

    def _init_parallel(self) -> dict:
        """NxD's config (which initialises its parallel state), then the checks that need the world size."""
        from bmojo_neuron.launch.plan import validate_for_trainium
        from bmojo_neuron.parallel.nxd_training import nxd_config

        r = self.recipe
        validate_for_trainium(r, self.rt.world)  # shapes the kernels tile, degrees, batch divisible by dp
        return nxd_config(r.parallel, r.train.activation_checkpointing, r.train.precision == "bf16",
                          model_config=r.model_config(), max_grad_norm=r.optim.grad_clip,
                          grad_accum=r.train.grad_accum)

    def _load_previous(self, resume: bool) -> Checkpoint | None:
        from bmojo_neuron.checkpoints.neuron import holds_tied_copy, load_latest

        tied_copy = holds_tied_copy(self.rt, self.recipe.model_config())
        previous = load_latest(self.run_dir, self.rt, tied_copy) if resume else None
        if previous is None and not resume and ckpt.has_run(self.run_dir):
            raise ValueError(f"{self.run_dir} already holds a run; pass --resume to continue it, or pick another "
                             "--output-dir")
        if previous is not None and (diff := resume_conflicts(previous.recipe, self.recipe_dict)):
            raise ValueError(f"cannot resume {previous.path}: the recipe changed in {', '.join(diff)}")
        self.rt.barrier("run-dir-checked")  # every rank looked before rank 0 writes into the run dir
        return previous

    def _build_model(self, nxd_cfg: dict, previous: Checkpoint | None) -> tuple[nn.Module, dict[str, Tensor]]:
        from bmojo_neuron.checkpoints import sharded as fmt
        from bmojo_neuron.checkpoints.neuron import restore_weights
        from bmojo_neuron.parallel.nxd_training import build_nxd_model
        from bmojo_neuron.parallel.sharding import shard_shapes

        config, rt = self.recipe.model_config(), self.rt
        model = build_nxd_model(config, nxd_cfg, one_device_init=True, count_correct=self.mqar)  # NxD-wrapped
        if self.recipe.train.precision == "bf16":
            model.to(torch.bfloat16)  # before the optimizer: ZeRO-1 takes its fp32 master copies from these
        self.stats = self._pipeline_stats(model, nxd_cfg)
        full_shapes = shard_shapes(config, 1)
        local_shapes = {**shard_shapes(config, rt.tp, rt.tp_rank),  # every stage's (a stage holds its own)
                        **{k: v.shape for k, v in model.state_dict().items()}}
        p = self.recipe.parallel
        self.meta = fmt.parallel_meta(full_shapes, local_shapes, rt.tp, rt.pp, rt.dp, p.sp, p.zero1)
        mark_tensor_shards(model, self.meta["split_dims"], rt.nxd_utils)
        self.params = sum(torch.Size(s).numel() for k, s in full_shapes.items() if k not in fmt.tied_names(config))
        weights = restore_weights(model, previous, rt) if previous is not None else {}
        return model, weights

    def _pipeline_stats(self, model: nn.Module, nxd_cfg: dict) -> Any:
        """Under pp: the `PipelineStats` hook on the last stage (records nothing elsewhere); else None."""
        if self.rt.pp == 1:
            return None
        from bmojo_neuron.parallel.nxd_pipeline import PipelineStats

        return PipelineStats.of(model, nxd_cfg["pipeline_config"]["num_microbatches"], self.rt.last_stage)

    # ------------------------------------------------------------------ the run

    def run(self, resume: bool, progress: bool, stop_after: int | None, datasets: tuple[Any, Any] | None,
            started: float) -> TrainResult:
        from bmojo_neuron.parallel.nxd_training import build_nxd_optimizer
        from bmojo_neuron.checkpoints.neuron import restore_training_state
        from bmojo_neuron.training.optim import build_scheduler, parameter_groups

        r, rt = self.recipe, self.rt
        t, o = r.train, r.optim
        nxd_cfg = self._init_parallel()
        previous = self._load_previous(resume)
        train_data, eval_data = datasets if datasets is not None else rank0_first(rt, self._datasets, "data")
        if len(eval_data) == 0:
            raise ValueError("the eval dataset is empty")
        seed_everything(r.run.seed)
        rt.seed(r.run.seed)
        model, weights = self._build_model(nxd_cfg, previous)
        optimizer = build_nxd_optimizer(parameter_groups(model, o.weight_decay), nxd_cfg, o)
        scheduler = build_scheduler(optimizer, o.warmup_steps, t.steps, o.min_lr_ratio)
        state = TrainerState()
        if previous is not None:
            restore_training_state(model, optimizer, scheduler, previous, weights, rt)
            state = previous.state
            self._say(f"resuming {self.run_dir} from {previous.path.name} (step {state.step})")
        elif resume:
            self._say(f"no checkpoint in {self.run_dir}: starting from scratch")
        self._prepare_run_dir()
        self.model, self.optimizer, self.scheduler, self.state = model, optimizer, scheduler, state
        self.train_data, self.eval_data = train_data, eval_data
        self.logger = (MetricsLogger(self.run_dir, state.metrics, state.step) if rt.is_main
                       else RecordsOnly(state.metrics))
        self.bar = Progress(r.run.name, t.steps, state.step, enabled=progress and rt.is_main)
        eval_result = self._train_steps(stop_after)
        if state.step < t.steps:  # stopped early (`stop_after`): checkpoint written, no export
            self.logger.close()
            return TrainResult(self.run_dir, self.params, state.step, metrics=self.logger.records,
                               seconds=time.perf_counter() - started)
        return self._finish(eval_result, started)

    def _datasets(self) -> tuple[Any, Any]:
        from bmojo_neuron.data import build_datasets

        return build_datasets(self.recipe)

    def _prepare_run_dir(self) -> None:
        if self.rt.is_main:
            ckpt.clean_stale(self.run_dir)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.run_dir / ckpt.RECIPE_FILE, json.dumps(self.recipe_dict, indent=2))
        self.rt.barrier("run-dir")

    def _say(self, text: str) -> None:
        if self.rt.is_main:
            print(text, flush=True)

    # ------------------------------------------------------------------ steps

    def _device_batches(self) -> Any:
        """The host loader of the remaining steps, wrapped in torch-xla's ``MpDeviceLoader`` (under pp NxD
        takes host tensors and moves its micro-batches itself)."""
        from bmojo_neuron.neuron import import_neuron_module

        t, state, rt = self.recipe.train, self.state, self.rt
        sampler = StepRows(len(self.train_data), t.batch_size, self.recipe.run.seed, state.epoch, state.position,
                           t.grad_accum, rt.dp_rank, rt.dp, t.steps - state.step)
        loader = step_loader(self.train_data, sampler)
        if rt.pp > 1:
            return iter(loader)
        loader_module = import_neuron_module("torch_xla.distributed.parallel_loader", FEATURE)
        return iter(loader_module.MpDeviceLoader(loader, rt.device))

    def _train_steps(self, stop_after: int | None) -> dict[str, float]:
        r, state = self.recipe, self.state
        t, e, c = r.train, r.eval, r.checkpoint
        if self.rt.pp == 1:  # under pp NxD's run_train / run_eval set the stages' mode themselves
            self.model.train()
        batches = self._device_batches()
        self.log = LogWindow(self.recipe.train.batch_size * t.grad_accum * len(self.train_data[0]["input_ids"]))
        start_epoch, start_position, per_epoch = state.epoch, state.position, len(self.train_data) // t.batch_size
        start_step, eval_result = state.step, {}
        while state.step < t.steps:
            step = state.step + 1
            last, stop = step == t.steps, stop_after is not None and step >= stop_after
            save_now, eval_now = last or stop or step % c.every == 0, last or step % e.every == 0
            self._step(next(batches), log_now=step % t.log_every == 0 or save_now, step=step)
            state.step = step
            state.tokens += self.log.tokens_per_step
            state.epoch, state.position = position_after(start_epoch, start_position, per_epoch,
                                                         (step - start_step) * t.grad_accum)
            self.bar.update()
            if eval_now:
                eval_result = self._evaluate()
            if save_now:
                self._save()
            if eval_now or save_now:
                self.log.restart_clock()  # keep eval and checkpoint time out of tokens/s
            if stop and not last:
                break
        self.bar.close()
        return eval_result

    def _step(self, batch: dict[str, Tensor], log_now: bool, step: int) -> None:
        """Trace one optimizer step and run it with exactly one ``mark_step`` of ours; no host read inside."""
        rt = self.rt
        losses = self._pipeline_losses(batch) if rt.pp > 1 else self._accumulated_losses(batch)
        losses = rt.mean_over_dp(losses)  # the logged loss is the global batch's
        self.optimizer.step()  # NxD: gradients averaged over data ranks, clipped (grad_norm), AdamW
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        grad_norm = self.optimizer.grad_norm
        grad_norm = torch.zeros((), device=rt.device) if grad_norm is None else grad_norm.detach().float()
        self.log.add(torch.cat([losses, grad_norm.reshape(1)]))
        if log_now:  # read the losses after the graph ran, not inside it
            rt.add_step_closure(self._log_train, (self.log.take(), step, self.scheduler.get_last_lr()[0],
                                                  self.state.tokens + self.log.tokens_per_step))
        rt.sync()

    def _accumulated_losses(self, batch: dict[str, Tensor]) -> Tensor:
        """Forward + backward of the step's ``train.grad_accum`` micro-batches; ``[loss, lm_loss, aux_loss]``."""
        t = self.recipe.train
        losses = torch.zeros(3, device=self.rt.device)
        for ids, labels in micro_batches(batch, t.grad_accum):
            losses = losses + _micro_step(self.model, ids, labels, t.grad_accum)
        return losses

    def _pipeline_losses(self, batch: dict[str, Tensor]) -> Tensor:
        """NxD's pipeline over the step's host rows (forward, backward, shared-gradient sums; its own
        ``mark_step``s); ``[loss, lm_loss, aux_loss]`` of the last stage, on every stage."""
        self.model.run_train(input_ids=batch["input_ids"], labels=batch["labels"])
        return self.rt.sum_over_pp(self.stats.train_losses(self.rt.device))

    def _log_train(self, records: list[Tensor], step: int, lr: float, tokens: int) -> None:
        """Step closure of a log step: the device values are ready; one host copy of them all."""
        loss, lm, aux, gnorm = torch.stack(self.rt.to_cpu(records)).mean(0).tolist()
        tps = self.log.tokens_per_s()
        self.logger.log({"type": "train", "step": step, "loss": loss, "lm_loss": lm, "aux_loss": aux,
                         "grad_norm": gnorm, "lr": lr, "tokens": tokens, "tokens_per_s": tps})
        self.bar.show(step, loss, tps)
        if not math.isfinite(loss):
            raise FloatingPointError(f"training loss is {loss} at step {step}; lower optim.lr or resume from an "
                                     f"earlier checkpoint in {self.run_dir}")

    # ------------------------------------------------------------------ eval, checkpoints, export

    def _evaluate(self) -> dict[str, float]:
        from bmojo_neuron.training.neuron_eval import evaluate_on_device, evaluate_pipeline

        r = self.recipe
        if self.rt.pp > 1:
            result = evaluate_pipeline(self.model, self.stats, self.eval_data, r.train.batch_size,
                                       r.train.grad_accum, self.rt, r.eval.batches, self.mqar)
        else:
            result = evaluate_on_device(self.model, self.eval_data, r.train.batch_size, self.rt, r.eval.batches,
                                        self.mqar)
        self.logger.log({"type": "eval", "step": self.state.step, **{f"eval_{k}": v for k, v in result.items()}})
        self.bar.write(f"step {self.state.step}: " + ", ".join(f"eval {k} {v:.4g}" for k, v in result.items()
                                                                 if k != "tokens"))
        return result

    def _save(self) -> None:
        from bmojo_neuron.checkpoints.neuron import save_checkpoint

        self.state.metrics = self.logger.records
        save_checkpoint(self.run_dir, self.rt, self.model, self.optimizer, self.scheduler, self.state,
                        self.recipe_dict, self.recipe.checkpoint.keep_last, self.meta)

    def _finish(self, eval_result: dict[str, float], started: float) -> TrainResult:
        """Final eval (reused when resuming a finished run), length generalisation, plots and ``final/``."""
        from bmojo_neuron.training.neuron_eval import length_eval_on_device

        r, rt, state = self.recipe, self.rt, self.state
        if not eval_result:
            done = [x for x in self.logger.records if x["type"] == "eval" and x["step"] == state.step]
            eval_result = ({k[5:]: v for k, v in done[-1].items() if k.startswith("eval_")} if done
                           else self._evaluate())
        lengths: list[LengthResult] = []
        multipliers = [int(m) for m in (r.eval.length_multipliers or [])]
        if any(m != 1 for m in multipliers):
            lengths = length_eval_on_device(self.model, r, self.eval_data, multipliers, r.train.batch_size, rt,
                                            r.eval.batches, self.stats)
            if rt.is_main:
                (self.run_dir / LENGTH_FILE).write_text(json.dumps([x.__dict__ for x in lengths], indent=2))
                plot_length(lengths, self.run_dir / LENGTH_PLOT, title=r.run.name)
                print(format_length_table(lengths, title=f"{r.run.name}: length generalisation"))
        self.logger.close()
        rt.barrier("export-open")
        if rt.is_main:
            plot_training(self.logger.records, self.run_dir / PLOT_FILE, title=r.run.name)
            model = consolidated_model(ckpt.latest_checkpoint(self.run_dir))
            export_final(self.run_dir, model, self.recipe_dict, tokenizer_name(r), eval_result)
        rt.barrier("export-done")
        return TrainResult(self.run_dir, self.params, state.step, self.run_dir / ckpt.FINAL, eval_result, lengths,
                           self.logger.records, time.perf_counter() - started)


def mark_tensor_shards(model: nn.Module, split_dims: dict[str, int | None], nxd_utils: Any) -> list[str]:
    """Give NxD's tensor-parallel attributes to the sharded parameters that are not NxD layers' own.

    The Mamba mixers build some tensors at 1/tp size themselves (``conv_x``, ``A_log``,
    ``D``, ``dt_bias``, the gated norm). NxD's gradient norm counts a parameter without
    ``tensor_model_parallel`` as replicated (its square divided by tp, summed over tp),
    which would under-count these shards. Returns the names it marked.
    """
    from bmojo_neuron.checkpoints.neuron import WRAPPER_INFIX

    marked = []
    for name, param in model.named_parameters():
        name = name.replace(WRAPPER_INFIX, "")
        dim = split_dims.get(name)
        if dim is not None and not getattr(param, "tensor_model_parallel", False):
            nxd_utils.set_tensor_model_parallel_attributes(param, True, dim, 1)
            marked.append(name)
    return marked


def _micro_step(model: nn.Module, ids: Tensor, labels: Tensor, grad_accum: int) -> Tensor:
    """Forward + backward of one micro-batch; returns ``[loss, lm_loss, aux_loss] / grad_accum`` (detached).

    A function of its own so the model output (and its logits) is dropped before
    ``mark_step``: every tensor still alive then becomes an output of the step graph.
    """
    out = model(ids, labels=labels)
    (out.loss / grad_accum).backward()
    aux = out.aux_loss.detach() if out.aux_loss is not None else torch.zeros_like(out.loss.detach())
    return torch.stack([out.loss.detach(), out.lm_loss.detach(), aux]).float() / grad_accum


class LogWindow:
    """Per-step loss records waiting for the next log step, and the tokens/s clock (as the CPU loop keeps it)."""

    def __init__(self, tokens_per_step: int) -> None:
        self.tokens_per_step = tokens_per_step
        self.pending: list[Tensor] = []
        self.tokens = 0  # since the last log
        self.since = time.perf_counter()

    def add(self, record: Tensor) -> None:
        self.pending.append(record)
        self.tokens += self.tokens_per_step

    def take(self) -> list[Tensor]:
        records, self.pending = self.pending, []
        return records

    def tokens_per_s(self) -> float:
        """Tokens/s since the last log (the clock restarts after eval and checkpoints); starts a new window."""
        now = time.perf_counter()
        rate = self.tokens / max(now - self.since, 1e-9)
        self.tokens, self.since = 0, now
        return rate

    def restart_clock(self) -> None:
        self.since = time.perf_counter()
