"""Training, checkpointing and evaluation of B'MOJO models (CPU / CUDA).

`train(recipe)` runs one recipe end to end; see ``docs/training.md`` for the run
directory layout and the resume semantics. Checkpoints are `bmojo_neuron.checkpoints`,
evaluation `bmojo_neuron.evaluation`.
"""

from __future__ import annotations

from .optim import build_optimizer, build_scheduler, lr_factor, parameter_groups
from .trainer import TrainResult, Trainer, train

__all__ = [
    "TrainResult",
    "Trainer",
    "build_optimizer",
    "build_scheduler",
    "lr_factor",
    "parameter_groups",
    "train",
]
