"""Parallel training: tensor/sequence parallelism on torch.distributed (and, on Trainium, NxD).

The model is built unchanged inside `use_layer_factory(TorchTensorParallelFactory(...))`;
`shard_state_dict` / `consolidate_state_dicts` convert between one full checkpoint and
per-rank shards; `layout` splits a job into dp × pp × tp groups, `pipeline` holds the
pipeline stages (the sharded checkpoints are `bmojo_neuron.checkpoints`'). See docs/parallel.md.
"""

from .layout import ParallelLayout, ProcessGroups
from .sharding import consolidate_state_dicts, shard_state_dict, split_dims
from .tensor_parallel import TorchTensorParallelFactory, sync_sequence_parallel_grads

__all__ = [
    "ParallelLayout",
    "ProcessGroups",
    "TorchTensorParallelFactory",
    "consolidate_state_dicts",
    "shard_state_dict",
    "split_dims",
    "sync_sequence_parallel_grads",
]
