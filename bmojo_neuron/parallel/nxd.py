"""Tensor and sequence parallelism on Trainium through NeuronX Distributed (NxD 0.17).

`NxDTensorParallelFactory` returns NxD's own layers, so the model code is the one
the CPU tests prove with `TorchTensorParallelFactory`. NxD is imported only when
this factory is built (it imports torch_xla at import time), through
`bmojo_neuron.neuron`, so a machine without Neuron gets a clear message.

Call `neuronx_distributed.parallel_layers.parallel_state.initialize_model_parallel`
first (`neuronx_distributed_config` does it; see `nxd_training.py`).

Sequence parallelism stays batch-first. NxD's sequence-parallel layout defaults to
sequence-first ``[S/tp, B, H]``, but in NxD 0.17 ``ColumnParallelLinear``,
``RowParallelLinear`` and ``scatter_to_sequence_parallel_region`` take a
``sequence_dimension``; we pass 1, the sequence dim of ``(B, S, H)``. NxD then
moves that dim to the front around each sequence all-gather / reduce-scatter (a
transpose, free when the micro-batch is 1). NxD's ``ParallelEmbedding`` is not
used in sequence-parallel mode: with a non-zero ``sequence_dimension`` it returns
the un-reduced per-rank lookups, and with dimension 0 it transposes to
sequence-first. The embedding therefore all-reduces and `scatter_sequence` keeps
this rank's slice, as `TorchTensorParallelFactory` does.

Residual-stream norms see only part of the sequence, so their weights carry NxD's
``sequence_parallel_enabled`` attribute (as do sequence-parallel row-parallel
biases, which NxD marks itself). NxD's optimizer wrapper all-reduces those
gradients over the tensor-parallel group when its config has
``sequence_parallel=True``; a hand-written loop calls
``neuronx_distributed.parallel_layers.grads.allreduce_sequence_parallel_gradients(optimizer)``
after backward.

The NxD sources this follows are listed in docs/trn1.md ("Sources and status").
"""

from __future__ import annotations

from torch import Tensor, nn

from ..layers.factory import IGNORE_INDEX, LayerFactory
from ..layers.norms import RMSNorm
from ..neuron import import_neuron_module

FEATURE = "tensor parallelism on Trainium"
SEQUENCE_DIM = 1  # activations are batch-first (B, S, H)
SP_GRAD_ATTRIBUTE = "sequence_parallel_enabled"  # NxD's mark for gradients summed over tp


class NxDTensorParallelFactory(LayerFactory):
    """Layers from `neuronx_distributed.parallel_layers`, sharded over NxD's tensor-parallel group."""

    def __init__(self, sequence_parallel: bool = False) -> None:
        self.layers = import_neuron_module("neuronx_distributed.parallel_layers.layers", FEATURE)
        self.mappings = import_neuron_module("neuronx_distributed.parallel_layers.mappings", FEATURE)
        self.state = import_neuron_module("neuronx_distributed.parallel_layers.parallel_state", FEATURE)
        self.loss = import_neuron_module("neuronx_distributed.parallel_layers.loss_functions", FEATURE)
        self.tp_size = self.state.get_tensor_model_parallel_size()
        self.tp_rank = self.state.get_tensor_model_parallel_rank()
        self.sequence_parallel = bool(sequence_parallel)

    def _sp_kwargs(self, sequence_parallel: bool) -> dict:
        """NxD's sequence-parallel arguments for a layer on the residual-stream boundary."""
        if not (self.sequence_parallel and sequence_parallel):
            return {}
        return {"sequence_parallel_enabled": True, "sequence_dimension": SEQUENCE_DIM}

    def column_linear(self, in_features: int, out_features: int, bias: bool = False, sequence_parallel: bool = True) -> nn.Module:
        return self.layers.ColumnParallelLinear(
            in_features, out_features, bias=bias, gather_output=False, **self._sp_kwargs(sequence_parallel)
        )

    def row_linear(self, in_features: int, out_features: int, bias: bool = False, sequence_parallel: bool = True) -> nn.Module:
        return self.layers.RowParallelLinear(
            in_features, out_features, bias=bias, input_is_parallel=True, **self._sp_kwargs(sequence_parallel)
        )

    def embedding(self, num_embeddings: int, embedding_dim: int) -> nn.Module:
        return self.layers.ParallelEmbedding(num_embeddings, embedding_dim)

    def norm(self, dim: int, eps: float) -> nn.Module:
        norm = RMSNorm(dim, eps=eps)
        if self.sequence_parallel:
            setattr(norm.weight, SP_GRAD_ATTRIBUTE, True)
        return norm

    def share_across_tp(self, x: Tensor) -> Tensor:
        return self.mappings.copy_to_tensor_model_parallel_region(x)

    def all_reduce(self, x: Tensor) -> Tensor:
        return self.mappings.reduce_from_tensor_model_parallel_region(x)

    def scatter_sequence(self, x: Tensor) -> Tensor:
        if not self.sequence_parallel:
            return x
        length = x.shape[SEQUENCE_DIM]
        if isinstance(length, int) and length % self.tp_size:  # not a Python int while a tracer runs
            raise ValueError(
                f"sequence length {length} is not divisible by the tensor-parallel size {self.tp_size} "
                "(needed by parallel.sp)"
            )
        return self.mappings.scatter_to_sequence_parallel_region(x, sequence_dimension=SEQUENCE_DIM)

    def gather_vocab(self, logits: Tensor) -> Tensor:
        return self.mappings.gather_from_tensor_model_parallel_region(logits)

    def cross_entropy(self, logits: Tensor, labels: Tensor) -> Tensor:
        keep = labels != IGNORE_INDEX
        losses = self.loss.parallel_cross_entropy(logits, labels.clamp(min=0))
        return (losses * keep).sum() / keep.sum().clamp(min=1)
