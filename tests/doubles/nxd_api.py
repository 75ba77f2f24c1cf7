"""NxD 0.17's module API in one process at tensor-parallel size 1, for wiring tests.

`parallel_layers` plays ``neuronx_distributed.parallel_layers``'s ``layers``,
``mappings``, ``loss_functions`` and ``parallel_state`` modules (NxD tag v2.28.0): at
tp = 1 a parallel linear or embedding is the whole torch layer, every mapping is the
identity and ``parallel_cross_entropy`` is the per-token cross-entropy, so a model
built through NxD's layers computes what the one-device model does. Each layer built
is recorded as ``(kind, args, kwargs)``. NxD's mappings and loss are autograd
Functions, which cannot take an FX proxy: the doubles refuse one, so a pipeline trace
that does not keep them as leaf calls fails as it would with NxD.

`spy_trainer` plays ``neuronx_distributed.trainer`` as a recorder: it returns the
plain model and optimizer (no NxD wrappers), for tests of the arguments we pass; the
Neuron training loop's behavioural trainer is `doubles.nxd_runtime`.
"""

from __future__ import annotations

import types
from typing import Any, Callable

import torch
import torch.fx
from torch import nn

from .env import fake_module

LAYERS = "neuronx_distributed.parallel_layers.layers"
MAPPINGS = "neuronx_distributed.parallel_layers.mappings"
LOSS_FUNCTIONS = "neuronx_distributed.parallel_layers.loss_functions"
PARALLEL_STATE = "neuronx_distributed.parallel_layers.parallel_state"
TRAINER = "neuronx_distributed.trainer"
MAPPING_NAMES = ("copy_to_tensor_model_parallel_region", "reduce_from_tensor_model_parallel_region",
                 "gather_from_tensor_model_parallel_region", "scatter_to_sequence_parallel_region",
                 "scatter_to_tensor_model_parallel_region")


def refuse_proxy(name: str, x: Any) -> None:
    """NxD's collectives are autograd Functions: traced through, an FX proxy reaches code that needs a tensor."""
    if isinstance(x, torch.fx.Proxy):
        raise RuntimeError(f"NxD's {name} was traced into (an FX proxy reached its autograd Function): pass its "
                           "module in the pipeline's autowrap_modules")


def _identity_mapping(name: str) -> Callable[..., torch.Tensor]:
    def identity(x: torch.Tensor, **kwargs: Any) -> torch.Tensor:  # tp = 1
        refuse_proxy(name, x)
        return x
    identity.__name__ = name
    return identity


def parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    refuse_proxy("parallel_cross_entropy", logits)
    return torch.nn.functional.cross_entropy(logits, labels, reduction="none")


def parallel_layers(built: list[tuple[str, tuple, dict]], **state: Callable) -> dict[str, types.ModuleType]:
    """NxD's layers, mappings, loss_functions and parallel_state modules by import name (tp = 1, rank 0).

    Every layer built is appended to `built`; `state` adds functions to (or replaces them in)
    ``parallel_state``.
    """
    def layer(kind: str, make: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        def build(*args: Any, **kwargs: Any) -> nn.Module:
            built.append((kind, args, kwargs))
            return make(*args, **kwargs)
        return build

    def linear(i: int, o: int, bias: bool = True, **kwargs: Any) -> nn.Module:  # tp = 1: the whole layer
        return nn.Linear(i, o, bias=bias)

    layers = fake_module(LAYERS, ColumnParallelLinear=layer("column", linear), RowParallelLinear=layer("row", linear),
                         ParallelEmbedding=layer("embedding", lambda n, d, **kw: nn.Embedding(n, d)))
    mappings = fake_module(MAPPINGS, **{name: _identity_mapping(name) for name in MAPPING_NAMES})
    loss_functions = fake_module(LOSS_FUNCTIONS, parallel_cross_entropy=parallel_cross_entropy)
    parallel_state = fake_module(PARALLEL_STATE, **{"get_tensor_model_parallel_size": lambda: 1,
                                                    "get_tensor_model_parallel_rank": lambda: 0, **state})
    return {LAYERS: layers, MAPPINGS: mappings, LOSS_FUNCTIONS: loss_functions, PARALLEL_STATE: parallel_state}


def spy_trainer(calls: dict[str, Any]) -> types.ModuleType:
    """``neuronx_distributed.trainer`` recording into `calls`: ``"config"`` (the keyword arguments),
    ``"model"`` and ``"optimizer"`` (the arguments); it builds the plain model and optimizer."""
    def neuronx_distributed_config(**kwargs: Any) -> dict:
        calls["config"] = kwargs
        return dict(kwargs, expert_parallel_size=1)

    def initialize_parallel_model(nxd_cfg: dict, model_fn: Callable, *args: Any, **kwargs: Any) -> nn.Module:
        calls["model"] = (nxd_cfg, args, kwargs)
        return model_fn(*args, **kwargs)

    def initialize_parallel_optimizer(nxd_cfg: dict, optimizer_class: type, parameters: Any, **defaults: Any):
        calls["optimizer"] = (nxd_cfg, optimizer_class, parameters, defaults)
        if nxd_cfg["optimizer_config"]["zero_one_enabled"]:  # NxD's ZeRO-1 optimizer takes max_norm itself
            defaults = {k: v for k, v in defaults.items() if k != "max_norm"}
        return optimizer_class(parameters, **defaults)

    return fake_module(TRAINER, neuronx_distributed_config=neuronx_distributed_config,
                       initialize_parallel_model=initialize_parallel_model,
                       initialize_parallel_optimizer=initialize_parallel_optimizer)


def patch_imports(monkeypatch: Any, modules: dict[str, types.ModuleType], *users: types.ModuleType) -> None:
    """Point ``import_neuron_module`` of each bmojo_neuron module in `users` at `modules`."""
    for user in users:
        monkeypatch.setattr(user, "import_neuron_module", lambda name, feature: modules[name])
