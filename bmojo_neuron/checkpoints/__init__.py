"""Checkpoints of training runs: the on-disk format, the writers and readers, conversion and loading for inference.

========================  =============================================================
`names`                   the names in a run directory (files, step folders, the export)
`layout`                  the run directory: discovery, crash-safe publish, pruning
`manifest`                each checkpoint's file sizes and SHA-256, written last, checked on load
`state`                   trainer state, the checkpoint read back, RNG streams
`local`                   one-process checkpoints (``model.safetensors`` + ``optimizer.pt``)
`sharded`                 the sharded format of parallel runs; what every rank does alike
`torch_sharded`           a torch.distributed rank's model shard and optimizer states
`neuron`                  a Neuron rank's (XLA tensors, NxD's ZeRO-1 optimizer)
`convert`                 ``checkpoint consolidate`` / ``shard``: change a run's degrees
`export`                  the ``final/`` Hugging Face export
`inference`               `load_trained`: a model from any of the above, for eval / generate
========================  =============================================================

Nothing here imports the trainer; the trainer's backends call these. See
docs/training.md for the run directory and docs/parallel.md for the sharded format.
"""

from .convert import consolidate_checkpoint, shard_checkpoint
from .export import export_final
from .inference import Trained, load_trained, resolve_model_dir
from .layout import has_run, latest_checkpoint, list_checkpoints
from .local import load_checkpoint, load_latest, load_model_weights, save_checkpoint
from .state import Checkpoint, TrainerState

__all__ = [
    "Checkpoint",
    "Trained",
    "TrainerState",
    "consolidate_checkpoint",
    "export_final",
    "has_run",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_latest",
    "load_model_weights",
    "load_trained",
    "resolve_model_dir",
    "save_checkpoint",
    "shard_checkpoint",
]
