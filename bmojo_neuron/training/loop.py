"""The trainer: one readable loop from a `Recipe` to checkpoints, metrics and a final export.

Determinism (`bmojo_neuron.training.data_order`): checkpoints store the data position
with the model, optimizer, scheduler and RNG states, which makes a resumed CPU run
reproduce the uninterrupted one bitwise.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from bmojo_neuron.checkpoints import layout as ckpt
from bmojo_neuron.checkpoints.export import export_final
from bmojo_neuron.checkpoints.local import load_latest, load_model_weights, save_checkpoint
from bmojo_neuron.checkpoints.state import TrainerState, set_rng_states
from bmojo_neuron.data import build_datasets
from bmojo_neuron.device import resolve_device
from bmojo_neuron.fsutil import write_text_atomic
from bmojo_neuron.evaluation import autocast, evaluate, format_length_table, length_generalisation, plot_length
from bmojo_neuron.modeling_bmojo import BMojoForCausalLM
from bmojo_neuron.recipes import resume_conflicts
from bmojo_neuron.training.data_order import DataOrder, seed_everything
from bmojo_neuron.training.distributed import ParallelRun
from bmojo_neuron.training.metrics import MetricsLogger, RecordsOnly, plot_training
from bmojo_neuron.training.optim import build_optimizer, build_scheduler
from bmojo_neuron.training.progress import Progress
from bmojo_neuron.training.result import LENGTH_FILE, LENGTH_PLOT, PLOT_FILE, TrainResult, tokenizer_name


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -------------------------------------------------------------------------- train


def train(
    recipe: Any,
    output_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    datasets: tuple[Any, Any] | None = None,
) -> TrainResult:
    """Train `recipe` into `output_dir` (default ``recipe.run.output_dir``).

    ``resume=True`` continues from the latest checkpoint there (starting fresh when
    there is none). `stop_after` halts cleanly after that many optimizer steps with a
    checkpoint and no final export, as if the job had been preempted. `datasets`
    overrides ``build_datasets(recipe)`` with ``(train, eval)``.
    """
    recipe.check()
    if recipe.run.device == "neuron":  # Trainium: torch-xla + NxD (training/neuron_loop.py)
        from bmojo_neuron.training.neuron_loop import train_on_neuron
        return train_on_neuron(recipe, output_dir, resume, progress, stop_after, datasets)
    started = time.perf_counter()
    t, o, e, c = recipe.train, recipe.optim, recipe.eval, recipe.checkpoint
    device = resolve_device(recipe.run.device)
    if recipe.run.threads:
        torch.set_num_threads(recipe.run.threads)
    run_dir = Path(output_dir or recipe.run.output_dir)
    recipe_dict = recipe.record()
    mqar = recipe.data.kind == "mqar"
    par = ParallelRun.from_recipe(recipe, device)  # None: one process (see training/distributed.py)
    if par is not None:
        device = par.device
    main = par is None or par.is_main  # the rank that logs and writes shared files

    previous = (par.load_latest(run_dir) if par else load_latest(run_dir)) if resume else None
    if previous is None and not resume and ckpt.has_run(run_dir):
        raise ValueError(f"{run_dir} already holds a run; pass --resume to continue it, or pick another "
                         "--output-dir")
    if previous is not None and (diff := resume_conflicts(previous.recipe, recipe_dict)):
        raise ValueError(f"cannot resume {previous.path}: the recipe changed in {', '.join(diff)}")

    if datasets is None:
        datasets = build_datasets(recipe)
    train_data, eval_data = datasets
    if len(eval_data) == 0:
        raise ValueError("the eval dataset is empty")

    seed_everything(recipe.run.seed)
    model = par.build_model(recipe.model_config()) if par else BMojoForCausalLM(recipe.model_config()).to(device)
    if t.activation_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    optimizer = (par.build_optimizer(model, o) if par
                 else build_optimizer(model, o.lr, o.weight_decay, o.betas, o.eps, device.type))
    scheduler = build_scheduler(optimizer, o.warmup_steps, t.steps, o.min_lr_ratio)
    state = TrainerState()
    if previous is not None and par is not None:
        par.restore(previous, model, optimizer, scheduler)
        state = previous.state
        if main:
            print(f"resuming {run_dir} from {previous.path.name} (step {state.step})")
    elif previous is not None:
        load_model_weights(model, previous.path)
        optimizer.load_state_dict(previous.optimizer)
        scheduler.load_state_dict(previous.scheduler)
        set_rng_states(previous.rng)
        state = previous.state
        print(f"resuming {run_dir} from {previous.path.name} (step {state.step})")
    elif resume:
        print(f"no checkpoint in {run_dir}: starting from scratch")
    if par:
        par.prepare_run_dir(run_dir)
    else:
        ckpt.clean_stale(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
    if main:
        write_text_atomic(run_dir / ckpt.RECIPE_FILE, json.dumps(recipe_dict, indent=2))

    order = DataOrder(len(train_data), t.batch_size, recipe.run.seed, state.epoch, state.position)
    logger = MetricsLogger(run_dir, state.metrics, state.step) if main else RecordsOnly(state.metrics)
    tokens_per_step = t.batch_size * t.grad_accum * len(train_data[0]["input_ids"])
    params = par.parameter_count() if par else count_parameters(model)

    def save() -> None:
        state.epoch, state.position, state.metrics = order.epoch, order.position, logger.records
        if par:
            par.save(run_dir, model, optimizer, scheduler, state, recipe_dict, c.keep_last)
        else:
            save_checkpoint(run_dir, model, optimizer, scheduler, state, recipe_dict, c.keep_last)

    def run_eval() -> dict[str, float]:
        result = evaluate(model, eval_data, t.batch_size, device, e.batches, t.precision, mqar,
                          pipeline=par.pipeline if par else None)
        logger.log({"type": "eval", "step": state.step, **{f"eval_{k}": v for k, v in result.items()}})
        return result

    model.train()
    bar = Progress(recipe.run.name, t.steps, state.step, enabled=progress and main)
    pending: list[torch.Tensor] = []  # per-step [loss, lm_loss, aux_loss, grad_norm], read at log time
    interval_start, interval_tokens = time.perf_counter(), 0
    eval_result: dict[str, float] = {}
    while state.step < t.steps:
        # one optimizer update = grad_accum micro-batches
        step_loss = torch.zeros(3, device=device)
        for _ in range(t.grad_accum):
            indices = order.next()
            batch = train_data[par.local_indices(indices) if par else indices]
            input_ids = batch["input_ids"].to(device, non_blocking=True)
            labels = batch["labels"].to(device, non_blocking=True)
            if par and par.pipeline:  # pp > 1: a GPipe schedule runs forward and backward of this batch
                step_loss += par.pipeline.train_step(input_ids, labels, t.grad_accum)
                continue
            with autocast(device, t.precision):
                out = model(input_ids, labels=labels)
            (out.loss / t.grad_accum).backward()
            aux = out.aux_loss.detach() if out.aux_loss is not None else torch.zeros((), device=device)
            step_loss += torch.stack([out.loss.detach(), out.lm_loss.detach(), aux]) / t.grad_accum
        if par:
            par.reduce_grads(model)  # sequence-parallel norms over tp, mean over data ranks
            step_loss = par.average(step_loss)
        if o.grad_clip:
            grad_norm = (par.clip_grad_norm(model, o.grad_clip) if par
                         else torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip))
        else:
            grad_norm = torch.zeros((), device=device)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.tokens += tokens_per_step
        interval_tokens += tokens_per_step
        pending.append(torch.cat([step_loss, grad_norm.detach().float().reshape(1)]))
        bar.update()

        last = state.step == t.steps
        stop = stop_after is not None and state.step >= stop_after
        save_now = last or stop or state.step % c.every == 0
        eval_now = last or state.step % e.every == 0
        if state.step % t.log_every == 0 or save_now:
            loss, lm, aux, gnorm = torch.stack(pending).mean(0).tolist()
            tps = interval_tokens / max(time.perf_counter() - interval_start, 1e-9)
            logger.log({"type": "train", "step": state.step, "loss": loss, "lm_loss": lm, "aux_loss": aux,
                        "grad_norm": gnorm, "lr": scheduler.get_last_lr()[0], "tokens": state.tokens,
                        "tokens_per_s": tps})
            bar.show(state.step, loss, tps)
            pending, interval_start, interval_tokens = [], time.perf_counter(), 0
            if not math.isfinite(loss):
                raise FloatingPointError(f"training loss is {loss} at step {state.step}; lower optim.lr or "
                                         f"resume from an earlier checkpoint in {run_dir}")
        if eval_now:
            eval_result = run_eval()
            bar.write(f"step {state.step}: " + ", ".join(f"eval {k} {v:.4g}" for k, v in eval_result.items()
                                                         if k != "tokens"))
        if save_now:
            save()
        if eval_now or save_now:
            interval_start = time.perf_counter()  # keep eval and checkpoint time out of tokens/s
        if stop and not last:
            bar.close()
            logger.close()
            return TrainResult(run_dir, params, state.step, metrics=logger.records,
                               seconds=time.perf_counter() - started)
    bar.close()

    # finished (or resumed a finished run): final eval, plots and the export
    if not eval_result:  # resumed a run that had already finished: reuse its last eval
        done = [r for r in logger.records if r["type"] == "eval" and r["step"] == state.step]
        eval_result = ({k[5:]: v for k, v in done[-1].items() if k.startswith("eval_")} if done
                       else run_eval())
    lengths: list[LengthResult] = []
    multipliers = list(e.length_multipliers or [])
    if any(int(m) != 1 for m in multipliers):
        lengths = length_generalisation(model, recipe, eval_data, multipliers, t.batch_size, device,
                                        e.batches, t.precision, pipeline=par.pipeline if par else None)
        if main:
            (run_dir / LENGTH_FILE).write_text(json.dumps([r.__dict__ for r in lengths], indent=2))
            plot_length(lengths, run_dir / LENGTH_PLOT, title=recipe.run.name)
            print(format_length_table(lengths, title=f"{recipe.run.name}: length generalisation"))
    logger.close()
    if main:
        plot_training(logger.records, run_dir / PLOT_FILE, title=recipe.run.name)
    if par:
        final_dir = par.export_final(run_dir, recipe_dict, tokenizer_name(recipe), eval_result)
    else:
        final_dir = export_final(run_dir, model, recipe_dict, tokenizer_name(recipe), eval_result)
    return TrainResult(run_dir, params, state.step, final_dir, eval_result, lengths, logger.records,
                       time.perf_counter() - started)
