"""Test doubles of torch-xla (2.9) and NeuronX Distributed (NxD 0.17) for a machine without Neuron.

`install(monkeypatch)` puts fake modules under the real import names into
``sys.modules`` (``torch_xla.core.xla_model``, ``torch_xla.distributed.parallel_loader``,
``neuronx_distributed.trainer``, ``...parallel_layers.parallel_state`` ...), so
`bmojo_neuron.neuron.import_neuron_module` finds them as it would find the SDK.
They run one process (world 1, tensor-parallel size 1) on the CPU, with the
behaviour the Neuron trainer relies on, taken from the pinned sources
(``pytorch/xla`` v2.9.0, ``aws-neuron/neuronx-distributed`` v2.28.0):

- ``xm.mark_step`` calls ``torch_xla.sync``, which runs the queued step closures in
  order; ``MpDeviceLoader``'s per-device iterator calls ``torch_xla.sync`` before
  every batch it hands out (``batches_per_execution=1``); ``xm.rendezvous`` syncs too;
- the ``"xla"`` process-group backend (here gloo) comes with
  ``torch_xla.distributed.xla_backend``;
- ``neuronx_distributed_config`` fills the same defaults and initialises the
  parallel state when a process group exists; ``initialize_parallel_model`` builds
  through ``model_fn``, moves to the device, wraps in ``NxDModel`` and applies
  activation checkpointing with torch's ``CheckpointWrapper`` (whose parameter
  names carry ``_checkpoint_wrapped_module.``);
- ``initialize_parallel_optimizer`` wraps AdamW in ``NxDOptimizer`` (gradient
  clipping, ``grad_norm``) or, with ZeRO-1, in a ZeRO-1 optimizer holding fp32
  shards of every parameter in a ``base_optimizer`` (torch-xla's layout: dim 0 padded
  to a multiple of dp and chunked; with dp = 1 the shard is the whole tensor).
- Pipeline parallelism (``pipeline_parallel_size`` = world, tp = dp = 1): one stage
  per process over a gloo process group the caller creates; ``initialize_parallel_model``
  wraps the model in the ``NxDPPModel`` double of `nxd_pp_double` and ``NxDModel``
  speaks for the local stage (``named_parameters``, ``state_dict``, children);
  ``xm.all_reduce`` over the pipeline group and ``xm.rendezvous`` are real gloo
  collectives; the gradient norm sums the stages' squares and skips NxD's ``shared``
  parameters.

`XlaLog` records what a test checks: every sync (and whether training work was
pending), loader fetches, forwards, host copies made while a step was pending.
"""

from __future__ import annotations

import importlib.machinery
import sys
import types
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.fx
from torch import nn

import nxd_pp_double

PACKAGE_ROOT = str(Path(__file__).resolve().parents[1] / "bmojo_neuron")


@dataclass
class XlaLog:
    """What the doubles saw."""

    syncs: list[dict] = field(default_factory=list)  # {"source": "loader" | "code", "step_work", "forwards"}
    fetches: int = 0
    train_forwards: int = 0
    eval_forwards: int = 0
    step_work: bool = False  # a training forward ran since the last sync: a step graph is pending
    in_step: bool = False  # between a loader fetch and the next sync
    closures: list[Callable[[], None]] = field(default_factory=list)
    closures_run: int = 0
    violations: list[str] = field(default_factory=list)  # eval / host copies while a step was pending
    rendezvous: list[str] = field(default_factory=list)
    calls: dict[str, Any] = field(default_factory=dict)  # NxD calls: config kwargs, optimizer defaults ...
    rng: int = 0
    env: Any = None  # the `Env` of the doubles (set by `install`)
    _forwards: int = 0  # training forwards since the last sync

    def sync(self, source: str) -> None:
        """A ``mark_step`` from the loader, our code or NxD's pipeline (``"pipeline"``: the graphs NxD cuts
        inside ``run_train`` / ``run_eval``; the step stays pending until the caller's own mark_step)."""
        self.syncs.append({"source": source, "step_work": self.step_work, "forwards": self._forwards})
        if source == "pipeline":
            return
        self.step_work = self.in_step = False
        self._forwards = 0
        closures, self.closures = self.closures, []
        for closure in closures:  # after the graph ran, in the order they were added
            closure()
            self.closures_run += 1

    def step_syncs(self) -> list[dict]:
        return [s for s in self.syncs if s["step_work"]]


@dataclass
class Env:
    """What the torch-xla and NxD doubles share: the log, NxD's parallel grid and the gloo groups."""

    log: XlaLog
    grid: dict[str, int] = field(default_factory=dict)  # tp, pp, dp once NxD's parallel state is initialised
    groups: dict[tuple[int, ...], Any] = field(default_factory=dict)
    nxd_packages: list[types.ModuleType] = field(default_factory=list)  # NxD's own autowrap modules
    parallel_functions: list[Callable] = field(default_factory=list)  # NxD's PARALLEL_FUNCTIONS

    def rank(self) -> int:
        return dist.get_rank() if dist.is_initialized() else 0

    def pp_rank(self) -> int:
        return self.rank() if self.grid.get("pp", 1) > 1 else 0  # pp = world: the global rank is the stage

    def global_rank(self, pp_rank: int) -> int:
        return pp_rank

    def pp_groups(self) -> list[list[int]]:
        return [list(range(self.grid.get("pp", 1)))]

    def dp_groups(self) -> list[list[int]]:
        world = dist.get_world_size() if dist.is_initialized() else 1
        return [[r] for r in range(world)] if self.grid.get("pp", 1) > 1 else [list(range(world))]

    def group_of(self, ranks: list[int]) -> Any:
        """The gloo group of `ranks` (created on first use: every rank must ask, in the same order)."""
        key = tuple(sorted(ranks))
        if key not in self.groups:
            self.groups[key] = dist.new_group(list(key))
        return self.groups[key]

    def reduce(self, x: torch.Tensor, groups: Any, scale: float = 1.0) -> torch.Tensor:
        """``xm.all_reduce(REDUCE_SUM, x, scale, groups)``: over this rank's group of `groups` (world 1: x)."""
        mine = next((g for g in (groups or [[self.rank()]]) if self.rank() in g), [self.rank()])
        if len(mine) == 1:
            return x * scale
        out = x.detach().clone()
        dist.all_reduce(out, group=self.group_of(mine))
        return out * scale


def _module(name: str, **attrs: Any) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None, is_package=True)
    module.__path__ = []  # a package, so submodules resolve from sys.modules
    module.__dict__.update(attrs)
    return module


# --------------------------------------------------------------------------- torch_xla


def _xla_modules(env: Env) -> dict[str, types.ModuleType]:
    device, log = torch.device("cpu"), env.log

    def sync(wait: bool = False, reset_scope: bool = True) -> None:
        caller = sys._getframe(1).f_code
        log.sync("loader" if caller.co_filename == __file__ and caller.co_name == "__next__" else "code")

    def add_step_closure(closure: Callable, args: tuple = (), run_async: bool = False) -> None:
        log.closures.append(lambda a=args: closure(*a))

    def all_reduce(reduce_type: str, inputs: Any, scale: float = 1.0, groups: Any = None, pin_layout: bool = True):
        assert reduce_type == "sum", reduce_type
        return env.reduce(inputs, groups, scale)  # one replica per group but the pipeline's

    def all_gather(value: torch.Tensor, dim: int = 0, groups: Any = None, pin_layout: bool = True) -> torch.Tensor:
        return value.clone()  # one replica

    def set_rng_state(seed: int, device: Any = None) -> None:
        log.rng = int(seed)

    def rendezvous(tag: str, payload: bytes = b"", replicas: Any = ()) -> list[bytes]:
        sync()  # torch-xla 2.9's rendezvous syncs first (then exchanges payloads with collectives)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()
        log.rendezvous.append(tag)
        return [payload]

    xm = _module(
        "torch_xla.core.xla_model", REDUCE_SUM="sum", xla_device=lambda n=None, devkind=None: device,
        mark_step=lambda wait=False, reset_scope=True: sync(wait, reset_scope), add_step_closure=add_step_closure,
        all_reduce=all_reduce, all_gather=all_gather, rendezvous=rendezvous,
        get_rng_state=lambda device=None: log.rng, set_rng_state=set_rng_state,
        is_master_ordinal=lambda local=True: True,
    )

    class MpDeviceLoader:
        """``MpDeviceLoader(loader, device)``: batches on the device, ``torch_xla.sync()`` before each."""

        def __init__(self, loader: Any, device: torch.device, **kwargs: Any) -> None:
            self._loader, self._device = loader, device

        def __iter__(self) -> Iterator[Any]:
            return _PerDeviceLoader(iter(self._loader), log, sync)

        def __len__(self) -> int:
            return len(self._loader)

    def register_xla_backend() -> None:
        if "xla" not in dist.Backend.backend_list:
            def create(store, rank, size, timeout):
                return dist.ProcessGroupGloo(store, rank, size, timeout)
            dist.Backend.register_backend("xla", create, devices=["cpu"])

    register_xla_backend()
    runtime = _module("torch_xla.runtime", world_size=lambda: dist.get_world_size() if dist.is_initialized() else 1,
                      global_ordinal=lambda: dist.get_rank() if dist.is_initialized() else 0)
    return {
        "torch_xla": _module("torch_xla", __version__="2.9.0+double", sync=sync, device=lambda index=None: device,
                             runtime=runtime),
        "torch_xla.core": _module("torch_xla.core", xla_model=xm),
        "torch_xla.core.xla_model": xm,
        "torch_xla.runtime": runtime,
        "torch_xla.distributed": _module("torch_xla.distributed"),
        "torch_xla.distributed.parallel_loader": _module("torch_xla.distributed.parallel_loader",
                                                         MpDeviceLoader=MpDeviceLoader),
        "torch_xla.distributed.xla_backend": _module("torch_xla.distributed.xla_backend"),
    }


class _PerDeviceLoader:
    def __init__(self, batches: Iterator[Any], log: XlaLog, sync: Callable[..., None]) -> None:
        self.batches, self.log, self._sync = batches, log, sync

    def __iter__(self) -> _PerDeviceLoader:
        return self

    def __next__(self) -> Any:
        self._sync()  # torch-xla 2.9 PerDeviceLoader.next(): sync, then hand out the next batch
        batch = next(self.batches)
        self.log.fetches += 1
        self.log.in_step = True
        on_device = {k: v.to("cpu") for k, v in batch.items()}
        for tensor in on_device.values():
            setattr(tensor, nxd_pp_double.ON_DEVICE, True)  # NxD's pipeline refuses device batches
        return on_device


# --------------------------------------------------------------------------- neuronx_distributed


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


def _nxd_modules(env: Env) -> dict[str, types.ModuleType]:
    log, grid = env.log, env.grid

    def initialize_model_parallel(tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                                  **kwargs: Any) -> None:
        world = dist.get_world_size()  # needs the process group, as NxD
        tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
        assert tp == 1 and (pp == 1 and world == 1 or pp == world), "the doubles run tp = 1 and dp = 1"
        grid.update(tp=tp, pp=pp, dp=world // (tp * pp))
        if pp > 1:
            env.group_of(list(range(pp)))  # NxD creates its groups here, on every rank
        log.calls["initialize_model_parallel"] = log.calls.get("initialize_model_parallel", 0) + 1

    def destroy_model_parallel() -> None:
        grid.clear()
        env.groups.clear()

    state = _module(
        "neuronx_distributed.parallel_layers.parallel_state",
        initialize_model_parallel=initialize_model_parallel, model_parallel_is_initialized=lambda: bool(grid),
        destroy_model_parallel=destroy_model_parallel, get_tensor_model_parallel_size=lambda: grid.get("tp", 1),
        get_tensor_model_parallel_rank=lambda: 0, get_pipeline_model_parallel_size=lambda: grid.get("pp", 1),
        get_pipeline_model_parallel_rank=env.pp_rank, get_data_parallel_size=lambda: grid.get("dp", 1),
        get_data_parallel_rank=lambda: 0, get_data_parallel_replica_groups=env.dp_groups,
        get_pipeline_model_parallel_replica_groups=env.pp_groups,
        get_tensor_model_parallel_replica_groups=lambda: [[env.rank()]], is_global_rank_zero=lambda: env.rank() == 0,
    )

    def layer(kind: str, make: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        def build(*args: Any, **kwargs: Any) -> nn.Module:
            log.calls.setdefault("layers", []).append((kind, args, kwargs))
            return make(*args, **kwargs)
        return build

    def linear(i: int, o: int, bias: bool = True, **kwargs: Any) -> nn.Module:  # tp = 1: the whole layer
        return nn.Linear(i, o, bias=bias)

    layers = _module(
        "neuronx_distributed.parallel_layers.layers", ColumnParallelLinear=layer("column", linear),
        RowParallelLinear=layer("row", linear),
        ParallelEmbedding=layer("embedding", lambda n, d, **kw: nn.Embedding(n, d)),
    )
    def region(name: str) -> Callable[..., torch.Tensor]:
        def identity(x: torch.Tensor, **kwargs: Any) -> torch.Tensor:  # tp = 1
            _refuse_proxy(name, x)
            return x
        identity.__name__ = name
        return identity

    def parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        _refuse_proxy("parallel_cross_entropy", logits)
        return torch.nn.functional.cross_entropy(logits, labels, reduction="none")

    mappings = _module("neuronx_distributed.parallel_layers.mappings", **{name: region(name) for name in (
        "copy_to_tensor_model_parallel_region", "reduce_from_tensor_model_parallel_region",
        "gather_from_tensor_model_parallel_region", "scatter_to_sequence_parallel_region",
        "scatter_to_tensor_model_parallel_region")})
    loss_functions = _module("neuronx_distributed.parallel_layers.loss_functions",
                             parallel_cross_entropy=parallel_cross_entropy)

    def move_all_tensor_to_cpu(data: Any, convert: bool = True) -> Any:
        if log.step_work:
            log.violations.append(f"host copy while a step graph was pending ({_bmojo_caller()})")
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

    utils = _module("neuronx_distributed.parallel_layers.utils", move_all_tensor_to_cpu=move_all_tensor_to_cpu,
                    set_tensor_model_parallel_attributes=set_tensor_model_parallel_attributes)

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
            initialize_model_parallel(tensor_parallel_size, pipeline_parallel_size)
        return config

    def initialize_parallel_model(nxd_config: dict, model_fn: Callable, include_buffers: bool = False,
                                  *args: Any, **kwargs: Any) -> NxDModel:
        if not grid:
            initialize_model_parallel(nxd_config["tensor_parallel_size"], nxd_config["pipeline_parallel_size"])
        module = model_fn(*args, **kwargs).to(torch.device("cpu"))
        if nxd_config["pipeline_parallel_size"] > 1:  # as NxD: its pipeline wrapper, fed the pipeline_config
            pipeline = dict(nxd_config["pipeline_config"], param_init_fn=None, use_model_wrapper=True,
                            _delay_tracing=False)
            module = nxd_pp_double.NxDPPModel(env, module, **pipeline)
        model = NxDModel(module, nxd_config)
        model.register_forward_pre_hook(lambda m, args: _forward_seen(log, m.training))
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

    trainer = _module("neuronx_distributed.trainer", neuronx_distributed_config=neuronx_distributed_config,
                      initialize_parallel_model=initialize_parallel_model,
                      initialize_parallel_optimizer=initialize_parallel_optimizer)
    parallel_layers = _module("neuronx_distributed.parallel_layers", parallel_state=state, layers=layers,
                              mappings=mappings, loss_functions=loss_functions, utils=utils,
                              parallel_cross_entropy=parallel_cross_entropy,
                              **{k: v for k, v in vars(mappings).items() if not k.startswith("_")})
    package = _module("neuronx_distributed", __version__="0.17.0+double", trainer=trainer,
                      parallel_layers=parallel_layers)
    env.nxd_packages[:] = [package, parallel_layers]  # what NxD's trace adds to autowrap_modules (with math, xm)
    env.parallel_functions[:] = [parallel_cross_entropy, mappings.copy_to_tensor_model_parallel_region,
                                 mappings.gather_from_tensor_model_parallel_region,
                                 mappings.reduce_from_tensor_model_parallel_region,
                                 mappings.scatter_to_tensor_model_parallel_region]
    return {
        "neuronx_distributed": package,
        "neuronx_distributed.trainer": trainer,
        "neuronx_distributed.parallel_layers": parallel_layers,
        "neuronx_distributed.parallel_layers.parallel_state": state,
        "neuronx_distributed.parallel_layers.layers": layers,
        "neuronx_distributed.parallel_layers.mappings": mappings,
        "neuronx_distributed.parallel_layers.loss_functions": loss_functions,
        "neuronx_distributed.parallel_layers.utils": utils,
    }


def _forward_seen(log: XlaLog, training: bool) -> None:
    if training:
        log.train_forwards += 1
        log._forwards += 1
        log.step_work = True
    else:
        log.eval_forwards += 1
        if log.step_work:
            log.violations.append("an eval forward while a step graph was pending")


def _bmojo_caller() -> str:
    """The innermost bmojo_neuron frame on the stack ("file:line"), or "" when none."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_filename.startswith(PACKAGE_ROOT):
            return f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}"
        frame = frame.f_back
    return ""


# --------------------------------------------------------------------------- install


def _refuse_proxy(name: str, x: Any) -> None:
    """NxD's collectives are autograd Functions: traced through, an FX proxy reaches code that needs a tensor."""
    if isinstance(x, torch.fx.Proxy):
        raise RuntimeError(f"NxD's {name} was traced into (an FX proxy reached its autograd Function): pass its "
                           "module in the pipeline's autowrap_modules")


def install(monkeypatch: Any) -> XlaLog:
    """Put every double into ``sys.modules`` (undone with `monkeypatch`); returns their shared log.

    ``transformers.utils.fx`` is hidden, as in transformers 5 (NxD 0.17 imports it; see
    `bmojo_neuron.parallel.nxd_compat`), and whatever stands in for it is removed afterwards.
    """
    import transformers.utils

    env = Env(XlaLog())
    modules = {**_xla_modules(env), **_nxd_modules(env)}
    for name in ("torch_neuronx", "neuronxcc", "nki"):  # present and importable: the SDK "is installed"
        modules[name] = _module(name, __version__="double")
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setitem(sys.modules, "transformers.utils.fx", None)  # None: "not importable"
    monkeypatch.setattr(transformers.utils, "fx", None, raising=False)
    env.log.env = env
    return env.log


HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__")


@contextmanager
def host_reads_in_steps(log: XlaLog) -> Iterator[list[str]]:
    """Record every host read of a tensor value (``.item()``, ``.tolist()``, ``float()`` ...) made by
    bmojo_neuron code between a loader fetch and the step's sync: on XLA each one would run the graph early."""
    found: list[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def watch(name: str) -> Callable:
        original = originals[name]

        def read(self: torch.Tensor, *args: Any) -> Any:
            caller = sys._getframe(1)  # the code that asked for the value (torch internals do not count)
            if log.in_step and caller.f_code.co_filename.startswith(PACKAGE_ROOT):
                found.append(f"Tensor.{name} at {Path(caller.f_code.co_filename).name}:{caller.f_lineno}")
            return original(self, *args)
        return read

    for name in HOST_READS:
        setattr(torch.Tensor, name, watch(name))
    try:
        yield found
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
