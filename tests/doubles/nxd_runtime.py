"""A double of NxD 0.17's trainer (``aws-neuron/neuronx-distributed`` v2.28.0) for the Neuron training loop.

One process per rank on the CPU, tensor-parallel size 1, one data rank (with pipeline
parallelism, one stage per process over gloo):

- ``neuronx_distributed_config`` fills the same defaults and initialises the
  parallel state when a process group exists; ``initialize_parallel_model`` builds
  through ``model_fn``, moves to the device, wraps in ``NxDModel`` and applies
  activation checkpointing with torch's ``CheckpointWrapper`` (whose parameter
  names carry ``_checkpoint_wrapped_module.``);
- ``initialize_parallel_optimizer`` wraps AdamW in ``NxDOptimizer`` (gradient
  clipping, ``grad_norm``) or, with ZeRO-1, in a ZeRO-1 optimizer holding fp32
  shards of every parameter in a ``base_optimizer`` (torch-xla's layout: dim 0 padded
  to a multiple of dp and chunked; with dp = 1 the shard is the whole tensor);
- pipeline parallelism (``pipeline_parallel_size`` = world, tp = dp = 1):
  ``initialize_parallel_model`` wraps the model in the `doubles.nxd_pp` ``NxDPPModel``
  and ``NxDModel`` speaks for the local stage (``named_parameters``, ``state_dict``,
  children); the gradient norm sums the stages' squares over the pipeline group and
  skips NxD's ``shared`` parameters;
- ``parallel_layers`` is `doubles.nxd_api`'s (tp = 1) with the full ``parallel_state``
  and ``utils`` (``move_all_tensor_to_cpu``, ``set_tensor_model_parallel_attributes``).

Everything is recorded in the `XlaLog` of the `Env` given (``log.calls``: config
arguments, optimizer defaults, layers built; forwards; host copies while a step was pending).
"""

from __future__ import annotations

import types
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from . import nxd_api, nxd_pp
from .env import Env, bmojo_caller, fake_module


class NxDModel(nn.Module):
    """NxD 0.17's ``trainer.model.NxDModel``: forwards to its module; under pp it speaks for the local stage."""

    def __init__(self, module: nn.Module, nxd_config: dict) -> None:
        super().__init__()
        self.module, self.nxd_config = module, nxd_config
        self.pp_enabled = nxd_config["pipeline_parallel_size"] > 1
        if not self.pp_enabled:  # under pp, run_train / run_eval set the modes
            self.train()

    def local_modules(self) -> list[nn.Module]:
        return self.module.local_stage_modules if self.pp_enabled else [self.module]

    def original_module(self) -> nn.Module:
        return self.module.original_torch_module if self.pp_enabled else self.module

    def run_train(self, *args: Any, **kwargs: Any) -> Any:
        if self.pp_enabled:
            return self.module.run_train(*args, **kwargs)
        loss = self.forward(*args, **kwargs)
        loss.backward()
        return loss

    def run_eval(self, *args: Any, **kwargs: Any) -> Any:
        assert self.pp_enabled, "`run_eval` should be used only when pipeline parallel is enabled."
        return self.module.run_eval(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    # NxD's wrapper names everything as its module does (no "module." prefix); under pp, the local stage's
    def named_parameters(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, nn.Parameter]]:
        if self.pp_enabled:
            yield from self.module.local_named_parameters()
            return
        yield from self.module.named_parameters(*args, **kwargs)

    def named_buffers(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, torch.Tensor]]:
        yield from (self.module.local_named_buffers() if self.pp_enabled
                    else self.module.named_buffers(*args, **kwargs))

    def named_children(self) -> Iterator[tuple[str, nn.Module]]:
        yield from self.module.local_named_children() if self.pp_enabled else self.module.named_children()

    def named_modules(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, nn.Module]]:
        yield from (self.module.local_named_modules(*args, **kwargs) if self.pp_enabled
                    else self.module.named_modules(*args, **kwargs))

    def state_dict(self, *args: Any, **kwargs: Any) -> dict:
        if self.pp_enabled:
            return self.module.local_state_dict(*args, **kwargs)
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: dict, strict: bool = True) -> Any:
        return self.module.load_state_dict(state_dict, strict=strict)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)

    @property
    def config(self) -> Any:
        return self.original_module().config


def clip_global_norm(params: list[nn.Parameter], max_norm: float, env: Env) -> torch.Tensor:
    """NxD's gradient clipping (``parallel_layers.grads.clip_grad_norm``, as torch's ``clip_grad_norm_``
    computes it): the norm of every stage's gradients, a ``shared`` parameter (a later use of one
    Parameter by another stage) counted once, summed over the pipeline group."""
    if env.grid.get("pp", 1) == 1:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    grads = [p.grad for p in params if p.grad is not None]
    counted = [p.grad for p in params if p.grad is not None and not getattr(p, "shared", False)]
    norms = torch.stack([torch.linalg.vector_norm(g) for g in counted])
    total = env.reduce(norms.pow(2).sum(), env.pp_groups()).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef)
    return total


class NxDOptimizer(torch.optim.Optimizer):
    """NxD 0.17's ``trainer.optimizer.NxDOptimizer`` for dp = 1: clipping and ``grad_norm`` around an optimizer."""

    def __init__(self, optimizer: torch.optim.Optimizer, nxd_config: dict, env: Env) -> None:  # no super().__init__
        self.optimizer, self.nxd_config, self._grad_norm, self.env = optimizer, nxd_config, None, env
        self.params = [p for group in self.param_groups for p in group["params"]]

    grad_norm = property(lambda self: self._grad_norm)
    state = property(lambda self: self.optimizer.state)
    defaults = property(lambda self: self.optimizer.defaults)

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.optimizer.load_state_dict(state_dict)

    def zero_grad(self, set_to_none: bool = False) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Any = None) -> Any:
        config = self.nxd_config["optimizer_config"]
        if not config["zero_one_enabled"] and config["grad_clipping"]:  # (dp all-reduce: one replica)
            self._grad_norm = clip_global_norm(self.params, config["max_grad_norm"], self.env)
        result = self.optimizer.step(closure)
        if config["zero_one_enabled"]:
            self._grad_norm = self.optimizer.grad_norm
        return result


class Zero1Optimizer(torch.optim.Optimizer):
    """torch-xla 2.9's ``ZeroRedundancyOptimizer`` (as NxD's ``NeuronZero1Optimizer``) for one data rank."""

    def __init__(self, params: Any, optimizer_class: type, optimizer_dtype: Any = None, grad_clipping: bool = True,
                 max_norm: float | None = None, pin_layout: bool = True, sharding_groups: Any = None,
                 grad_norm_groups: Any = None, use_grad_acc_hook: bool = False, higher_cc_precision: bool = False,
                 save_master_weights: bool = False, env: Env | None = None, **defaults: Any) -> None:
        super().__init__(params, defaults)
        self.env = env
        self.optimizer_dtype = optimizer_dtype or torch.float32
        self.grad_clipping, self.max_norm = grad_clipping, 1.0 if max_norm is None else max_norm
        self.sharding_groups, self.local_world_size, self.local_rank = sharding_groups or [[0]], 1, 0
        self._grad_norm = None
        shard_groups = []
        for group in self.param_groups:
            shards = [nn.Parameter(p.detach().clone().to(self.optimizer_dtype)) for p in group["params"]]
            for p, shard in zip(group["params"], shards):
                if hasattr(p, "shared"):  # as NxD's ZeRO-1 copies it, for the gradient norm
                    shard.shared = p.shared
            shard_groups.append({**group, "params": shards})
        self.base_optimizer = optimizer_class(shard_groups, **defaults)

    grad_norm = property(lambda self: self._grad_norm)

    def _pairs(self) -> list[tuple[nn.Parameter, nn.Parameter]]:
        return [(p, s) for g, sg in zip(self.param_groups, self.base_optimizer.param_groups)
                for p, s in zip(g["params"], sg["params"])]

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        for group, shard_group in zip(self.param_groups, self.base_optimizer.param_groups):
            shard_group.update({k: v for k, v in group.items() if k != "params"})
        for param, shard in self._pairs():  # reduce-scatter of one replica: the gradient itself
            shard.grad = None if param.grad is None else param.grad.to(self.optimizer_dtype)
        shards = [s for _, s in self._pairs() if s.grad is not None]
        if self.grad_clipping:
            self._grad_norm = clip_global_norm(shards, self.max_norm, self.env)
        self.base_optimizer.step()
        self.base_optimizer.zero_grad(set_to_none=True)
        for param, shard in self._pairs():  # all-gather of one replica
            param.data.copy_(shard.data.to(param.dtype))


def nxd_modules(env: Env) -> dict[str, types.ModuleType]:
    """NxD's modules by import name, recording into ``env.log``."""
    initialize = _model_parallel_initializer(env)
    api = nxd_api.parallel_layers(env.log.calls.setdefault("layers", []), **_parallel_state(env, initialize))
    mappings, loss_functions = api[nxd_api.MAPPINGS], api[nxd_api.LOSS_FUNCTIONS]
    utils = _utils(env)
    trainer = _trainer(env, initialize)
    parallel_layers = fake_module("neuronx_distributed.parallel_layers", parallel_state=api[nxd_api.PARALLEL_STATE],
                                  layers=api[nxd_api.LAYERS], mappings=mappings, loss_functions=loss_functions,
                                  utils=utils, parallel_cross_entropy=loss_functions.parallel_cross_entropy,
                                  **{k: v for k, v in vars(mappings).items() if not k.startswith("_")})
    package = fake_module("neuronx_distributed", __version__="0.17.0+double", trainer=trainer,
                          parallel_layers=parallel_layers)
    env.nxd_packages[:] = [package, parallel_layers]  # what NxD's trace adds to autowrap_modules (with math, xm)
    env.parallel_functions[:] = [loss_functions.parallel_cross_entropy, mappings.copy_to_tensor_model_parallel_region,
                                 mappings.gather_from_tensor_model_parallel_region,
                                 mappings.reduce_from_tensor_model_parallel_region,
                                 mappings.scatter_to_tensor_model_parallel_region]
    return {
        "neuronx_distributed": package,
        nxd_api.TRAINER: trainer,
        "neuronx_distributed.parallel_layers": parallel_layers,
        **api,
        "neuronx_distributed.parallel_layers.utils": utils,
    }


def _model_parallel_initializer(env: Env) -> Callable[..., None]:
    """``parallel_state.initialize_model_parallel``: the grid (tp = 1, dp = 1) and, under pp, its gloo group."""
    def initialize_model_parallel(tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                                  **kwargs: Any) -> None:
        world = dist.get_world_size()  # needs the process group, as NxD
        tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
        assert tp == 1 and (pp == 1 and world == 1 or pp == world), "the doubles run tp = 1 and dp = 1"
        env.grid.update(tp=tp, pp=pp, dp=world // (tp * pp))
        if pp > 1:
            env.group_of(list(range(pp)))  # NxD creates its groups here, on every rank
        env.log.calls["initialize_model_parallel"] = env.log.calls.get("initialize_model_parallel", 0) + 1
    return initialize_model_parallel


def _parallel_state(env: Env, initialize: Callable[..., None]) -> dict[str, Callable]:
    """``parallel_state``'s functions beyond the tp = 1 basics of `nxd_api`, read from ``env.grid``."""
    grid = env.grid

    def destroy_model_parallel() -> None:
        grid.clear()
        env.groups.clear()

    return dict(
        initialize_model_parallel=initialize, model_parallel_is_initialized=lambda: bool(grid),
        destroy_model_parallel=destroy_model_parallel, get_tensor_model_parallel_size=lambda: grid.get("tp", 1),
        get_tensor_model_parallel_rank=lambda: 0, get_pipeline_model_parallel_size=lambda: grid.get("pp", 1),
        get_pipeline_model_parallel_rank=env.pp_rank, get_data_parallel_size=lambda: grid.get("dp", 1),
        get_data_parallel_rank=lambda: 0, get_data_parallel_replica_groups=env.dp_groups,
        get_pipeline_model_parallel_replica_groups=env.pp_groups,
        get_tensor_model_parallel_replica_groups=lambda: [[env.rank()]], is_global_rank_zero=lambda: env.rank() == 0,
    )


def _utils(env: Env) -> types.ModuleType:
    """``parallel_layers.utils``: host copies (recorded when a step graph is pending) and tensor attributes."""
    log = env.log

    def move_all_tensor_to_cpu(data: Any, convert: bool = True) -> Any:
        if log.step_work:
            log.violations.append(f"host copy while a step graph was pending ({bmojo_caller()})")
        if isinstance(data, torch.Tensor):
            return data.detach().to("cpu", copy=True)
        if isinstance(data, dict):
            return {k: move_all_tensor_to_cpu(v) for k, v in data.items()}
        if isinstance(data, (list, tuple)):
            return type(data)(move_all_tensor_to_cpu(v) for v in data)
        return data

    def set_tensor_model_parallel_attributes(tensor: torch.Tensor, is_parallel: bool, dim: int, stride: int,
                                             num_partitions: int = -1, rank_ordering: Any = None) -> None:
        for attribute in ("tensor_model_parallel", "partition_dim", "partition_stride"):
            assert not hasattr(tensor, attribute), attribute  # as NxD: never set twice
        tensor.tensor_model_parallel, tensor.partition_dim, tensor.partition_stride = is_parallel, dim, stride

    return fake_module("neuronx_distributed.parallel_layers.utils", move_all_tensor_to_cpu=move_all_tensor_to_cpu,
                       set_tensor_model_parallel_attributes=set_tensor_model_parallel_attributes)


def _trainer(env: Env, initialize: Callable[..., None]) -> types.ModuleType:
    """``neuronx_distributed.trainer``: config, model and optimizer initialisation."""
    log, grid = env.log, env.grid

    def neuronx_distributed_config(tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1,
                                   expert_parallel_size: int = 1, context_parallel_size: int = 1,
                                   pipeline_config: Any = None, optimizer_config: Any = None,
                                   activation_checkpoint_config: Any = None, pad_model: bool = False,
                                   sequence_parallel: bool = False, model_init_config: Any = None,
                                   lora_config: Any = None, mixed_precision_config: Any = None,
                                   sequential_move_factor: int = 11, lnc_size: int = 1) -> dict:
        config = dict(locals())
        log.calls["config"] = dict(config)
        optimizer_config = optimizer_config or {"zero_one_enabled": False, "grad_clipping": True, "max_grad_norm": 1.0}
        zero1 = optimizer_config["zero_one_enabled"]
        config.update(optimizer_config=optimizer_config, mixed_precision_config=mixed_precision_config or {
            "use_master_weights": zero1, "use_fp32_grad_acc": zero1, "use_master_weights_in_ckpt": False})
        if dist.is_initialized():
            initialize(tensor_parallel_size, pipeline_parallel_size)
        return config

    def initialize_parallel_model(nxd_config: dict, model_fn: Callable, include_buffers: bool = False,
                                  *args: Any, **kwargs: Any) -> NxDModel:
        if not grid:
            initialize(nxd_config["tensor_parallel_size"], nxd_config["pipeline_parallel_size"])
        module = model_fn(*args, **kwargs).to(torch.device("cpu"))
        if nxd_config["pipeline_parallel_size"] > 1:  # as NxD: its pipeline wrapper, fed the pipeline_config
            pipeline = dict(nxd_config["pipeline_config"], param_init_fn=None, use_model_wrapper=True,
                            _delay_tracing=False)
            module = nxd_pp.NxDPPModel(env, module, **pipeline)
        model = NxDModel(module, nxd_config)
        model.register_forward_pre_hook(lambda m, args: log.forward_seen(m.training))
        classes = nxd_config["activation_checkpoint_config"]
        if classes is not None:
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

            classes = tuple(classes) if isinstance(classes, (list, tuple)) else (classes,)
            for local in model.local_modules():  # NxD's own apply_activation_checkpointing wraps these
                apply_activation_checkpointing(local, check_fn=lambda m: isinstance(m, classes))
        return model

    def initialize_parallel_optimizer(nxd_config: dict, optimizer_class: type, parameters: Any,
                                      **defaults: Any) -> NxDOptimizer:
        log.calls["optimizer_defaults"] = dict(defaults)
        optimizer_config, precision = nxd_config["optimizer_config"], nxd_config["mixed_precision_config"]
        if optimizer_config["zero_one_enabled"]:
            extra = {"use_grad_acc_hook": True, "higher_cc_precision": True} if precision["use_fp32_grad_acc"] else {}
            optimizer = Zero1Optimizer(parameters, optimizer_class, grad_clipping=optimizer_config["grad_clipping"],
                                       pin_layout=False, sharding_groups=[[0]], grad_norm_groups=[[0]],
                                       save_master_weights=precision["use_master_weights_in_ckpt"], env=env,
                                       **extra, **defaults)
        else:
            if precision["use_master_weights"] or precision["use_fp32_grad_acc"]:
                raise RuntimeError("ZeRO-1 optimizer is not enabled, while `use_master_weights` is True.")
            optimizer = optimizer_class(parameters, **defaults)
        return NxDOptimizer(optimizer, nxd_config, env)

    return fake_module(nxd_api.TRAINER, neuronx_distributed_config=neuronx_distributed_config,
                       initialize_parallel_model=initialize_parallel_model,
                       initialize_parallel_optimizer=initialize_parallel_optimizer)
