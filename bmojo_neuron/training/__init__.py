"""Training, checkpointing and evaluation of B'MOJO models (CPU / CUDA).

`train(recipe)` runs one recipe end to end; see ``docs/training.md`` for the run
directory layout and the resume semantics.
"""

from __future__ import annotations

from .checkpoint import export_final, latest_checkpoint, load_checkpoint, load_latest, save_checkpoint
from .evaluate import evaluate, length_generalisation
from .loop import TrainResult, train
from .optim import build_optimizer, build_scheduler, lr_factor, parameter_groups

__all__ = [
    "TrainResult",
    "build_optimizer",
    "build_scheduler",
    "evaluate",
    "export_final",
    "latest_checkpoint",
    "length_generalisation",
    "load_checkpoint",
    "load_latest",
    "lr_factor",
    "parameter_groups",
    "save_checkpoint",
    "train",
]
