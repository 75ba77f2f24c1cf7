"""Autograd-aware collectives for tensor and sequence parallelism over `torch.distributed`.

Megatron-style pairs: each forward collective has the backward that makes the
gradients of a replicated loss exact.

| function | forward | backward |
|---|---|---|
| `copy_to_tp` | identity | all-reduce |
| `reduce_from_tp` | all-reduce | identity |
| `gather_last_dim` | all-gather on the last dim | keep own slice |
| `scatter_sequence` | keep own sequence slice | all-gather sequence |
| `gather_sequence` | all-gather sequence | reduce-scatter sequence |
| `reduce_scatter_sequence` | reduce-scatter sequence | all-gather sequence |

The sequence is dim 1 (tensors are batch-first, (batch, L, hidden)). gloo has no
reduce-scatter, so it is an all-reduce followed by taking the local slice.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

SEQ_DIM = 1


def _all_reduce(x: Tensor, group) -> Tensor:
    x = x.contiguous().clone()
    dist.all_reduce(x, group=group)
    return x


def _all_gather(x: Tensor, dim: int, group) -> Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _local_slice(x: Tensor, dim: int, group) -> Tensor:
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    if x.shape[dim] % size:
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} is not divisible by the tensor-parallel size {size}")
    return x.chunk(size, dim=dim)[rank].contiguous()


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherLastDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather(x, -1, group)

    @staticmethod
    def backward(ctx, grad):
        return _local_slice(grad, grad.dim() - 1, ctx.group), None


class _ScatterSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _local_slice(x, SEQ_DIM, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, SEQ_DIM, ctx.group), None


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather(x, SEQ_DIM, group)

    @staticmethod
    def backward(ctx, grad):
        return _local_slice(_all_reduce(grad, ctx.group), SEQ_DIM, ctx.group), None


class _ReduceScatterSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _local_slice(_all_reduce(x, group), SEQ_DIM, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, SEQ_DIM, ctx.group), None


def copy_to_tp(x: Tensor, group=None) -> Tensor:
    return _CopyToTP.apply(x, group)


def reduce_from_tp(x: Tensor, group=None) -> Tensor:
    return _ReduceFromTP.apply(x, group)


def gather_last_dim(x: Tensor, group=None) -> Tensor:
    return _GatherLastDim.apply(x, group)


def scatter_sequence(x: Tensor, group=None) -> Tensor:
    return _ScatterSequence.apply(x, group)


def gather_sequence(x: Tensor, group=None) -> Tensor:
    return _GatherSequence.apply(x, group)


def reduce_scatter_sequence(x: Tensor, group=None) -> Tensor:
    return _ReduceScatterSequence.apply(x, group)
