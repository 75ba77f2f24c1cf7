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
`locate`                  the model folder a user's path stands for; what is refused, and why (no torch)
`inference`               `load_trained`: a model from any of the above, for eval / generate
========================  =============================================================

Nothing here imports the trainer; the trainer's backends call these. See
docs/training.md for the run directory and docs/parallel.md for the sharded format.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy_exports import lazy_getattr

# public name -> the submodule that defines it. They load on first use (PEP 562), so that the modules that only
# read folders (`names`, `layout`, `manifest`, `locate`) import without torch: a command refuses a path that is
# no model before torch and transformers load (seconds of start-up).
_LAZY = {
    "Checkpoint": "state",
    "Trained": "inference",
    "TrainerState": "state",
    "consolidate_checkpoint": "convert",
    "export_final": "export",
    "has_run": "layout",
    "latest_checkpoint": "layout",
    "list_checkpoints": "layout",
    "load_checkpoint": "local",
    "load_latest": "local",
    "load_model_weights": "local",
    "load_trained": "inference",
    "resolve_model_dir": "locate",
    "save_checkpoint": "local",
    "shard_checkpoint": "convert",
}

if TYPE_CHECKING:
    from .convert import consolidate_checkpoint, shard_checkpoint
    from .export import export_final
    from .inference import Trained, load_trained
    from .layout import has_run, latest_checkpoint, list_checkpoints
    from .local import load_checkpoint, load_latest, load_model_weights, save_checkpoint
    from .locate import resolve_model_dir
    from .state import Checkpoint, TrainerState


__getattr__ = lazy_getattr(__name__, _LAZY, globals())


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
