"""NxD 0.17's module API in one process at tensor-parallel size 1, for wiring tests.

`parallel_layers` plays ``neuronx_distributed.parallel_layers``'s ``layers``,
``mappings``, ``loss_functions``, ``grads`` and ``parallel_state`` modules (NxD tag
v2.28.0) with `doubles.nxd_layers` over a one-rank group: at tp = 1 a parallel linear
or embedding computes what the whole torch layer does, every mapping is the identity
and ``parallel_cross_entropy`` is the per-token cross-entropy (shifting its input in
place, as NxD's does), so a model built through NxD's layers computes what the
one-device model does. Each layer built is recorded as ``(kind, args, keyword
arguments other than NxD's defaults)``.

`spy_trainer` plays ``neuronx_distributed.trainer`` as a recorder with NxD's exact
signatures: it fills the config's defaults as NxD does and returns the plain model and
optimizer (no NxD wrappers), for tests of the arguments we pass; the Neuron training
loop's behavioural trainer is `doubles.nxd_runtime`.
"""

from __future__ import annotations

import types
from typing import Any, Callable

from torch import nn

from . import nxd_layers
from .env import fake_module

LAYERS = "neuronx_distributed.parallel_layers.layers"
MAPPINGS = "neuronx_distributed.parallel_layers.mappings"
LOSS_FUNCTIONS = "neuronx_distributed.parallel_layers.loss_functions"
GRADS = "neuronx_distributed.parallel_layers.grads"
PARALLEL_STATE = "neuronx_distributed.parallel_layers.parallel_state"
TRAINER = "neuronx_distributed.trainer"
refuse_proxy = nxd_layers.refuse_proxy


def parallel_layers(built: list[tuple[str, tuple, dict]], **state: Callable) -> dict[str, types.ModuleType]:
    """NxD's layers, mappings, loss_functions, grads and parallel_state modules by import name (tp = 1, rank 0).

    Every layer built is appended to `built`; `state` adds functions to (or replaces them in)
    ``parallel_state``.
    """
    return nxd_layers.make(nxd_layers.SingleRank(), built, fake_module, **state)


def filled_config(given: dict[str, Any]) -> dict[str, Any]:
    """``neuronx_distributed_config``'s result for its arguments `given`: NxD's defaults filled in
    (``trainer/trainer.py``: optimizer, mixed-precision and model-init configs, each a dict or None)."""
    for key in ("optimizer_config", "mixed_precision_config", "model_init_config"):  # trainer.py 51, 73, 102
        assert given[key] is None or isinstance(given[key], dict), f"{key} must be a dict."
    optimizer_config = given["optimizer_config"]
    if optimizer_config is None:
        optimizer_config = {"zero_one_enabled": False, "grad_clipping": True, "max_grad_norm": 1.0}
    else:
        optimizer_config.setdefault("zero_one_enabled", False)
        optimizer_config.setdefault("grad_clipping", True)
        if optimizer_config["grad_clipping"]:
            optimizer_config.setdefault("max_grad_norm", 1.0)
    zero1 = optimizer_config["zero_one_enabled"]
    precision = given["mixed_precision_config"]
    if precision is None:
        precision = {"use_master_weights": zero1, "use_fp32_grad_acc": zero1, "use_master_weights_in_ckpt": False}
    else:
        precision.setdefault("use_master_weights", zero1)
        precision.setdefault("use_fp32_grad_acc", zero1)
        precision.setdefault("use_master_weights_in_ckpt", False)
    init = given["model_init_config"]
    if init is None:
        init = {"sequential_move_factor": given["sequential_move_factor"], "meta_device_init": False,
                "param_init_fn": None}
    else:
        init.setdefault("sequential_move_factor", given["sequential_move_factor"])
        init.setdefault("meta_device_init", False)
        if init["meta_device_init"] and "param_init_fn" not in init:
            raise ValueError("param_init_fn must be provided when meta_device_init is True")
    config = {k: v for k, v in given.items() if k != "sequential_move_factor"}
    config.update(optimizer_config=optimizer_config, mixed_precision_config=precision, model_init_config=init)
    return config


def spy_trainer(calls: dict[str, Any]) -> types.ModuleType:
    """``neuronx_distributed.trainer`` recording into `calls`: ``"config"`` (every argument),
    ``"model"`` and ``"optimizer"`` (the arguments); it builds the plain model and optimizer."""
    def neuronx_distributed_config(tensor_parallel_size=1, pipeline_parallel_size=1, expert_parallel_size=1,
                                   context_parallel_size=1, pipeline_config=None, optimizer_config=None,
                                   activation_checkpoint_config=None, pad_model=False, sequence_parallel=False,
                                   model_init_config=None, lora_config=None, mixed_precision_config=None,
                                   sequential_move_factor=11, lnc_size=1) -> dict:
        given = dict(locals())
        calls["config"] = dict(given)
        return filled_config(given)

    def initialize_parallel_model(nxd_config, model_fn, include_buffers: bool = False, *model_args,
                                  **model_kwargs) -> nn.Module:
        calls["model"] = (nxd_config, model_args, model_kwargs)
        return model_fn(*model_args, **model_kwargs)

    def initialize_parallel_optimizer(nxd_config, optimizer_class, parameters, **defaults):
        calls["optimizer"] = (nxd_config, optimizer_class, parameters, defaults)
        if nxd_config["optimizer_config"]["zero_one_enabled"]:  # NxD's ZeRO-1 optimizer takes max_norm itself
            defaults = {k: v for k, v in defaults.items() if k != "max_norm"}
        return optimizer_class(parameters, **defaults)

    return fake_module(TRAINER, neuronx_distributed_config=neuronx_distributed_config,
                       initialize_parallel_model=initialize_parallel_model,
                       initialize_parallel_optimizer=initialize_parallel_optimizer)


def patch_imports(monkeypatch: Any, modules: dict[str, types.ModuleType], *users: types.ModuleType) -> None:
    """Point ``import_neuron_module`` of each bmojo_neuron module in `users` at `modules`."""
    for user in users:
        monkeypatch.setattr(user, "import_neuron_module", lambda name, feature: modules[name])
