"""Tensor parallelism on Trainium through NeuronX Distributed (NxD 0.17).

`NxDTensorParallelFactory` returns NxD's own layers, so the model code is the one
the CPU tests prove with `TorchTensorParallelFactory`. NxD is imported only when
this factory is built (it imports torch_xla at import time), through
`bmojo_neuron.neuron`, so a machine without Neuron gets a clear message.

Call `neuronx_distributed.parallel_layers.parallel_state.initialize_model_parallel`
first (the Trn1 training path does it from the recipe's ``parallel.*`` keys).
Sequence parallelism is not offered here yet: NxD's sequence-parallel layers expect
sequence-first activations ``[S, B, H]`` and the model is batch-first.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..layers.factory import IGNORE_INDEX, LayerFactory
from ..layers.norms import RMSNorm
from ..neuron import import_neuron_module

FEATURE = "tensor parallelism on Trainium"


class NxDTensorParallelFactory(LayerFactory):
    """Layers from `neuronx_distributed.parallel_layers`, sharded over NxD's tensor-parallel group."""

    def __init__(self, sequence_parallel: bool = False) -> None:
        if sequence_parallel:
            raise ValueError(
                "parallel.sp on Trainium is not supported yet: NxD's sequence-parallel layers need "
                "sequence-first activations; set parallel.sp: false"
            )
        self.layers = import_neuron_module("neuronx_distributed.parallel_layers.layers", FEATURE)
        self.mappings = import_neuron_module("neuronx_distributed.parallel_layers.mappings", FEATURE)
        self.state = import_neuron_module("neuronx_distributed.parallel_layers.parallel_state", FEATURE)
        self.loss = import_neuron_module("neuronx_distributed.parallel_layers.loss_functions", FEATURE)
        self.tp_size = self.state.get_tensor_model_parallel_size()
        self.tp_rank = self.state.get_tensor_model_parallel_rank()
        self.sequence_parallel = False

    def column_linear(self, in_features: int, out_features: int, bias: bool = False, sequence_parallel: bool = True) -> nn.Module:
        return self.layers.ColumnParallelLinear(in_features, out_features, bias=bias, gather_output=False)

    def row_linear(self, in_features: int, out_features: int, bias: bool = False, sequence_parallel: bool = True) -> nn.Module:
        return self.layers.RowParallelLinear(in_features, out_features, bias=bias, input_is_parallel=True)

    def embedding(self, num_embeddings: int, embedding_dim: int) -> nn.Module:
        return self.layers.ParallelEmbedding(num_embeddings, embedding_dim)

    def norm(self, dim: int, eps: float) -> nn.Module:
        return RMSNorm(dim, eps=eps)

    def share_across_tp(self, x: Tensor) -> Tensor:
        return self.mappings.copy_to_tensor_model_parallel_region(x)

    def all_reduce(self, x: Tensor) -> Tensor:
        return self.mappings.reduce_from_tensor_model_parallel_region(x)

    def gather_vocab(self, logits: Tensor) -> Tensor:
        return self.mappings.gather_from_tensor_model_parallel_region(logits)

    def cross_entropy(self, logits: Tensor, labels: Tensor) -> Tensor:
        keep = labels != IGNORE_INDEX
        losses = self.loss.parallel_cross_entropy(logits, labels.clamp(min=0))
        return (losses * keep).sum() / keep.sum().clamp(min=1)
