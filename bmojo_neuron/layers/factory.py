"""The one place where layers with weights are created.

Model code never calls `nn.Linear` / `nn.Embedding` directly: it asks the active
`LayerFactory` for a *column*, *row* or *replicated* linear layer, an embedding or
a residual-stream norm, and calls the factory's few collectives (`all_reduce`,
`scatter_sequence`, `gather_vocab`, `cross_entropy`). On one device all of them
are plain torch layers and identities; a tensor-parallel factory
(`bmojo_neuron.parallel`) returns sharded layers with the same call sites, so the
model code does not change.

A factory is activated with `use_layer_factory(...)` around model construction,
which also works through `from_pretrained` (it builds the model with `cls(config)`).
Modules keep a reference to the factory they were built with.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .norms import RMSNorm

IGNORE_INDEX = -100


class TensorParallelSplitError(ValueError):
    """A model config field whose size the tensor-parallel degree does not divide.

    It carries the `BMojoConfig` field name, so a caller that built the config from a recipe can name the
    recipe keys (``model.<field>``, ``parallel.tp``) instead.
    """

    def __init__(self, field: str, value: int, tp: int) -> None:
        super().__init__(f"{field} ({value}) must be divisible by the tensor-parallel size ({tp})")
        self.field, self.value, self.tp = field, value, tp


def check_tp_split(field: str, value: int, tp: int) -> None:
    """`TensorParallelSplitError` unless `tp` divides config field `field` (of size `value`)."""
    if value % tp:
        raise TensorParallelSplitError(field, value, tp)


class LayerFactory:
    """Single-device layers. Subclasses return sharded versions with the same API.

    `column_linear` splits its *output* features across tensor-parallel ranks,
    `row_linear` its *input* features (its output is summed across ranks),
    `replicated_linear` is kept whole on every rank. `sequence_parallel=False` marks
    a layer that is not on the residual-stream boundary (its input/output always
    hold the whole sequence, even with sequence parallelism).
    """

    tp_size: int = 1
    tp_rank: int = 0
    sequence_parallel: bool = False
    # Whether `cross_entropy` writes into its logits argument: `causal_lm_loss` then hands it a
    # copy of the scored positions instead of all the logits with an ignored last target.
    cross_entropy_writes_logits: bool = False

    def column_linear(self, in_features: int, out_features: int, bias: bool = False, sequence_parallel: bool = True) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=bias)

    def row_linear(self, in_features: int, out_features: int, bias: bool = False, sequence_parallel: bool = True) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=bias)

    def replicated_linear(self, in_features: int, out_features: int, bias: bool = False) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=bias)

    def embedding(self, num_embeddings: int, embedding_dim: int) -> nn.Module:
        return nn.Embedding(num_embeddings, embedding_dim)

    def norm(self, dim: int, eps: float) -> nn.Module:
        """An RMSNorm on the residual stream (sequence-sharded under sequence parallelism)."""
        return RMSNorm(dim, eps=eps)

    def gain(self, dim: int, init: float = 0.0) -> nn.Parameter:
        """A per-channel gain on the residual stream, initialised at `init` and kept out of weight decay.

        Replicated on every rank; under sequence parallelism it scales this rank's part of
        the sequence, so the subclasses mark it for the gradient sum over ranks, as a norm's weight.
        """
        gain = nn.Parameter(torch.full((dim,), float(init)))
        gain._no_weight_decay = True
        return gain

    # ------------------------------------------------------------------ collectives
    def share_across_tp(self, x: Tensor) -> Tensor:
        """`x` (whole on every rank) feeds every rank's shard: identity; backward sums the
        gradients over ranks. Column-parallel layers do this to their input themselves."""
        return x

    def all_reduce(self, x: Tensor) -> Tensor:
        """Sum over tensor-parallel ranks (backward: identity, the loss being replicated)."""
        return x

    def scatter_sequence(self, x: Tensor) -> Tensor:
        """Enter the sequence-parallel region: keep this rank's slice of the sequence (dim 1)."""
        return x

    def gather_vocab(self, logits: Tensor) -> Tensor:
        """Full-vocabulary logits from this rank's vocabulary shard."""
        return logits

    def cross_entropy(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Mean cross-entropy of logits (N, V_local) against labels (N,), ignoring -100."""
        return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)


_active_factory: LayerFactory = LayerFactory()


def get_layer_factory() -> LayerFactory:
    """The factory model constructors use right now."""
    return _active_factory


@contextlib.contextmanager
def use_layer_factory(factory: LayerFactory) -> Iterator[LayerFactory]:
    """Build models inside this block with `factory`'s layers."""
    global _active_factory
    previous, _active_factory = _active_factory, factory
    try:
        yield factory
    finally:
        _active_factory = previous
