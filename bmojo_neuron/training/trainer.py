"""The training loop: a `Recipe` in, checkpoints, metrics, plots and a final export out, on any backend.

Read `Trainer.run` top to bottom: set-up (resume, data, model, optimizer), the step
loop (one optimizer update per step, logging, eval and checkpoint cadence), and the
finish (final eval, length generalisation, plots, ``final/``). How a step runs on
this machine (one process, torchrun ranks, NeuronCores) is the backend's
(`bmojo_neuron.training.backend`); what is on disk is `bmojo_neuron.checkpoints`'.

Determinism: the model is initialised under ``run.seed`` and the batches follow
`data_order.DataOrder`, so checkpoints (model, optimizer, scheduler, RNG states and
the data position) make a resumed run reproduce the uninterrupted one; on CPU bitwise.

Stopping early: `stop_after` steps, or `Trainer.request_stop()` (what SIGTERM and SIGINT
call, `signals.stop_on_signals`) ends the run at the next step boundary with a
checkpoint and no export; every process of a parallel run stops at the same step (the
backend's `finish_step` says which; on Neuron it is one step later). After
the last step (checkpointed) a stop skips the rest of the finish before the next length
evaluation or the export; once the export begins the run ends complete.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bmojo_neuron.checkpoints.layout import (FINAL, RECIPE_FILE, abandoned_attempt, clean_stale, has_run,
                                             list_checkpoints, unrelated_folder_problem)
from bmojo_neuron.checkpoints.state import Checkpoint, TrainerState, resume_refusal
from bmojo_neuron.data import BuildProgress, build_datasets, library_progress_bars
from bmojo_neuron.evaluation import LengthResult, format_length_table, plot_length
from bmojo_neuron.fsutil import write_text_atomic
from bmojo_neuron.priming.distill import freeze_shared, is_new_parameter

from .backend import Backend, open_backend
from .data_order import position_after
from .metrics import TENSORBOARD_DIR, MetricsLogger, RecordsOnly, plot_training
from .objective import LM_METRICS
from .optim import build_scheduler, describe_lr_multipliers
from .progress import Progress, run_prefix, shows_live_bar
from .signals import signal_name, stop_on_signals

PLOT_FILE = "training.png"
LENGTH_FILE = "length_eval.json"
LENGTH_PLOT = "length_eval.png"
# What a signal does once the last step is checkpointed (`stop_on_signals` prints it).
END_NOTICE = "the last step is checkpointed; skipping the rest of the finish (length evaluation, export)"
EXPORT_NOTICE = "writing final/ first: the run then ends complete, status 0"


@dataclass
class TrainResult:
    run_dir: Path
    params: int
    step: int
    final_dir: Path | None = None  # None when stopped early
    final_eval: dict[str, float] = field(default_factory=dict)
    length_eval: list[LengthResult] = field(default_factory=list)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0  # wall time of the training, every attempt of a resumed run included
    stop_signal: int | None = None  # the signal that stopped the run early, if one did


def train(
    recipe: Any,
    output_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool | str = True,
    stop_after: int | None = None,
    datasets: tuple[Any, Any] | None = None,
) -> TrainResult:
    """Train `recipe` into `output_dir` (default ``recipe.run.output_dir``; ``~`` is the home folder).

    A folder of other files that holds no run is refused with `bmojo-neuron train`'s error
    (`checkpoints.layout.unrelated_folder_problem`) before anything is built or written.
    ``resume=True`` continues from the latest checkpoint there (starting fresh when
    there is none). `stop_after` halts cleanly after that many optimizer steps with a
    checkpoint and no final export, as if the job had been preempted. `datasets`
    overrides ``build_datasets(recipe)`` with ``(train, eval)``. ``progress="lines"``: plain log lines even on a
    terminal (no live bar); ``"shared"``: the same with every line prefixed by the run's name (runs sharing
    one output).
    """
    started = time.perf_counter()
    recipe.check()  # before any process group, data or weights
    run_dir = Path(output_dir or recipe.run.output_dir).expanduser()
    problem = unrelated_folder_problem(run_dir, [run_dir], "output_dir" if output_dir else "run.output_dir",
                                       recipe.run.name)
    if problem:
        raise ValueError(problem)
    backend = open_backend(recipe)
    try:
        trainer = Trainer(recipe, backend, run_dir, progress)
        # the data libraries' bars only beside this run's live bar: not with plain lines (--no-progress, output
        # redirected), nor on other ranks
        with stop_on_signals(trainer, announce=backend.is_main, prefix=trainer.prefix), \
                library_progress_bars(shows_live_bar(trainer.progress), datasets_too=recipe.data.kind == "text"):
            return trainer.run(resume, stop_after, datasets, started)
    finally:
        backend.close()


# An MQAR eval's "accuracy" is the share of queries answered right: the summary table, the
# docs and `inspect` call it recall, so the progress line does too (metrics.jsonl keeps
# `eval_accuracy`, the key TensorBoard and saved runs already use).
PRINTED_NAMES = {"accuracy": "recall"}


class Trainer:
    """One run of a recipe on one backend (one process of it)."""

    def __init__(self, recipe: Any, backend: Backend, run_dir: Path, progress: bool | str = True) -> None:
        self.recipe, self.backend, self.run_dir = recipe, backend, run_dir
        self.recipe_dict = recipe.record()
        self.progress = progress if backend.is_main else False
        self.prefix = run_prefix(recipe.run.name, progress)  # starts each line `say` prints
        self.stop_requested = False
        self.stop_signal: int | None = None
        self.stop_notice: str | None = None  # what a signal does now, if not the step loop's stop

    def request_stop(self) -> None:
        """End the run at the next step boundary: checkpoint, no export (safe from a signal handler)."""
        self.stop_requested = True

    def run(self, resume: bool = False, stop_after: int | None = None, datasets: tuple[Any, Any] | None = None,
            started: float | None = None) -> TrainResult:
        started = time.perf_counter() if started is None else started
        r, be = self.recipe, self.backend
        t, o, e, c = r.train, r.optim, r.eval, r.checkpoint

        # ---------------------------------------------------------------- set-up
        previous = self.previous_checkpoint(resume)
        train_data, eval_data = datasets if datasets is not None else self.build_data()
        if len(eval_data) == 0:
            raise ValueError("the eval dataset is empty")
        be.seed(r.run.seed)
        model = be.build_model(previous)
        if r.distill is not None:  # only the paths priming added learn; the optimizer sees only them
            freeze_shared(model, r.model_config())
            pattern = r.model_config().layer_pattern  # counted over every shard, as the header's total is
            trainable = be.parameter_count(model, lambda name: is_new_parameter(name, pattern))
            self.say(f"distilling {trainable:,} parameters (SSMs, fading projections, innovation predictors); "
                     "the source's weights are frozen and are the teacher")
        optimizer = be.build_optimizer(model)
        if o.lr_multipliers:
            self.say(describe_lr_multipliers(optimizer))
        scheduler = build_scheduler(optimizer, o.warmup_steps, t.steps, o.min_lr_ratio)
        state = TrainerState()
        if previous is not None:
            be.restore(previous, model, optimizer, scheduler)
            state = previous.state
            self.say(f"resuming {self.run_dir} from {previous.path.name} (step {state.step})")
        elif resume:
            self.say(f"no checkpoint in {self.run_dir}: starting from scratch")
        earlier = state.seconds  # the attempts before this one, up to the checkpoint it resumes
        elapsed = lambda: earlier + time.perf_counter() - started  # noqa: E731
        self.prepare_run_dir(fresh=previous is None)
        logger = MetricsLogger(self.run_dir, state.metrics, state.step) if be.is_main else RecordsOnly(state.metrics)
        bar = Progress(r.run.name, t.steps, state.step, enabled=self.progress)
        params = be.parameter_count(model)
        window = LogWindow(t.batch_size * t.grad_accum * len(train_data[0]["input_ids"]), state.log_window)

        names = getattr(be.objective, "metric_names", LM_METRICS)  # loss first

        def log_train(rows: Tensor, step: int, lr: float, tokens: int, between: bool) -> None:
            """Log the mean of the window's rows; `between` log steps (a stop), the record is provisional."""
            *parts, grad_norm = window.mean(rows, carry=between)
            loss, tps = parts[0], window.tokens_per_s()
            logger.log({"type": "train", "step": step, **dict(zip(names, parts)),
                        "grad_norm": grad_norm, "lr": lr, "tokens": tokens, "tokens_per_s": tps},
                       provisional=between)
            bar.show(step, loss, tps)
            if not math.isfinite(loss):
                raise FloatingPointError(f"training loss is {loss} at step {step}; {self.retry_advice()}")

        def run_eval() -> dict[str, float]:
            result = be.evaluate(model, eval_data)
            logger.log({"type": "eval", "step": state.step, **{f"eval_{k}": v for k, v in result.items()}})
            bar.write(f"step {state.step}: " + ", ".join(f"eval {PRINTED_NAMES.get(k, k)} {v:.4g}"
                                                         for k, v in result.items() if k != "tokens"))
            return result

        # ---------------------------------------------------------------- the loop
        batches = be.batches(train_data, state.epoch, state.position, t.steps - state.step)
        start_step, start_epoch, start_position = state.step, state.epoch, state.position
        per_epoch = len(train_data) // t.batch_size
        eval_result: dict[str, float] = {}
        while state.step < t.steps:
            record = be.step(model, optimizer, next(batches))  # forward/backward of the step's micro-batches, update
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.tokens += window.tokens_per_step
            state.epoch, state.position = position_after(start_epoch, start_position, per_epoch,
                                                         (state.step - start_step) * t.grad_accum)
            window.add(record)

            last = state.step == t.steps
            stop_after_reached = stop_after is not None and state.step >= stop_after  # every process at once
            checkpoint_step = last or state.step % c.every == 0
            save_now = checkpoint_step or stop_after_reached
            eval_now = last or state.step % e.every == 0
            log_step = state.step % t.log_every == 0 or checkpoint_step  # a record here, interrupted or not
            log_now = log_step or stop_after_reached
            read = (lambda rows, step=state.step, lr=scheduler.get_last_lr()[0], tokens=state.tokens:
                    log_train(rows, step, lr, tokens, between=not log_step))
            # On XLA the losses are read after the graph ran. A stop asked on any process stops every one after
            # the same step (on Neuron one step after the request reached the graphs); its losses are logged.
            stop = be.finish_step(window.pending, read, log_now, self.stop_requested) or stop_after_reached
            if log_now or stop:
                window.clear()
            save_now = save_now or stop
            bar.update()
            if eval_now:
                eval_result = run_eval()
            if save_now:
                state.metrics, state.log_window, state.seconds = logger.lasting(), window.carried, elapsed()
                be.save(self.run_dir, model, optimizer, scheduler, state, self.recipe_dict)
            if eval_now or save_now:
                window.restart_clock()  # keep eval and checkpoint time out of tokens/s
            if stop and not last:
                bar.close()
                logger.close()
                return TrainResult(self.run_dir, params, state.step, metrics=logger.records,
                                   seconds=elapsed(), stop_signal=self.stop_signal)
        bar.close()

        # ---------------------------------------------------------------- finish: final eval, plots, export
        # The last step is checkpointed: a signal from here on skips what is left of the finish
        # (`stop_before`), and --resume of the run does it again.
        self.stop_notice = END_NOTICE

        def stopped(what: str) -> TrainResult:
            self.say(f"{signal_name(self.stop_signal)} came after the last step: skipped {what}; --resume does it")
            logger.close()
            return TrainResult(self.run_dir, params, state.step, metrics=logger.records,
                               seconds=elapsed(), stop_signal=self.stop_signal)

        if not eval_result:  # resumed a run that had already finished: reuse its last eval
            done = [x for x in logger.records if x["type"] == "eval" and x["step"] == state.step]
            eval_result = {k[5:]: v for k, v in done[-1].items() if k.startswith("eval_")} if done else run_eval()
        lengths: list[LengthResult] = []
        multipliers = [int(m) for m in (e.length_multipliers or [])]
        if any(m != 1 for m in multipliers):
            # Every length runs the eval batches again, longer sequences each time: tens of seconds on a CPU
            # before the table prints, so say what is being done first.
            self.say(f"length generalisation: evaluating at {', '.join(f'{m}x' for m in multipliers)} the "
                     f"training length")
            for index, m in enumerate(multipliers):  # one length at a time: a signal waits for one length only
                if self.stop_before():
                    left = ", ".join(f"x{x}" for x in multipliers[index:])
                    return stopped(f"the length evaluation at {left} and the export ({FINAL}/)")
                lengths += be.length_eval(model, eval_data, [m])
            if be.is_main:
                (self.run_dir / LENGTH_FILE).write_text(json.dumps([x.__dict__ for x in lengths], indent=2))
                plot_length(lengths, self.run_dir / LENGTH_PLOT, title=r.run.name)
                print(format_length_table(lengths, title=f"{r.run.name}: length generalisation"))
        if self.stop_before():
            return stopped(f"the export ({FINAL}/)")
        # From here a signal stops nothing: the plot and ``final/`` are written and the run ends complete.
        self.stop_notice = EXPORT_NOTICE
        logger.close()
        if be.is_main:
            plot_training(logger.records, self.run_dir / PLOT_FILE, title=r.run.name)
        final_dir = be.export(self.run_dir, model, self.recipe_dict, tokenizer_name(r), eval_result)
        return TrainResult(self.run_dir, params, state.step, final_dir, eval_result, lengths, logger.records,
                           elapsed())

    def stop_before(self) -> bool:
        """Whether a stop was asked for on any process (every rank calls it at the same points of the finish, and
        all get the same answer)."""
        return self.backend.agree_to_stop(self.stop_requested)

    # ------------------------------------------------------------------ set-up helpers

    def previous_checkpoint(self, resume: bool) -> Checkpoint | None:
        """The checkpoint to resume (None: start fresh); refuses a used run directory without `resume` and a
        checkpoint whose recipe differs in a key that may not change."""
        previous = self.backend.load_latest(self.run_dir) if resume else None
        if previous is None and not resume and has_run(self.run_dir):
            raise ValueError(f"{self.run_dir} already holds a run; pass --resume to continue it, or pick another "
                             "--output-dir")
        if previous is not None and (refusal := resume_refusal(Path(previous.path), previous.recipe,
                                                               self.recipe_dict)):
            raise ValueError(refusal)
        if previous is None and abandoned_attempt(self.run_dir):
            self.say(f"{self.run_dir} holds only the logs of an earlier attempt that ended before its first "
                     "checkpoint: starting afresh, replacing them")
        self.backend.barrier("run-dir-checked")  # every rank looked before rank 0 writes into the run dir
        return previous

    def build_data(self) -> tuple[Any, Any]:
        """``(train, eval)`` datasets, built by the main process first (it fills the tokenized-data cache)."""
        be = self.backend
        if not be.is_main:
            be.barrier("data-built")
        # Without a live bar (a log, --no-progress) the libraries' bars are off: a cache build says its stages in
        # plain lines instead, as `data prepare` does.
        progress = None if shows_live_bar(self.progress) or not be.is_main else BuildProgress(self.say)
        datasets = build_datasets(self.recipe, progress)
        if be.is_main:
            be.barrier("data-built")
        return datasets

    def retry_advice(self) -> str:
        """What to do after the run diverged: a changed optim.lr cannot resume this run's checkpoints."""
        if list_checkpoints(self.run_dir):
            return (f"lower optim.lr and train into a new --output-dir ({self.run_dir} holds checkpoints, which a "
                    "changed optim.lr cannot resume)")
        return f"lower optim.lr and train again ({self.run_dir} has no checkpoint yet: the retry starts afresh)"

    def prepare_run_dir(self, fresh: bool) -> None:
        """Rank 0 removes a crashed run's temp files (and, starting `fresh`, an abandoned attempt's TensorBoard
        events, which would otherwise show beside the new ones) and writes ``recipe.json``; the others wait."""
        if self.backend.is_main:
            clean_stale(self.run_dir)
            if fresh:
                shutil.rmtree(self.run_dir / TENSORBOARD_DIR, ignore_errors=True)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.run_dir / RECIPE_FILE, json.dumps(self.recipe_dict, indent=2))
        self.backend.barrier("run-dir")

    def say(self, text: str) -> None:
        if self.backend.is_main:
            print(self.prefix + text, flush=True)


def tokenizer_name(recipe: Any) -> str:
    """The tokenizer an export records: the text data's, or the byte tokenizer (MQAR)."""
    return str(getattr(recipe.data, "tokenizer", None) or "byte")


class LogWindow:
    """The per-step metric rows a train record averages, and the tokens/s clock.

    A run stopped between log steps logs the mean of the rows so far and carries them into
    its checkpoint (`TrainerState.log_window`); the resumed run starts its window with them,
    so its next record averages the same steps, in the same order, as the uninterrupted
    run's (bitwise on CPU). Tokens/s is timing and restarts with each process.
    """

    def __init__(self, tokens_per_step: int, carried: list[list[float]] | None = None) -> None:
        self.tokens_per_step = tokens_per_step
        self.pending: list[Tensor] = []  # this window's device rows, not read yet
        self.carried: list[list[float]] = list(carried or [])  # read at a stop between log steps
        self.tokens = 0  # since the last log
        self.since = time.perf_counter()

    def mean(self, rows: Tensor, carry: bool) -> list[float]:
        """The mean of the window: the carried rows, then `rows` (read on the host); `carry` keeps them all for
        the checkpoint of a stop between log steps, otherwise the next window starts empty."""
        if self.carried:
            rows = torch.cat([torch.tensor(self.carried, dtype=rows.dtype), rows])
        self.carried = rows.tolist() if carry else []
        return rows.mean(0).tolist()

    def add(self, record: Tensor) -> None:
        self.pending.append(record)
        self.tokens += self.tokens_per_step

    def clear(self) -> None:
        """Drop the records the backend was given to read."""
        self.pending = []

    def tokens_per_s(self) -> float:
        """Tokens/s since the last log (the clock restarts after eval and checkpoints); starts a new window."""
        now = time.perf_counter()
        rate = self.tokens / max(now - self.since, 1e-9)
        self.tokens, self.since = 0, now
        return rate

    def restart_clock(self) -> None:
        self.since = time.perf_counter()
