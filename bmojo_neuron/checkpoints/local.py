"""One-process checkpoints: ``model.safetensors`` plus ``optimizer.pt`` (optimizer, scheduler and RNG states)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from .layout import (MODEL_FILE, OPTIM_FILE, PARALLEL_FILE, REQUIRED_FILES, is_complete, latest_intact_checkpoint,
                     new_tmp_dir, publish_step, step_dir_name)
from .manifest import DamagedCheckpointError, read_torch_file, verify_manifest
from .state import Checkpoint, TrainerState, read_recipe, read_trainer_state, rng_states


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


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read trainer state, recipe and optimizer/scheduler/RNG states of one one-process checkpoint."""
    path = Path(path)
    if (path / PARALLEL_FILE).is_file():
        parallel = json.loads((path / PARALLEL_FILE).read_text())
        raise ValueError(f"{path} is a sharded checkpoint (tp={parallel.get('tp')}, pp={parallel.get('pp')}): "
                         "resume it under torchrun with the same parallel.tp / parallel.pp, or convert it with "
                         "`bmojo-neuron checkpoint consolidate` and `bmojo-neuron checkpoint shard --tp 1 --pp 1`")
    if not is_complete(path):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (needs {', '.join(REQUIRED_FILES)})")
    verify_manifest(path)
    blob = read_torch_file(path / OPTIM_FILE)
    return Checkpoint(path, read_trainer_state(path), read_recipe(path), blob["optimizer"], blob["scheduler"],
                      blob["rng"])


def load_latest(run_dir: str | Path) -> Checkpoint | None:
    """The newest intact checkpoint of `run_dir`, or None; temp and partial dirs are ignored, and a damaged
    checkpoint is passed over with a warning naming the damaged file."""
    path = latest_intact_checkpoint(run_dir, on_skip=warn_skipped)
    return None if path is None else load_checkpoint(path)


def warn_skipped(problem: DamagedCheckpointError) -> None:
    print(f"warning: skipping {problem.directory.name}: {problem.file}: {problem.problem}; resuming from the "
          "newest intact checkpoint before it", file=sys.stderr, flush=True)


def load_model_weights(model: nn.Module, path: str | Path) -> None:
    """Load a checkpoint's ``model.safetensors`` into `model` (strict); weights of another model fail in one
    line naming the first tensor that differs."""
    file = Path(path) / MODEL_FILE
    check_same_shapes(model, file)
    load_model(model, str(file), strict=True)


def check_same_shapes(model: nn.Module, file: Path) -> None:
    """Raise ValueError when `file` holds tensors `model` lacks, or of other shapes (read from the header only)."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    try:
        with safe_open(str(file), framework="pt") as f:
            stored = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except Exception as exc:  # safetensors' own error type differs between its releases
        raise ValueError(f"{file}: not a readable safetensors file ({exc}); the checkpoint is damaged") from None
    hint = "the checkpoint is of another model: load it with the model settings (recipe) it was trained with"
    for name in sorted(stored):
        if name in expected and stored[name] != expected[name]:
            raise ValueError(f"{file}: {name} has shape {list(stored[name])}, this model's is "
                             f"{list(expected[name])}; {hint}")
    unknown = sorted(set(stored) - set(expected))
    if unknown:
        raise ValueError(f"{file}: holds {len(unknown)} tensors this model lacks (first: {unknown[0]}); {hint}")
