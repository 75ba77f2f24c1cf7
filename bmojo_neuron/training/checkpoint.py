"""Crash-safe checkpoints of a training run.

Layout of a run directory::

    step-0000100/          one complete checkpoint (see `save_checkpoint`)
    step-0000200/
    latest                 text file naming the newest complete checkpoint ("step-0000200")
    final/                 `save_pretrained` export of the finished model

Every checkpoint is written into a hidden temporary directory (``.tmp-...``), each
file fsynced, then published with one `os.replace`; `latest` is rewritten the same
way (temp file + rename). A kill at any moment therefore leaves either the old or the
new state, never a half-written one, and `load_latest` never looks at temp dirs.
Old checkpoints are pruned only after the new one is published, and are first renamed
to ``.trash-...`` so a half-deleted directory is never mistaken for a checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from safetensors.torch import load_model, save_model
from torch import nn

from bmojo_neuron.fsutil import fsync_dir, publish_dir, write_text_atomic  # noqa: F401 (re-exported)

LATEST = "latest"
FINAL = "final"
STEP_PATTERN = re.compile(r"^step-(\d{7,})$")
MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optimizer.pt"
STATE_FILE = "trainer_state.json"  # written last: its presence marks a complete checkpoint
RECIPE_FILE = "recipe.json"
CONFIG_FILE = "config.json"
RUN_INFO_FILE = "bmojo_run.json"
REQUIRED_FILES = (MODEL_FILE, OPTIM_FILE, RECIPE_FILE, CONFIG_FILE, STATE_FILE)
PARALLEL_FILE = "parallel.json"  # marks a sharded checkpoint of a parallel run (bmojo_neuron.parallel.checkpoint_format)
SHARDED_REQUIRED_FILES = (PARALLEL_FILE, RECIPE_FILE, CONFIG_FILE, STATE_FILE)


@dataclass
class TrainerState:
    """Where training stands: enough to continue with the very same next batch."""

    step: int = 0  # optimizer updates done
    epoch: int = 0  # pass over the training set the next batch comes from
    position: int = 0  # micro-batches already taken from that epoch's permutation
    tokens: int = 0  # training tokens consumed
    metrics: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl records so far


def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


# ------------------------------------------------------------------ filesystem helpers


def publish_step(tmp: Path, run_dir: Path, name: str, recipe: dict[str, Any], config: Any, state: Any,
                 keep_last: int) -> Path:
    """The shared end of every save: recipe, config and trainer state into `tmp` (the state last: it marks
    the step complete), `tmp` published as ``run_dir/name``, ``latest`` moved, old steps pruned.
    `tmp` is removed if anything fails before it is published."""
    try:
        (tmp / RECIPE_FILE).write_text(json.dumps(recipe, indent=2, default=str))
        config.to_json_file(str(tmp / CONFIG_FILE))
        (tmp / STATE_FILE).write_text(json.dumps(state.__dict__, indent=1))
        publish_dir(tmp, run_dir / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_text_atomic(run_dir / LATEST, name + "\n")
    if keep_last > 0:
        prune(run_dir, keep_last)
    return run_dir / name


def publish_sharded(tmp: Path, run_dir: Path, name: str, meta: dict[str, Any], recipe: dict[str, Any],
                    config: Any, state: Any, keep_last: int) -> None:
    """Rank 0's end of a sharded save: ``parallel.json``, then `publish_step`."""
    from bmojo_neuron.parallel.checkpoint_format import PARALLEL_FILE

    try:
        (tmp / PARALLEL_FILE).write_text(json.dumps(meta, indent=1))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_step(tmp, run_dir, name, recipe, config, state, keep_last)


def new_tmp_dir(run_dir: Path, label: str) -> Path:
    path = run_dir / f".tmp-{label}-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    return path


def clean_stale(run_dir: Path) -> None:
    """Delete temp / trash leftovers of a crashed run (never a published checkpoint)."""
    if not run_dir.is_dir():
        return
    for entry in run_dir.iterdir():
        if entry.name.startswith((".tmp-", ".trash-")):
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


# ------------------------------------------------------------------------- RNG states


def rng_states() -> dict[str, Any]:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# ------------------------------------------------------------------------ checkpoints


def save_checkpoint(
    run_dir: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: TrainerState,
    recipe: dict[str, Any],
    keep_last: int = 0,
) -> Path:
    """Write checkpoint ``step-XXXXXXX``, point `latest` at it, then prune to `keep_last`.

    `keep_last` <= 0 keeps every checkpoint. Returns the published directory.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    name = step_dir_name(state.step)
    tmp = new_tmp_dir(run_dir, name)
    try:
        save_model(model, str(tmp / MODEL_FILE))
        torch.save(
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_states()},
            tmp / OPTIM_FILE,
        )
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return publish_step(tmp, run_dir, name, recipe, model.config, state, keep_last)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete published checkpoints, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for entry in run_dir.iterdir():
        match = STEP_PATTERN.match(entry.name)
        if match and entry.is_dir() and is_complete(entry):
            found.append((int(match.group(1)), entry))
    return [path for _, path in sorted(found)]


def is_complete(path: Path) -> bool:
    """A one-process or sharded checkpoint whose trainer state (written last) is on disk."""
    return any(all((path / f).is_file() for f in files) for files in (REQUIRED_FILES, SHARDED_REQUIRED_FILES))


def prune(run_dir: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints (never the one `latest` names)."""
    latest = latest_checkpoint(run_dir)
    for path in list_checkpoints(run_dir)[:-keep_last]:
        if latest is not None and path.resolve() == latest.resolve():
            continue
        trash = path.with_name(f".trash-{path.name}-{uuid.uuid4().hex[:8]}")
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
    fsync_dir(run_dir)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint `latest` names; if that file is missing or stale, the newest complete one."""
    run_dir = Path(run_dir)
    pointer = run_dir / LATEST
    if pointer.is_file():
        name = pointer.read_text().strip()
        if STEP_PATTERN.match(name) and is_complete(run_dir / name):
            return run_dir / name
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


@dataclass
class Checkpoint:
    """A checkpoint read back from disk (the model weights are loaded separately)."""

    path: Path
    state: TrainerState
    recipe: dict[str, Any]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, Any]


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read trainer state, recipe and optimizer/scheduler/RNG states of one checkpoint."""
    path = Path(path)
    if (path / PARALLEL_FILE).is_file():
        parallel = json.loads((path / PARALLEL_FILE).read_text())
        raise ValueError(f"{path} is a sharded checkpoint (tp={parallel.get('tp')}, pp={parallel.get('pp')}): "
                         "resume it under torchrun with the same parallel.tp / parallel.pp, or convert it with "
                         "`bmojo-neuron checkpoint consolidate` and `bmojo-neuron checkpoint shard --tp 1 --pp 1`")
    if not is_complete(path):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (needs {', '.join(REQUIRED_FILES)})")
    state = TrainerState(**json.loads((path / STATE_FILE).read_text()))
    blob = torch.load(path / OPTIM_FILE, map_location="cpu", weights_only=False)
    recipe = json.loads((path / RECIPE_FILE).read_text())
    return Checkpoint(path, state, recipe, blob["optimizer"], blob["scheduler"], blob["rng"])


def load_latest(run_dir: str | Path) -> Checkpoint | None:
    """The newest complete checkpoint of `run_dir`, or None; temp and partial dirs are ignored."""
    path = latest_checkpoint(run_dir)
    return None if path is None else load_checkpoint(path)


def load_model_weights(model: nn.Module, path: str | Path) -> None:
    """Load a checkpoint's ``model.safetensors`` into `model` (strict)."""
    load_model(model, str(Path(path) / MODEL_FILE), strict=True)


# --------------------------------------------------------------------------- export


def export_final(
    run_dir: str | Path, model: nn.Module, recipe: dict[str, Any], tokenizer: str, metrics: dict[str, Any]
) -> Path:
    """Atomically write ``<run_dir>/final``: `save_pretrained` + the run info (tokenizer, recipe, metrics)."""
    run_dir = Path(run_dir)
    tmp = new_tmp_dir(run_dir, FINAL)
    try:
        with quiet_transformers():
            model.save_pretrained(str(tmp))
        info = {"tokenizer": tokenizer, "recipe": recipe, "final_metrics": metrics}
        (tmp / RUN_INFO_FILE).write_text(json.dumps(info, indent=2, default=str))
        (tmp / RECIPE_FILE).write_text(json.dumps(recipe, indent=2, default=str))
        publish_dir(tmp, run_dir / FINAL)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return run_dir / FINAL


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """No transformers progress bars ("Writing model shards", "Loading weights") for one-file models."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


# ---------------------------------------------------------------- loading for inference


@dataclass
class Trained:
    """A model read back for eval / generate, with what is needed to feed it data."""

    model: nn.Module
    recipe: dict[str, Any]
    tokenizer: str
    source: Path  # the export or checkpoint directory actually read
    run_dir: Path  # where eval outputs go by default


def resolve_model_dir(path: str | Path) -> Path:
    """An export dir, a checkpoint dir, or a run dir (its ``final``, else its latest checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if (path / RUN_INFO_FILE).is_file() or is_complete(path):
        return path
    if (path / FINAL / RUN_INFO_FILE).is_file():
        return path / FINAL
    latest = latest_checkpoint(path)
    if latest is not None:
        return latest
    if (path / "config.json").is_file():  # a plain save_pretrained export
        return path
    raise FileNotFoundError(f"{path} is neither a run directory, a checkpoint (step-XXXXXXX) nor a final export")


def load_trained(path: str | Path, device: str | torch.device = "cpu") -> Trained:
    """Load the model behind `path` (see `resolve_model_dir`) in eval mode on `device`."""
    from transformers import AutoModelForCausalLM

    from bmojo_neuron import BMojoConfig, BMojoForCausalLM

    source = resolve_model_dir(path)
    if is_complete(source):  # a training checkpoint
        if (source / PARALLEL_FILE).is_file():
            from bmojo_neuron.training.distributed import consolidated_model

            model = consolidated_model(source)
        else:
            model = BMojoForCausalLM(BMojoConfig.from_json_file(str(source / CONFIG_FILE)))
            load_model_weights(model, source)
        recipe = json.loads((source / RECIPE_FILE).read_text())
        tokenizer = str(recipe.get("data", {}).get("tokenizer") or "byte")
    else:
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(str(source))
        info_file = source / RUN_INFO_FILE
        info = json.loads(info_file.read_text()) if info_file.is_file() else {}
        recipe = info.get("recipe", {})
        tokenizer = str(info.get("tokenizer") or "byte")
    run_dir = source.parent if (source.name == FINAL or STEP_PATTERN.match(source.name)) else source
    return Trained(model.to(device).eval(), recipe, tokenizer, source, run_dir)
