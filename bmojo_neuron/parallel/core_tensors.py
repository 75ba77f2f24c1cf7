"""What one NeuronCore holds under tensor and pipeline parallelism, for the graph check (`plan --check-graph`).

The graph check traces one NeuronCore's training step on fake tensors. At ``parallel.tp > 1`` a core holds
only its shard of every column- or row-parallel weight and of the vocabulary, the activations those layers
make from it, their gradients, and under ``parallel.sp`` its slice of the sequence between layers.
`ShardTraceFactory` builds the model with exactly those shapes: its layers are the shard-shaped layers of
`TorchTensorParallelFactory` (same constructors, so the same shard rule as the model's tensor-parallel runs,
which follow NxD v2.28.0's ``parallel_layers/layers.py``: ``ColumnParallelLinear`` weight
``(output_size / tp, input_size)``, lines 630 and 664; ``RowParallelLinear`` ``(output_size, input_size / tp)``,
lines 888 and 913; ``ParallelEmbedding`` ``(num_embeddings / tp, embedding_dim)``, lines 274-293), and each
collective is replaced by a local op whose output has the shape and dtype of the collective's on one rank:

| collective (NxD ``mappings.py``) | one rank's output | stand-in |
|---|---|---|
| all-reduce (row-parallel output, embedding lookup) | same shape | identity |
| sequence all-gather (column-parallel input under sp) | ``(B, S, ...)`` from ``(B, S/tp, ...)`` | repeat along dim 1 |
| sequence reduce-scatter (row-parallel output under sp) | ``(B, S/tp, ...)`` | the first slice of dim 1 |
| scatter to the sequence region (after the embedding) | ``(B, S/tp, ...)`` | the first slice of dim 1 |
| vocabulary all-gather (logits handed back) | ``(..., V)`` | repeat along the last dim |

The stand-ins move no data between ranks, so the values are not those of any rank: the trace is of shapes,
dtypes and ops (fake tensors compute nothing). The vocabulary all-gather of the logits is dead code in the
training step (the step keeps only the loss), so the graph check drops it before its scan
(`step_graph.dead_nodes`), as torch-xla never computes a lazy tensor nothing holds. NxD's cross-entropy, whose
backward is its own code, is traced apart (`NxDCrossEntropyStep`); the ops of NxD's other layers (its
embedding's masked lookup) are not, and their largest tensors have the shapes traced here.

At ``parallel.pp > 1`` a stage holds no tensor larger than the trace's: NxD v2.28.0's pipeline takes the step's
batch as host tensors (``pipeline/model.py`` lines 1113-1118), cuts it into micro-batches on the host (lines
1078-1088) and moves each to the device on its own (``MpDeviceLoader``, line 1950), and what crosses a stage
boundary is one micro-batch's decoder-layer output (and the ``(1,)`` innovation sum), a tensor the trace holds.
How many micro-batches a stage holds at once is HBM, which the plan's memory estimate counts.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers.factory import IGNORE_INDEX, LayerFactory
from .collectives import SEQ_DIM
from .tensor_parallel import ColumnParallelLinear, RowParallelLinear, TorchTensorParallelFactory, VocabParallelEmbedding


def _gathered(x: Tensor, dim: int, tp: int) -> Tensor:
    """The shape and dtype of an all-gather of `x` along `dim` over `tp` ranks."""
    repeats = [1] * x.dim()
    repeats[dim] = tp
    return x.repeat(repeats)


def _scattered(x: Tensor, tp: int) -> Tensor:
    """The shape and dtype of one rank's slice of `x`'s sequence (a reduce-scatter or scatter); like
    `NxDTensorParallelFactory.scatter_sequence` and `collectives._local_slice`, a sequence `tp` does not divide
    is refused."""
    length = x.shape[SEQ_DIM]
    if length % tp:
        raise ValueError(f"sequence length {length} is not divisible by the tensor-parallel size {tp}")
    return x.narrow(SEQ_DIM, 0, length // tp)


class _ColumnShard(ColumnParallelLinear):
    def forward(self, x: Tensor) -> Tensor:
        if self.gather_sequence:
            x = _gathered(x, SEQ_DIM, self.factory.tp_size)
        return F.linear(x, self.weight, self.bias)


class _RowShard(RowParallelLinear):
    def forward(self, x: Tensor) -> Tensor:
        out = F.linear(x, self.weight)
        if self.scatter_sequence:
            out = _scattered(out, self.factory.tp_size)
        return out if self.bias is None else out + self.bias


class _EmbeddingShard(VocabParallelEmbedding):
    def forward(self, ids: Tensor) -> Tensor:
        local_ids = ids - self.start
        outside = (local_ids < 0) | (local_ids >= self.weight.shape[0])
        return F.embedding(local_ids.masked_fill(outside, 0), self.weight).masked_fill(outside[..., None], 0.0)


class ShardTraceFactory(TorchTensorParallelFactory):
    """Rank 0's shard-shaped layers with local stand-ins for the collectives: for tracing one core's step only."""

    def __init__(self, tp: int, sequence_parallel: bool) -> None:  # no process group: nothing is communicated
        self.group, self.tp_size, self.tp_rank, self.sequence_parallel = None, tp, 0, sequence_parallel

    def column_linear(self, in_features: int, out_features: int, bias: bool = False,
                      sequence_parallel: bool = True) -> nn.Module:
        return _ColumnShard(in_features, out_features, bias, self, self.sequence_parallel and sequence_parallel)

    def row_linear(self, in_features: int, out_features: int, bias: bool = False,
                   sequence_parallel: bool = True) -> nn.Module:
        return _RowShard(in_features, out_features, bias, self, self.sequence_parallel and sequence_parallel)

    def embedding(self, num_embeddings: int, embedding_dim: int) -> nn.Module:
        return _EmbeddingShard(num_embeddings, embedding_dim, self)

    def share_across_tp(self, x: Tensor) -> Tensor:
        return x

    def all_reduce(self, x: Tensor) -> Tensor:
        return x

    def scatter_sequence(self, x: Tensor) -> Tensor:
        return _scattered(x, self.tp_size) if self.sequence_parallel else x

    def gather_vocab(self, logits: Tensor) -> Tensor:
        return _gathered(logits, -1, self.tp_size)

    def cross_entropy(self, logits: Tensor, labels: Tensor) -> Tensor:
        """The loss over this rank's vocabulary shard (the labels folded into it; -100 stays ignored)."""
        return F.cross_entropy(logits, labels.clamp(max=logits.shape[-1] - 1), ignore_index=IGNORE_INDEX)


def trace_factory(tp: int, sequence_parallel: bool) -> LayerFactory:
    """The factory to build one NeuronCore's model for the trace: the plain layers at tp 1."""
    return ShardTraceFactory(tp, sequence_parallel) if tp > 1 else LayerFactory()


class NxDCrossEntropyStep(nn.Module):
    """The ops of NxD v2.28.0's vocabulary-parallel cross-entropy on one rank's shard, forward then backward, for
    the graph check: ``(logits (rows, V/tp), targets (rows,)) -> (per-row loss, gradient of the logits)``.

    NxD writes it as an autograd Function (``parallel_layers/loss_functions.py`` lines 10-129) whose backward is
    its own code, which torch.export does not carry into the joint graph (the traced loss comes out with no
    gradient), so this module runs the same op sequence with both passes written out, on a loss gradient of
    ones. Its three all-reduces (lines 17, 54 and 66) are identities, as in `ShardTraceFactory`; the rank's
    vocabulary starts at 0 (rank 0, line 30). In place where NxD is: the shift by the row maximum (NxD shifts its
    input; here a copy of it, of the same shape, so that the caller's tensor is left as it was), the
    normalisation of the exponent, the correction at the targets and the scaling in the backward.
    """

    def forward(self, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        vocab, start = logits.size(-1), 0  # rank 0's shard begins the vocabulary (line 30)
        shifted = logits.clone()
        shifted.sub_(torch.max(shifted, dim=-1)[0].unsqueeze(dim=-1))  # lines 16-23 (all-reduce MAX: identity)
        in_shard = (targets >= start) & (targets < start + vocab)  # lines 36-38: a target elsewhere reads column 0
        local_targets = torch.mul(targets.clone() - start, in_shard.long()).view(-1)
        rows = torch.arange(start=0, end=shifted.view(-1, vocab).size()[0], dtype=torch.long)  # line 45
        picked = shifted.view(-1, vocab)[rows, local_targets].clone().contiguous().view_as(targets)  # lines 43-48
        picked = torch.mul(picked, in_shard.float())  # line 52 (then an all-reduce SUM: identity)
        probabilities = torch.exp(shifted)  # lines 64-65 (the sum's all-reduce: identity)
        total = probabilities.sum(dim=-1)
        loss = torch.log(total) - picked  # line 73
        probabilities.div_(total.unsqueeze(dim=-1))  # line 76: the softmax kept for the backward
        gradient = probabilities  # backward, lines 105-127: the softmax, less 1 at each target in the shard ...
        gradient_rows = gradient.view(-1, vocab)
        backward_rows = torch.arange(start=0, end=gradient_rows.size()[0], dtype=torch.long)
        gradient_rows[backward_rows, local_targets] -= in_shard.view(-1).float()
        gradient.mul_(torch.ones_like(loss).unsqueeze(dim=-1))  # ... times the loss gradient
        return loss, gradient
