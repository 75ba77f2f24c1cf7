"""The trainer: one readable loop from a `Recipe` to checkpoints, metrics and a final export.

Determinism: the model is initialised under ``run.seed``; the data order is a
permutation of the training set per epoch drawn from its own generator seeded from
``(seed, epoch)``, so the next batch is fully given by ``(epoch, position)``.
Checkpoints store that position with the model, optimizer, scheduler and RNG states,
which makes a resumed CPU run reproduce the uninterrupted one bitwise.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from bmojo_neuron import BMojoForCausalLM
from bmojo_neuron.training import checkpoint as ckpt
from bmojo_neuron.training.distributed import ParallelRun, RecordsOnly
from bmojo_neuron.training.evaluate import (
    LengthResult,
    autocast,
    evaluate,
    format_length_table,
    length_generalisation,
    plot_length,
)
from bmojo_neuron.training.optim import build_optimizer, build_scheduler

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "training.png"
LENGTH_FILE = "length_eval.json"
LENGTH_PLOT = "length_eval.png"

# Recipe keys that may differ between a checkpoint and the run resuming it.
RESUMABLE_CHANGES = ("run.name", "run.output_dir", "run.device", "train.steps", "train.log_every",
                     "train.precision", "train.activation_checkpointing", "eval.", "checkpoint.",
                     "data.cache_dir", "compare", "suite", "parallel.")  # parallel: checked on load


@dataclass
class TrainResult:
    run_dir: Path
    params: int
    step: int
    final_dir: Path | None = None  # None when stopped early (`stop_after`)
    final_eval: dict[str, float] = field(default_factory=dict)
    length_eval: list[LengthResult] = field(default_factory=list)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


# ------------------------------------------------------------------------ set-up


def resolve_device(name: str | None) -> torch.device:
    """``cpu``, ``cuda`` (``cuda:N``), ``auto``, or ``neuron`` (the XLA device; `train` hands it to neuron_loop)."""
    name = (name or "auto").lower()
    if name == "neuron":
        return torch.device("xla")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"run.device={name} but CUDA is not available here; use cpu or auto")
        return torch.device(name)
    raise ValueError(f"run.device must be cpu, cuda, auto or neuron, got {name!r}")


def check_recipe(recipe: Any) -> None:
    """Fail fast, before any data or weights are built, on settings the loop cannot run."""
    t, o = recipe.train, recipe.optim
    for key, value, minimum in (("train.steps", t.steps, 1), ("train.batch_size", t.batch_size, 1),
                                ("train.grad_accum", t.grad_accum, 1), ("train.log_every", t.log_every, 1),
                                ("eval.every", recipe.eval.every, 1), ("eval.batches", recipe.eval.batches, 1),
                                ("checkpoint.every", recipe.checkpoint.every, 1),
                                ("checkpoint.keep_last", recipe.checkpoint.keep_last, 0),
                                ("optim.warmup_steps", o.warmup_steps, 0)):
        if not isinstance(value, int) or value < minimum:
            raise ValueError(f"{key} must be an integer >= {minimum}, got {value!r}")
    if t.precision not in ("fp32", "bf16"):
        raise ValueError(f"train.precision must be 'fp32' or 'bf16', got {t.precision!r}")
    if o.grad_clip is not None and o.grad_clip < 0:
        raise ValueError(f"optim.grad_clip must be >= 0 (0 = off), got {o.grad_clip}")
    if recipe.data.kind not in ("mqar", "text"):
        raise ValueError(f"data.kind must be 'mqar' or 'text', got {recipe.data.kind!r}")
    resolve_device(recipe.run.device)


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class DataOrder:
    """Micro-batches of indices: a fresh seeded permutation per epoch, the tail dropped.

    The state is ``(epoch, position)``: the micro-batches already taken from epoch
    `epoch`. Given the same seed and state it yields the same batches, which is what
    makes resume exact.
    """

    def __init__(self, size: int, batch_size: int, seed: int, epoch: int = 0, position: int = 0) -> None:
        if size < batch_size:
            raise ValueError(f"the training set has {size} sequences, fewer than train.batch_size={batch_size}")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.per_epoch = size // batch_size
        self.epoch, self.position = epoch, position
        self._perm = self._permutation(epoch)

    def _permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.size, generator=generator)

    def next(self) -> list[int]:
        if self.position >= self.per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
            self._perm = self._permutation(self.epoch)
        start = self.position * self.batch_size
        self.position += 1
        return self._perm[start : start + self.batch_size].tolist()


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def recipe_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ and that `RESUMABLE_CHANGES` does not allow to change."""
    a, b = _flatten(saved), _flatten(current)
    keys = sorted(set(a) | set(b))
    return [k for k in keys if a.get(k) != b.get(k) and not k.startswith(RESUMABLE_CHANGES)]


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}."))
    return out


def _jsonable(recipe: Any) -> dict[str, Any]:
    """The recipe dict as JSON round-trips it (tuples become lists), for stable comparison."""
    return json.loads(json.dumps(recipe.to_dict(), default=str))


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
    if recipe.run.device == "neuron":  # Trainium: torch-xla + NxD (training/neuron_loop.py)
        from bmojo_neuron.training.neuron_loop import train_on_neuron
        return train_on_neuron(recipe, output_dir, resume, progress, stop_after, datasets)
    started = time.perf_counter()
    check_recipe(recipe)
    t, o, e, c = recipe.train, recipe.optim, recipe.eval, recipe.checkpoint
    device = resolve_device(recipe.run.device)
    if recipe.run.threads:
        torch.set_num_threads(recipe.run.threads)
    run_dir = Path(output_dir or recipe.run.output_dir)
    recipe_dict = _jsonable(recipe)
    mqar = recipe.data.kind == "mqar"
    par = ParallelRun.from_recipe(recipe, device)  # None: one process (see training/distributed.py)
    if par is not None:
        device = par.device
    main = par is None or par.is_main  # the rank that logs and writes shared files

    previous = (par.load_latest(run_dir) if par else ckpt.load_latest(run_dir)) if resume else None
    if previous is None and not resume and has_run(run_dir):
        raise ValueError(f"{run_dir} already holds a run; pass --resume to continue it, or pick another "
                         "--output-dir")
    if previous is not None and (diff := recipe_differences(previous.recipe, recipe_dict)):
        raise ValueError(f"cannot resume {previous.path}: the recipe changed in {', '.join(diff)}")

    if datasets is None:
        from bmojo_neuron.data import build_datasets

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
    state = ckpt.TrainerState()
    if previous is not None and par is not None:
        par.restore(previous, model, optimizer, scheduler)
        state = previous.state
        if main:
            print(f"resuming {run_dir} from {previous.path.name} (step {state.step})")
    elif previous is not None:
        ckpt.load_model_weights(model, previous.path)
        optimizer.load_state_dict(previous.optimizer)
        scheduler.load_state_dict(previous.scheduler)
        ckpt.set_rng_states(previous.rng)
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
        ckpt.write_text_atomic(run_dir / ckpt.RECIPE_FILE, json.dumps(recipe_dict, indent=2))

    order = DataOrder(len(train_data), t.batch_size, recipe.run.seed, state.epoch, state.position)
    logger = MetricsLogger(run_dir, state.metrics, state.step) if main else RecordsOnly(state.metrics)
    tokens_per_step = t.batch_size * t.grad_accum * len(train_data[0]["input_ids"])
    params = par.parameter_count() if par else count_parameters(model)

    def save() -> None:
        state.epoch, state.position, state.metrics = order.epoch, order.position, logger.records
        if par:
            par.save(run_dir, model, optimizer, scheduler, state, recipe_dict, c.keep_last)
        else:
            ckpt.save_checkpoint(run_dir, model, optimizer, scheduler, state, recipe_dict, c.keep_last)

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
        final_dir = par.export_final(run_dir, recipe_dict, _tokenizer_name(recipe), eval_result)
    else:
        final_dir = ckpt.export_final(run_dir, model, recipe_dict, _tokenizer_name(recipe), eval_result)
    return TrainResult(run_dir, params, state.step, final_dir, eval_result, lengths, logger.records,
                       time.perf_counter() - started)


def has_run(run_dir: Path) -> bool:
    """True when `run_dir` holds checkpoints, metrics or an export of an earlier run."""
    return bool(ckpt.list_checkpoints(run_dir)) or (run_dir / METRICS_FILE).exists() \
        or (run_dir / ckpt.FINAL).exists()


def _tokenizer_name(recipe: Any) -> str:
    return str(getattr(recipe.data, "tokenizer", None) or "byte")


# ------------------------------------------------------------------------ metrics


class Progress:
    """A live tqdm bar (loss, tokens/s, ETA) on a terminal; plain log lines when output is redirected."""

    def __init__(self, name: str, total: int, initial: int, enabled: bool = True) -> None:
        self.name, self.total, self.enabled = name, total, enabled
        self.live = enabled and sys.stderr.isatty()
        self.start_step, self.start_time = initial, time.perf_counter()
        width = {"dynamic_ncols": True} if _stderr_columns() > 0 else {"ncols": 100, "nrows": 30}  # sizeless pty
        self.bar = tqdm(total=total, initial=initial, unit="step", desc=name, disable=not self.live, **width)

    def update(self) -> None:
        self.bar.update(1)

    def show(self, step: int, loss: float, tokens_per_s: float) -> None:
        if self.live:
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
        elif self.enabled:
            per_step = (time.perf_counter() - self.start_time) / max(1, step - self.start_step)
            eta = format_seconds(per_step * (self.total - step))
            print(f"{self.name} step {step}/{self.total}  loss {loss:.4f}  {tokens_per_s:,.0f} tok/s  "
                  f"eta {eta}", flush=True)

    def write(self, text: str) -> None:
        if self.enabled:
            tqdm.write(text) if self.live else print(text, flush=True)

    def close(self) -> None:
        self.bar.close()




def _stderr_columns() -> int:
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except (OSError, ValueError):
        return 0


_TB_NOTICE_SHOWN = False


class MetricsLogger:
    """Appends records to ``metrics.jsonl`` (and TensorBoard when installed).

    On resume the file is rewritten from the checkpoint's records, dropping whatever
    the interrupted run logged after its last checkpoint.
    """

    def __init__(self, run_dir: Path, records: list[dict[str, Any]], step: int) -> None:
        self.records = list(records)
        path = run_dir / METRICS_FILE
        ckpt.write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in self.records))
        self._file = open(path, "a")
        self._tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=step or None)
        except ImportError:
            global _TB_NOTICE_SHOWN
            if not _TB_NOTICE_SHOWN:
                print("tensorboard is not installed: skipping TensorBoard logs (metrics.jsonl has them all)")
                _TB_NOTICE_SHOWN = True

    def log(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            prefix = record["type"]
            for key, value in record.items():
                if key not in ("type", "step") and isinstance(value, (int, float)):
                    self._tb.add_scalar(f"{prefix}/{key}", value, record["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def plot_training(records: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """PNG with the training / eval loss curves and, when present, eval MQAR recall."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r["type"] == "train"]
    evals = [r for r in records if r["type"] == "eval"]
    has_acc = any("eval_accuracy" in r for r in evals)
    fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(10 if has_acc else 5.5, 3.6), squeeze=False)
    ax = axes[0][0]
    ax.plot([r["step"] for r in train], [r["lm_loss"] for r in train], label="train loss")
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], marker="o", label="eval loss")
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="loss")
    ax.legend()
    if has_acc:
        acc = [r for r in evals if "eval_accuracy" in r]
        axes[0][1].plot([r["step"] for r in acc], [r["eval_accuracy"] for r in acc], marker="o",
                        color="tab:green")
        axes[0][1].set(xlabel="step", ylabel="MQAR recall", title="eval recall", ylim=(0, 1.02))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_seconds(seconds: float) -> str:
    minutes, secs = divmod(int(math.ceil(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
