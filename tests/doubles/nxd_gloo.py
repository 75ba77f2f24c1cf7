"""A double of NxD 0.17's tensor-parallel modules whose collectives run on torch.distributed.

It lets a gloo run check `NxDTensorParallelFactory`'s wiring numerically. The
behaviour copies what NxD's source does at the SDK 2.28 release
(``aws-neuron/neuronx-distributed`` commit ``73ab227``, tag ``v2.28.0``, version 0.17.0), including
the behaviour that makes a wrong call give wrong numbers:

- ``sequence_dimension`` defaults to 0 (ColumnParallelLinear / RowParallelLinear
  warn and use 0; ``scatter_to_sequence_parallel_region`` defaults to 0), and a
  sequence collective works on whatever dimension it is given;
- sequence-parallel ColumnParallelLinear all-gathers its input along that dimension
  (backward: reduce-scatter); RowParallelLinear reduce-scatters its output (backward:
  all-gather), refuses SP without ``input_is_parallel``, and marks its bias
  ``sequence_parallel_enabled``; ColumnParallelLinear refuses ``gather_output``
  with SP;
- ``grads.allreduce_sequence_parallel_gradients(optimizer)`` sums over the
  tensor-parallel group the gradients of parameters marked ``sequence_parallel_enabled``.

The tensor-parallel group is the whole world. `BUILT` records every layer built as
``(kind, args, kwargs)``. `MODULES` maps NxD's module names to the doubles.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from bmojo_neuron.parallel import collectives as C
from bmojo_neuron.parallel.tensor_parallel import _VocabParallelCrossEntropy

BUILT: list[tuple[str, tuple, dict]] = []


def _on_dim(collective: Callable[[Tensor], Tensor], x: Tensor, dim: int) -> Tensor:
    """Apply a sequence collective of `collectives` (which works on dim 1) along `dim`."""
    if dim % x.dim() == 1:
        return collective(x)
    return collective(x.transpose(dim, 1)).transpose(dim, 1)


def _sp_dim(sequence_parallel_enabled: bool, sequence_dimension: int | None) -> int | None:
    if not sequence_parallel_enabled:
        return None
    return 0 if sequence_dimension is None else sequence_dimension


class ColumnParallelLinear(nn.Module):
    def __init__(self, input_size: int, output_size: int, bias: bool = True, gather_output: bool = True,
                 sequence_parallel_enabled: bool = False, sequence_dimension: int | None = None) -> None:
        super().__init__()
        BUILT.append(("column", (input_size, output_size), dict(
            bias=bias, gather_output=gather_output, sequence_parallel_enabled=sequence_parallel_enabled,
            sequence_dimension=sequence_dimension)))
        if gather_output and sequence_parallel_enabled:
            raise RuntimeError("ColumnParallelLinear: gather_output is not allowed with sequence parallelism")
        tp = dist.get_world_size()
        self.gather_output, self.seq_dim = gather_output, _sp_dim(sequence_parallel_enabled, sequence_dimension)
        self.weight = nn.Parameter(torch.empty(output_size // tp, input_size))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.bias = nn.Parameter(torch.zeros(output_size if gather_output else output_size // tp)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        x = C.copy_to_tp(x) if self.seq_dim is None else _on_dim(C.gather_sequence, x, self.seq_dim)
        y = F.linear(x, self.weight)
        if self.gather_output:
            y = C.gather_last_dim(y)
        return y if self.bias is None else y + self.bias


class RowParallelLinear(nn.Module):
    def __init__(self, input_size: int, output_size: int, bias: bool = True, input_is_parallel: bool = False,
                 sequence_parallel_enabled: bool = False, sequence_dimension: int | None = None) -> None:
        super().__init__()
        BUILT.append(("row", (input_size, output_size), dict(
            bias=bias, input_is_parallel=input_is_parallel, sequence_parallel_enabled=sequence_parallel_enabled,
            sequence_dimension=sequence_dimension)))
        if sequence_parallel_enabled and not input_is_parallel:
            raise RuntimeError("To enable `sequence_parallel_enabled`, `input_is_parallel` must be `True`")
        if not input_is_parallel:
            raise NotImplementedError("the double models input_is_parallel=True only")
        self.seq_dim = _sp_dim(sequence_parallel_enabled, sequence_dimension)
        self.weight = nn.Parameter(torch.empty(output_size, input_size // dist.get_world_size()))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.zeros(output_size))
            self.bias.sequence_parallel_enabled = sequence_parallel_enabled

    def forward(self, x: Tensor) -> Tensor:
        partial = F.linear(x, self.weight)
        y = C.reduce_from_tp(partial) if self.seq_dim is None else _on_dim(C.reduce_scatter_sequence, partial, self.seq_dim)
        return y if self.bias is None else y + self.bias


class ParallelEmbedding(nn.Module):
    """Vocabulary-sharded lookup, all-reduced (the only mode the factory may use)."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        BUILT.append(("embedding", (num_embeddings, embedding_dim), {}))
        local = num_embeddings // dist.get_world_size()
        self.start = dist.get_rank() * local
        self.weight = nn.Parameter(torch.empty(local, embedding_dim))
        nn.init.normal_(self.weight)

    def forward(self, ids: Tensor) -> Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        rows = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside[..., None], 0.0)
        return C.reduce_from_tp(rows)


def _scatter_to_sequence_parallel_region(x: Tensor, sequence_dimension: int = 0, process_group=None) -> Tensor:
    return _on_dim(C.scatter_sequence, x, sequence_dimension)


def _parallel_cross_entropy(logits: Tensor, target: Tensor, label_smoothing: float = 0.0) -> Tensor:
    start = dist.get_rank() * logits.shape[-1]
    return _VocabParallelCrossEntropy.apply(logits, target, start, None)


def _allreduce_sequence_parallel_gradients(optimizer: torch.optim.Optimizer) -> None:
    for group in optimizer.param_groups:
        for p in group["params"]:
            if getattr(p, "sequence_parallel_enabled", False) and p.grad is not None:
                dist.all_reduce(p.grad)


MODULES = {
    "neuronx_distributed.parallel_layers.layers": SimpleNamespace(
        ColumnParallelLinear=ColumnParallelLinear, RowParallelLinear=RowParallelLinear,
        ParallelEmbedding=ParallelEmbedding,
    ),
    "neuronx_distributed.parallel_layers.mappings": SimpleNamespace(
        copy_to_tensor_model_parallel_region=lambda x, process_group=None: C.copy_to_tp(x),
        reduce_from_tensor_model_parallel_region=lambda x, process_group=None: C.reduce_from_tp(x),
        gather_from_tensor_model_parallel_region=lambda x, process_group=None: C.gather_last_dim(x),
        scatter_to_sequence_parallel_region=_scatter_to_sequence_parallel_region,
    ),
    "neuronx_distributed.parallel_layers.parallel_state": SimpleNamespace(
        get_tensor_model_parallel_size=lambda: dist.get_world_size(),
        get_tensor_model_parallel_rank=lambda: dist.get_rank(),
    ),
    "neuronx_distributed.parallel_layers.loss_functions": SimpleNamespace(
        parallel_cross_entropy=_parallel_cross_entropy,
    ),
    "neuronx_distributed.parallel_layers.grads": SimpleNamespace(
        allreduce_sequence_parallel_gradients=_allreduce_sequence_parallel_gradients,
    ),
}
