"""Tensor and sequence parallelism on `torch.distributed` (gloo on CPU, NCCL on CUDA).

`TorchTensorParallelFactory` is a `LayerFactory` whose layers hold one rank's shard
and communicate through the autograd-aware collectives of `collectives.py`. It has
the semantics of NeuronX Distributed's layers (`ColumnParallelLinear`,
`RowParallelLinear`, `ParallelEmbedding`, `parallel_cross_entropy`), so the model
code is the same on Trainium and here. Shards are contiguous blocks: rank ``r`` of
``tp`` holds block ``r`` of the split dimension.

With sequence parallelism the residual stream between layers is split along the
sequence (dim 1 of (batch, L, hidden)): column-parallel layers all-gather their
input, row-parallel layers reduce-scatter their output. Residual-stream norms then
see only part of the sequence, so their gradients must be summed over the
tensor-parallel group after backward (`sync_sequence_parallel_grads`).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers.factory import IGNORE_INDEX, LayerFactory, check_tp_split
from ..layers.norms import RMSNorm
from . import collectives as C


def _shard(size: int, tp: int, what: str) -> int:
    if size % tp:
        raise ValueError(f"{what} ({size}) is not divisible by the tensor-parallel size ({tp})")
    return size // tp


class ColumnParallelLinear(nn.Module):
    """``y = x W^T`` with W split by output rows: each rank produces its slice of the features."""

    def __init__(self, in_features: int, out_features: int, bias: bool, factory: TorchTensorParallelFactory, gather_sequence: bool) -> None:
        super().__init__()
        self.factory, self.gather_sequence = factory, gather_sequence
        local = _shard(out_features, factory.tp_size, "output features of a column-parallel layer")
        self.weight = nn.Parameter(torch.empty(local, in_features))
        self.bias = nn.Parameter(torch.zeros(local)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        group = self.factory.group
        x = C.gather_sequence(x, group) if self.gather_sequence else C.copy_to_tp(x, group)
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """``y = x W^T`` with W split by input columns: partial sums are reduced over ranks."""

    def __init__(self, in_features: int, out_features: int, bias: bool, factory: TorchTensorParallelFactory, scatter_sequence: bool) -> None:
        super().__init__()
        self.factory, self.scatter_sequence = factory, scatter_sequence
        local = _shard(in_features, factory.tp_size, "input features of a row-parallel layer")
        self.weight = nn.Parameter(torch.empty(out_features, local))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        if self.bias is not None and scatter_sequence:
            self.bias.sequence_parallel = True
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        group = self.factory.group
        partial = F.linear(x, self.weight)
        out = C.reduce_scatter_sequence(partial, group) if self.scatter_sequence else C.reduce_from_tp(partial, group)
        return out if self.bias is None else out + self.bias


class VocabParallelEmbedding(nn.Module):
    """Embedding whose rows (the vocabulary) are split over ranks; lookups are summed over ranks."""

    def __init__(self, num_embeddings: int, embedding_dim: int, factory: TorchTensorParallelFactory) -> None:
        super().__init__()
        self.factory = factory
        check_tp_split("vocab_size", num_embeddings, factory.tp_size)
        local = num_embeddings // factory.tp_size
        self.start = factory.tp_rank * local
        self.weight = nn.Parameter(torch.empty(local, embedding_dim))
        nn.init.normal_(self.weight)

    def forward(self, ids: Tensor) -> Tensor:
        local_ids = ids - self.start
        outside = (local_ids < 0) | (local_ids >= self.weight.shape[0])
        rows = F.embedding(local_ids.masked_fill(outside, 0), self.weight)
        rows = rows.masked_fill(outside[..., None], 0.0)
        return C.reduce_from_tp(rows, self.factory.group)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Cross-entropy per row of vocabulary-sharded logits, never gathering the vocabulary."""

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, start: int, group) -> Tensor:
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        row_max = logits.max(dim=-1).values
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - row_max[:, None]
        local = labels - start
        mine = (local >= 0) & (local < logits.shape[-1])
        index = local.clamp(0, logits.shape[-1] - 1)
        target = shifted.gather(1, index[:, None]).squeeze(1) * mine
        exp = shifted.exp()
        total = exp.sum(dim=-1)
        stacked = torch.stack([target, total])
        dist.all_reduce(stacked, group=group)
        target, total = stacked
        ctx.save_for_backward(exp / total[:, None], index, mine)
        return total.log() - target

    @staticmethod
    def backward(ctx, grad: Tensor):
        softmax, index, mine = ctx.saved_tensors
        grad_logits = softmax.clone()
        grad_logits.scatter_add_(1, index[:, None], -mine.to(softmax.dtype)[:, None])
        return grad_logits * grad[:, None], None, None, None


class TorchTensorParallelFactory(LayerFactory):
    """Layers sharded over the tensor-parallel process `group` (default: the whole world)."""

    def __init__(self, group=None, sequence_parallel: bool = False) -> None:
        if not dist.is_initialized():
            raise RuntimeError("TorchTensorParallelFactory needs torch.distributed to be initialised first")
        self.group = group
        self.tp_size = dist.get_world_size(group)
        self.tp_rank = dist.get_rank(group)
        self.sequence_parallel = sequence_parallel

    def column_linear(self, in_features: int, out_features: int, bias: bool = False, sequence_parallel: bool = True) -> nn.Module:
        return ColumnParallelLinear(in_features, out_features, bias, self, self.sequence_parallel and sequence_parallel)

    def row_linear(self, in_features: int, out_features: int, bias: bool = False, sequence_parallel: bool = True) -> nn.Module:
        return RowParallelLinear(in_features, out_features, bias, self, self.sequence_parallel and sequence_parallel)

    def embedding(self, num_embeddings: int, embedding_dim: int) -> nn.Module:
        return VocabParallelEmbedding(num_embeddings, embedding_dim, self)

    def norm(self, dim: int, eps: float) -> nn.Module:
        norm = RMSNorm(dim, eps=eps)
        norm.weight.sequence_parallel = self.sequence_parallel
        return norm

    def gain(self, dim: int, init: float = 0.0) -> nn.Parameter:
        gain = super().gain(dim, init)
        gain.sequence_parallel = self.sequence_parallel
        return gain

    def share_across_tp(self, x: Tensor) -> Tensor:
        return C.copy_to_tp(x, self.group)

    def all_reduce(self, x: Tensor) -> Tensor:
        return C.reduce_from_tp(x, self.group)

    def scatter_sequence(self, x: Tensor) -> Tensor:
        return C.scatter_sequence(x, self.group) if self.sequence_parallel else x

    def gather_vocab(self, logits: Tensor) -> Tensor:
        return C.gather_last_dim(logits, self.group)

    def cross_entropy(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Mean over the rows whose label is not -100, as a masked mean over *every* row.

        Selecting the kept rows (``logits[keep]``) would give a data-dependent shape
        (a recompile per count on Neuron); an ignored row's label (-100) is in no
        rank's shard, so its loss is finite and the mask zeroes it and its gradient.
        """
        keep = labels != IGNORE_INDEX
        start = self.tp_rank * logits.shape[-1]
        losses = _VocabParallelCrossEntropy.apply(logits, labels, start, self.group)
        return (losses * keep).sum() / keep.sum().clamp(min=1)


def sync_sequence_parallel_grads(model: nn.Module, group=None) -> None:
    """Sum, over the tensor-parallel group, the gradients of replicated parameters that
    saw only this rank's part of the sequence (residual-stream norms, row-parallel biases)."""
    for param in model.parameters():
        if getattr(param, "sequence_parallel", False) and param.grad is not None:
            dist.all_reduce(param.grad, group=group)
