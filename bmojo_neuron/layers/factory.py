"""The one place where layers with weights are created.

Model code never calls `nn.Linear` / `nn.Embedding` directly: it asks the active
`LayerFactory` for a *column*, *row* or *replicated* linear layer, or an
embedding. On one device all of them are plain torch layers; the parallel issue
swaps in a factory that returns tensor-parallel layers (NxD on Trainium,
`torch.distributed` elsewhere) with the same call sites, so the model code does
not change.

A factory is activated with `use_layer_factory(...)` around model construction,
which also works through `from_pretrained` (it builds the model with `cls(config)`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


class LayerFactory:
    """Single-device layers. Subclasses return sharded versions with the same API.

    `column_linear` splits its *output* features across tensor-parallel ranks,
    `row_linear` its *input* features (its output is reduced across ranks),
    `replicated_linear` is kept whole on every rank.
    """

    tp_size: int = 1

    def column_linear(self, in_features: int, out_features: int, bias: bool = False) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=bias)

    def row_linear(self, in_features: int, out_features: int, bias: bool = False) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=bias)

    def replicated_linear(self, in_features: int, out_features: int, bias: bool = False) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=bias)

    def embedding(self, num_embeddings: int, embedding_dim: int) -> nn.Module:
        return nn.Embedding(num_embeddings, embedding_dim)


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
