"""Which model folder a user's path stands for, and why a path that stands for none is refused.

A run directory stands for its ``final/`` export, else its latest checkpoint; a checkpoint or an export stands
for itself. Everything here reads folder listings, file names and sizes only, never a tensor, and imports neither torch
nor transformers: `eval`, `inspect`, `generate`, `export-transformer`, `checkpoint` and `train` (for
``init.weights``) call it first, so a file given for a folder, a folder of runs or a run without checkpoints is
answered in one line before seconds of start-up. The loaders (`inference`, `convert`) and the preflight call
the same functions, so a library caller hears the same.
"""

from __future__ import annotations

from pathlib import Path

from .layout import abandoned_attempt, has_run, is_complete, is_sharded, latest_checkpoint
from .manifest import verify_manifest
from .names import CONFIG_FILE, FINAL, PARALLEL_FILE, RUN_INFO_FILE, STATE_FILE, SUMMARY_FILE

SHOWN_RUNS = 8  # runs named in the refusal of a folder of runs; the rest are counted


def resolve_model_dir(path: str | Path, command: str | None = None) -> Path:
    """An export dir, a checkpoint dir, or a run dir (its ``final``, else its latest checkpoint).

    A folder of runs (a suite's or comparison's output dir, one run per model) is refused naming them; `command`
    (``"eval"``, ...) is the subcommand the message tells to run on one of them.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if not path.is_dir():  # e.g. the model.safetensors of an export
        holder = path.parent if _model_in(path.parent) is not None else None
        raise FileNotFoundError(f"{path} is a file, not a model's folder: give " + (
            f"the folder that holds it, {holder}" if holder is not None else
            "a run directory, a checkpoint (step-XXXXXXX) or a final export"))
    model = _model_in(path)
    if model is not None:
        return model
    if abandoned_attempt(path):  # a run that failed or was stopped before its first checkpoint
        raise FileNotFoundError(f"{path} holds no checkpoint yet: its run ended before its first checkpoint (only "
                                "its logs are there); train it again with the same --output-dir, which starts "
                                "afresh there and replaces these logs")
    runs = [entry for entry in sorted(path.iterdir()) if entry.is_dir() and _model_in(entry) is not None]
    if runs:
        raise FileNotFoundError(several_runs_message(path, runs, command))
    raise FileNotFoundError(f"{path} is neither a run directory, a checkpoint (step-XXXXXXX) nor a final export")


def resolve_sized_model_dir(path: str | Path, command: str | None = None) -> Path:
    """`resolve_model_dir`, whose files must also have the sizes its manifest lists (`manifest.verify_manifest`
    without the hashes, which the loader computes as it reads them): a missing or truncated weights file is one
    line from a command before torch loads, not after."""
    folder = resolve_model_dir(path, command)
    verify_manifest(folder, hashes=False)
    return folder


def _model_in(path: Path) -> Path | None:
    """The model folder `path` stands for (itself, its ``final``, its latest checkpoint), or None."""
    if (path / RUN_INFO_FILE).is_file() or is_complete(path):
        return path
    if (path / FINAL / RUN_INFO_FILE).is_file():
        return path / FINAL
    latest = latest_checkpoint(path)
    if latest is not None:
        return latest
    if (path / CONFIG_FILE).is_file():  # a plain save_pretrained export
        return path
    return None


def several_runs_message(folder: Path, runs: list[Path], command: str | None) -> str:
    """Why `folder`, which holds `runs` (a suite's output dir), is not one model, and what to give instead."""
    shown = ", ".join(run.name for run in runs[:SHOWN_RUNS]) + (f" and {len(runs) - SHOWN_RUNS} more"
                                                                if len(runs) > SHOWN_RUNS else "")
    example = f"bmojo-neuron {command} {runs[0]}" if command else str(runs[0])
    summary = folder / SUMMARY_FILE
    compared = f"; {summary} compares them" if summary.is_file() else ""
    return (f"{folder} holds {len(runs)} run{'s' if len(runs) > 1 else ''} ({shown}), not one model: give one "
            f"run's folder, e.g. {example}{compared}")


def initial_weights_dir(path: str | Path) -> Path:
    """The model folder behind ``init.weights`` (`resolve_model_dir`); FileNotFoundError naming the key when
    there is none, so the message says which setting to fix."""
    try:
        return resolve_model_dir(Path(path).expanduser())
    except FileNotFoundError as err:
        raise FileNotFoundError(f"recipe key init.weights: {err}") from None


def resolve_sharded(path: str | Path) -> Path:
    """What ``checkpoint consolidate`` reads: a sharded ``step-XXXXXXX`` dir, or a run dir (its latest
    checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if not is_sharded(path):
        latest = path if is_complete(path) else latest_checkpoint(path)
        if latest is not None and not is_sharded(latest):
            raise ValueError(one_process_refusal(path, "consolidate joins the files of a sharded one"))
        if latest is None:
            raise FileNotFoundError(f"{path} is neither a sharded checkpoint (with {PARALLEL_FILE}) nor a run "
                                    "directory whose latest checkpoint is one")
        path = latest
    if not is_complete(path):
        raise FileNotFoundError(f"{path} is incomplete (no {STATE_FILE})")
    return path


def check_shard_request(source: str | Path, run_dir: str | Path, tp: int, pp: int) -> None:
    """What ``checkpoint shard`` refuses before it reads a weight, in this order: degrees below 1, a `source`
    that is not one full copy of a model (a ``save_pretrained`` folder: the error says what it is instead), and
    a `run_dir` that holds a run already."""
    source, run_dir = Path(source), Path(run_dir)
    if tp < 1 or pp < 1:
        raise ValueError(f"--tp and --pp must be >= 1, got --tp {tp} --pp {pp}")
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist")
    if has_run(source) or (source / STATE_FILE).is_file():
        # A checkpoint's files are shards or lack the consolidated training state: read as an export they
        # would give a fresh step-0 optimizer, or no model at all.
        checkpoint = source if is_complete(source) else latest_checkpoint(source)
        if checkpoint is not None and not is_sharded(checkpoint):
            raise ValueError(one_process_refusal(source, "shard reads a consolidated copy"))
        raise ValueError(f"{source} is a training run or checkpoint, not one full copy of a model: convert it with "
                         f"`bmojo-neuron checkpoint consolidate {source} FULL` first, then shard FULL")
    if not (source / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{source} has no {CONFIG_FILE}: not a save_pretrained directory")
    if has_run(run_dir):
        raise ValueError(f"{run_dir} already holds a run; pick a new --output-dir")


def one_process_refusal(path: Path, why: str) -> str:
    """Why a one-process checkpoint (or a run of them) at `path` is not converted, and how to train its weights at
    other degrees instead: its ``optimizer.pt`` keeps AdamW's states by parameter index, not by name, so only
    the optimizer it came from reads them, and a run at other degrees starts from the weights alone."""
    subject = "a one-process checkpoint" if is_complete(path) else "a run of one-process checkpoints"
    return (f"{path} is {subject}: its weights are whole already and its optimizer state (by parameter index) "
            f"is not converted ({why}); to train it at other parallel degrees, start a new run from its weights: "
            f"bmojo-neuron train RECIPE init.weights={path} parallel.tp=N (step 0, a fresh optimizer)")
