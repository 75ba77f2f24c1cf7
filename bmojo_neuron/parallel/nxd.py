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

The factory's ``dtype`` is the model's parameter dtype, and it is passed to every NxD
layer. NxD's ``ParallelEmbedding`` keeps a ``dtype`` attribute (fp32 unless given) and,
at tp > 1, casts its output with it: ``.to(dtype)`` when that is fp32, bf16 otherwise
(NxD 0.17 ``layers.py`` 361-364). ``model.to(torch.bfloat16)`` does not change that
attribute, so a model built with the default and cast afterwards runs its residual
stream in fp32 (twice the activation memory `bmojo_neuron.launch.memory` estimates,
and fp32 inputs to bf16 kernels). Build a bf16 model with ``dtype=torch.bfloat16``;
`check_nxd_dtypes` refuses a model whose NxD layers disagree with its weights. Other
dtypes cannot be expressed at tp > 1 (NxD would hand out bf16), so they are refused.

A column-parallel layer without sequence parallelism gets ``reduce_dtype`` equal to its weights' dtype. NxD
0.17 all-reduces such a layer's input gradient in its backward (``LinearWithAsyncCommunication``, no copy
mapping in the forward at tp > 1) after casting it to ``reduce_dtype`` (fp32 by default), *into the cast*, and
then keeps the uncast tensor (``layers_utils.py`` 98-102, 135-138): with bf16 weights and the default, every
rank keeps its own partial input gradient and the layers below it train on wrong gradients. With
``reduce_dtype=bfloat16`` the cast is the tensor itself and the sum lands in it (in bf16). Under sequence
parallelism NxD keeps the fp32 reduce-scatter's result, so those layers keep the default.

NxD's ``parallel_cross_entropy`` subtracts each row's maximum from its input *in place*.
`cross_entropy` passes it the caller's logits (no copy: a vocabulary shard of fp32
logits is the largest activation of a step), so after a forward with labels the
model's ``logits`` are shifted per row wherever the loss saw them (a view of them when
the micro-batch is one sequence): softmax and argmax are unchanged, raw values are not.

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

import torch
from torch import Tensor, nn

from ..layers.factory import IGNORE_INDEX, LayerFactory
from ..layers.norms import RMSNorm
from ..neuron import import_neuron_module

FEATURE = "tensor parallelism on Trainium"
SEQUENCE_DIM = 1  # activations are batch-first (B, S, H)
SP_GRAD_ATTRIBUTE = "sequence_parallel_enabled"  # NxD's mark for gradients summed over tp
NXD_DTYPES = (torch.float32, torch.bfloat16)  # what NxD's ParallelEmbedding can hand out at tp > 1
NXD_LAYERS = ("ParallelEmbedding", "ColumnParallelLinear", "RowParallelLinear")


class NxDTensorParallelFactory(LayerFactory):
    """Layers from `neuronx_distributed.parallel_layers`, sharded over NxD's tensor-parallel group."""

    cross_entropy_writes_logits = True  # `parallel_cross_entropy`'s in-place `sub_` (loss_functions.py line 23, v2.28.0)

    def __init__(self, sequence_parallel: bool = False, dtype: torch.dtype = torch.float32) -> None:
        self.layers = import_neuron_module("neuronx_distributed.parallel_layers.layers", FEATURE)
        self.mappings = import_neuron_module("neuronx_distributed.parallel_layers.mappings", FEATURE)
        self.state = import_neuron_module("neuronx_distributed.parallel_layers.parallel_state", FEATURE)
        self.loss = import_neuron_module("neuronx_distributed.parallel_layers.loss_functions", FEATURE)
        self.tp_size = self.state.get_tensor_model_parallel_size()
        self.tp_rank = self.state.get_tensor_model_parallel_rank()
        self.sequence_parallel = bool(sequence_parallel)
        if self.tp_size > 1 and dtype not in NXD_DTYPES:
            raise ValueError(f"NxD's tensor-parallel layers hand out float32 or bfloat16 at tp > 1, not {dtype}")
        self.dtype = dtype

    def _sp_kwargs(self, sequence_parallel: bool) -> dict:
        """NxD's sequence-parallel arguments for a layer on the residual-stream boundary."""
        if not (self.sequence_parallel and sequence_parallel):
            return {}
        return {"sequence_parallel_enabled": True, "sequence_dimension": SEQUENCE_DIM}

    def column_linear(self, in_features: int, out_features: int, bias: bool = False, sequence_parallel: bool = True) -> nn.Module:
        sp = self._sp_kwargs(sequence_parallel)
        # Without sequence parallelism NxD all-reduces the input gradient in its backward into a copy cast to
        # reduce_dtype and drops that copy when the cast made one (layers_utils.py 98-102): only a reduce_dtype
        # equal to the weights' dtype reduces it. Under sequence parallelism NxD keeps the reduce-scatter's result.
        precision = {} if sp else {"reduce_dtype": self.dtype}
        return self.layers.ColumnParallelLinear(
            in_features, out_features, bias=bias, gather_output=False, dtype=self.dtype, **sp, **precision,
        )

    def row_linear(self, in_features: int, out_features: int, bias: bool = False, sequence_parallel: bool = True) -> nn.Module:
        return self.layers.RowParallelLinear(
            in_features, out_features, bias=bias, input_is_parallel=True, dtype=self.dtype,
            **self._sp_kwargs(sequence_parallel),
        )

    def embedding(self, num_embeddings: int, embedding_dim: int) -> nn.Module:
        return self.layers.ParallelEmbedding(num_embeddings, embedding_dim, dtype=self.dtype)

    def norm(self, dim: int, eps: float) -> nn.Module:
        norm = RMSNorm(dim, eps=eps)
        if self.sequence_parallel:
            setattr(norm.weight, SP_GRAD_ATTRIBUTE, True)
        return norm

    def gain(self, dim: int, init: float = 0.0) -> nn.Parameter:
        gain = super().gain(dim, init)
        if self.sequence_parallel:
            setattr(gain, SP_GRAD_ATTRIBUTE, True)
        return gain

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
        """Masked mean of NxD's per-row loss; NxD shifts `logits` in place (see the module docstring)."""
        keep = labels != IGNORE_INDEX
        losses = self.loss.parallel_cross_entropy(logits, labels.clamp(min=0))
        return (losses * keep).sum() / keep.sum().clamp(min=1)


def check_nxd_dtypes(model: nn.Module, dtype: torch.dtype) -> None:
    """ValueError unless every NxD layer of `model` was built for `dtype` and holds `dtype` weights.

    A model built for fp32 and cast to bf16 afterwards would run NxD's embedding output
    (the residual stream) in fp32 at tp > 1: build it with ``NxDTensorParallelFactory(dtype=...)``.
    """
    wrong = [f"{name} ({type(m).__name__}: built for {m.dtype}, weight {m.weight.dtype})"
             for name, m in model.named_modules()
             if type(m).__name__ in NXD_LAYERS and (m.dtype != dtype or m.weight.dtype != dtype)]
    if wrong:
        raise ValueError(f"NxD layers not in {dtype}: " + ", ".join(wrong[:3]) + (" ..." if len(wrong) > 3 else ""))
