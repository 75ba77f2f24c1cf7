"""A double of NxD 0.17's trainer (``aws-neuron/neuronx-distributed`` v2.28.0) for the Neuron training loop.

One process per rank on the CPU, over gloo, any tensor-, pipeline- and data-parallel degrees NxD builds (one
pipeline stage per process, several tensor-parallel ranks to a stage when tp > 1):

- every callable has NxD's (or torch-xla's) exact signature (``tests/test_doubles.py``);
- ``neuronx_distributed_config`` fills the same defaults and initialises the
  parallel state when a process group exists, with NxD's checks (``parallel_state.py``:
  a process group, degrees clipped to the world, the world divisible by tp x pp) and NxD's
  replica groups (`nxd_replica_groups`: trn1's strided tp = 4 and its refusals too); the
  ``parallel_state`` getters, ZeRO-1 and ``NxDPPModel`` assert that it was initialised; ``initialize_parallel_model`` builds
  through ``model_fn``, moves to the device in NxD's waves of
  ``sequential_move_factor`` local ranks (a rendezvous after each wave; each parameter and buffer a new object,
  with only NxD's attributes and ties put back, `doubles.nxd_move`), wraps in
  ``NxDModel`` and applies NxD's activation checkpointing: an ``NxDCheckpointWrapper``
  (parameter names carry ``_checkpoint_wrapped_module.``, module names do not) running
  torch-xla's *reentrant* checkpoint (no keyword arguments; parameter gradients only
  flow when an input requires grad; the wrapped forward runs again in backward);
- ``initialize_parallel_optimizer`` wraps AdamW in ``NxDOptimizer`` (the sequence-parallel
  sum when the config asks for it, gradient clipping, ``grad_norm``) or, with ZeRO-1, in a ZeRO-1 optimizer holding fp32
  shards of every parameter in a ``base_optimizer`` (torch-xla's layout: dim 0 padded
  to a multiple of dp and chunked; with dp = 1 the shard is the whole tensor), stepped as torch-xla steps it:
  reduce-scatter of the gradients over the data groups, NxD's gradient norm, AdamW on the shards, all-gather
  of the weights (each coalesced collective traced once into the update graph); it refuses parameters NxD
  did not move to the device, as NxD does. With
  ``use_fp32_grad_acc`` (bf16 + ZeRO-1) its gradient-accumulation hooks move each
  gradient into an fp32 ``main_grad`` of the parameter's full shape as backward
  produces it and set ``param.grad`` to None; ``zero_grad`` zeroes ``main_grad``.
  The environment switches NxD's optimizer set-up reads are honoured as there:
  ``XLA_DOWNCAST_BF16=1`` with master weights makes the shards float64,
  ``XLA_DOWNCAST_BF16=0`` with master weights halves the bucket caps and
  ``ALL_GATHER_REDUCE_SCATTER_BUCKET_CAP_MB`` sets them (``zero1_bucket_cap``);
- pipeline parallelism (``pipeline_parallel_size`` × tp × dp = world):
  ``initialize_parallel_model`` wraps the model in the `doubles.nxd_pp` ``NxDPPModel``
  and ``NxDModel`` speaks for the local stage (``named_parameters``, ``state_dict``,
  children); the gradient norm sums the stages' squares over the pipeline group and
  skips NxD's ``shared`` parameters;
- without ZeRO-1, ``NxDOptimizer.step`` reduces the gradients over the data groups in NxD's buckets
  (`bucket_allreduce_gradients`) and clips with NxD's norm (`clip_global_norm`: over the tensor and pipeline
  groups); it refuses an optimizer state left on the host (`xla_host.check_states_on_device`);
- ``parallel_layers`` is `doubles.nxd_layers`' over this rank's tensor-parallel group (`nxd_layers.GridGroup`)
  with the full ``parallel_state``
  and ``utils`` (``move_all_tensor_to_cpu``: host copies of the device tensors, the host tensors handed back
  as aliases of themselves; ``set_tensor_model_parallel_attributes``, which warns as NxD does when
  ``num_partitions`` is left out).

Everything is recorded in the `XlaLog` of the `Env` given (``log.calls``: config
arguments, optimizer defaults, layers built; forwards; host copies while a step was pending).
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import os
import types
import warnings
from collections import namedtuple
from functools import partial
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    _CHECKPOINT_PREFIX,
    CheckpointImpl,
    CheckpointWrapper,
    apply_activation_checkpointing,
)

from . import nxd_api, nxd_layers, nxd_pp
from .env import ON_XLA_DEVICE, DeviceRandomOps, Env, bmojo_caller, fake_module
from .xla import local_ordinal, local_process_count, reentrant_checkpoint
from .nxd_move import move_model_to_device
from .xla_host import (HOST, MADE_ON_HOST, LoadedOnHost, check_states_on_device, hold_on_host,
                       mark_attributes_left_on_the_host, mark_steps_on_host, on_host)


class NxDModel(nn.Module):
    """NxD 0.17's ``trainer.model.NxDModel``: forwards to its module; under pp it speaks for the local stage.
    What runs inside it runs on the XLA device: its random ops step torch-xla's seed (`DeviceRandomOps`)."""

    env: Env  # set on the class `nxd_modules` binds

    def __init__(self, module, nxd_config):
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
            with DeviceRandomOps(self.env.log):
                return self.module.run_train(*args, **kwargs)
        loss = self.forward(*args, **kwargs)
        loss.backward()
        return loss

    def run_eval(self, *args: Any, **kwargs: Any) -> Any:
        assert self.pp_enabled, "`run_eval` should be used only when pipeline parallel is enabled."
        with DeviceRandomOps(self.env.log):
            return self.module.run_eval(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with DeviceRandomOps(self.env.log):
            return self.module(*args, **kwargs)

    # NxD's wrapper names everything as its module does (no "module." prefix); under pp, the local stage's
    def named_parameters(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, nn.Parameter]]:
        if self.pp_enabled:
            yield from self.module.local_named_parameters(*args, **kwargs)
            return
        yield from self.module.named_parameters(*args, **kwargs)

    def named_buffers(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, torch.Tensor]]:
        yield from (self.module.local_named_buffers(*args, **kwargs) if self.pp_enabled
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

    def load_state_dict(self, state_dict, strict=True):
        return self.module.load_state_dict(state_dict, strict=strict)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)

    # NxD's transformers.PreTrainedModel properties (trainer/model.py at v2.28.0): the original module's
    @property
    def dtype(self) -> Any:
        return self.original_module().dtype

    @property
    def config(self) -> Any:
        return self.original_module().config

    @property
    def name_or_path(self) -> Any:
        return self.original_module().name_or_path


def clip_global_norm(params: list[nn.Parameter], max_norm: float, env: Env,
                     zero1_groups: list[list[int]] | None = None) -> torch.Tensor:
    """NxD's gradient clipping, norm type 2 (``parallel_layers/grads.py`` ``get_grad_norm`` 41-189 with its default
    ``force_spmd=True``, ``clip_grads_with_norm`` 238-256 at v2.28.0). The squares of the gradient norms are added,
    one after the other, into a one-element tensor of the *first parameter's* dtype (a bf16 model's norm is summed
    in bf16), a ``shared`` parameter (a later use of one Parameter by another stage) skipped: first those of the
    parameters without ``tensor_model_parallel`` (every tensor rank holds them whole), that sum divided by tp,
    then those of the tensor-parallel shards (145-184). The sum is all-reduced over the tensor-parallel group when
    tp > 1 and over the pipeline group when pp > 1 (torch.distributed on the "xla" group: an ``xm.all_reduce``),
    then, for ZeRO-1, over its sharding groups (`zero1_groups`, 111-117); its square root taken, and every gradient
    scaled by max_norm / (norm + 1e-6) where that is below 1. Returns the norm, shape (1,)."""
    first, grid = params[0], env.grid
    total = torch.zeros(1, dtype=first.dtype, device=first.device)
    counted = [p for p in params if p.grad is not None and not getattr(p, "shared", False)]
    sharded = [getattr(p, "tensor_model_parallel", False) for p in counted]
    for p in (p for p, tp_param in zip(counted, sharded) if not tp_param):
        total += torch.norm(p.grad.detach(), 2.0) ** 2.0
    total /= grid.get("tp", 1)
    for p in (p for p, tp_param in zip(counted, sharded) if tp_param):
        total += torch.norm(p.grad.detach(), 2.0) ** 2.0
    if grid.get("tp", 1) > 1:
        total = env.reduce(total, env.replica_groups["tp"])
    if grid.get("pp", 1) > 1:
        total = env.reduce(total, env.pp_groups())
    if zero1_groups is not None:  # NxD's comm.all_reduce: xm.all_reduce of [total] in place
        env.all_reduce("sum", [total], groups=zero1_groups, pin_layout=True)
    total = torch.pow(total, 0.5)
    coeff = max_norm / (total + 1.0e-6)
    one = torch.tensor(1.0, dtype=total.dtype, device=total.device)
    for p in params:
        if p.grad is not None:
            p.grad.detach().mul_(torch.where(coeff < 1, coeff.to(total.dtype), one))
    return total


def bucket_allreduce_gradients(gradients: list[torch.Tensor], env: Env) -> None:
    """NxD's data-parallel gradient reduction (``parallel_layers/grads.py`` ``bucket_allreduce_gradients`` 259-327
    at v2.28.0): per dtype, last gradient first, each divided by dp in place, then summed in place over the
    data-parallel groups in buckets of ``ALLREDUCE_BUCKET_CAP_MB`` (512 MB; read at every call, ``int()`` of it): a
    gradient over the cap alone, after flushing the bucket before it. Each bucket is one coalesced
    ``xm.all_reduce`` (``comm.all_reduce`` 200-220), which torch-xla skips with one replica in the world."""
    cap = int(os.environ.get("ALLREDUCE_BUCKET_CAP_MB", 512)) * 1024 * 1024
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for grad in gradients:
        by_dtype.setdefault(grad.dtype, []).append(grad)
    groups, size = env.dp_groups(), env.grid.get("dp", 1)
    for same_dtype in by_dtype.values():
        bucket, total = [], 0
        for grad in reversed(same_dtype):
            grad.data /= size
            nbytes = grad.numel() * grad.element_size()
            if nbytes > cap:
                if bucket:
                    env.all_reduce("sum", bucket, groups=groups)
                    bucket, total = [], 0
                env.all_reduce("sum", [grad], groups=groups)
                continue
            total += nbytes
            if total > cap:
                env.all_reduce("sum", bucket, groups=groups)
                bucket, total = [], nbytes
            bucket.append(grad)
        if bucket:
            env.all_reduce("sum", bucket, groups=groups)


def coalescing_buckets(tensors: list[torch.Tensor], cap_mb: int) -> list[list[int]]:
    """torch-xla 2.9's ``CoalescingBuckets`` (core/xla_model.py 596-671): the indices of `tensors` each coalesced
    collective takes. A tensor over the cap joins a bucket under half the cap when both stay within twice the cap,
    and that bucket goes at once; otherwise a bucket goes before the tensor that would take it over the cap."""
    cap, buckets, bucket, total = cap_mb * 1024 * 1024, [], [], 0
    for index, tensor in enumerate(tensors):
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes > cap and total < 0.5 * cap and total + nbytes <= 2 * cap:
            buckets.append(bucket + [index])
            bucket, total = [], 0
            continue
        if total + nbytes > cap and bucket:
            buckets.append(bucket)
            bucket, total = [], 0
        bucket.append(index)
        total += nbytes
    return buckets + ([bucket] if bucket else [])


class NxDOptimizer(torch.optim.Optimizer):
    """NxD 0.17's ``trainer.optimizer.NxDOptimizer`` (trainer/optimizer.py at v2.28.0): the data-parallel
    reduction, clipping, ``grad_norm`` and the sequence-parallel all-reduce around an optimizer it speaks for (``state``,
    ``param_groups``, ``defaults`` read and set through, ``add_param_group``, pickling state)."""

    env: Env  # set on the class `nxd_modules` binds
    grads: types.ModuleType  # NxD's ``parallel_layers.grads`` (bound with it)

    def __init__(self, optimizer, nxd_config):  # no super().__init__, as NxD
        self.optimizer, self.nxd_config, self._grad_norm = optimizer, nxd_config, None
        self.params = [p for group in self.param_groups for p in group["params"]]

    def __repr__(self) -> str:
        return f"NxDOptimizer({self.optimizer!r})"

    grad_norm = property(lambda self: self._grad_norm)

    # optimizer.py 30-55: read and written through to the wrapped optimizer
    @property
    def state(self) -> Any:
        return self.optimizer.state

    @state.setter
    def state(self, state: Any) -> None:
        self.optimizer.state = state

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, param_groups: list[dict]) -> None:
        self.optimizer.param_groups = param_groups

    @property
    def defaults(self) -> dict:
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, defaults: dict) -> None:
        self.optimizer.defaults = defaults

    def add_param_group(self, param_group):
        self.optimizer.add_param_group(param_group)  # NxD's ``params`` list stays as built

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.optimizer.load_state_dict(state_dict)

    def zero_grad(self, set_to_none=False):
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def __getstate__(self):  # optimizer.py 68-72: the wrapped optimizer's (NxD's grads read param_groups there)
        return self.optimizer.__getstate__()

    def __setstate__(self, state):
        self.optimizer.__setstate__(state)

    def _fetch_gradients(self) -> list[torch.Tensor]:
        """optimizer.py 101-120: each parameter's gradient, or the ZeRO-1 hooks' ``main_grad`` when they took it,
        in the wrapped optimizer's group order (no expert parallelism here)."""
        found = []
        for group in self.optimizer.__getstate__()["param_groups"]:
            for p in group["params"]:
                if p.grad is not None:
                    found.append(p.grad.data)
                elif hasattr(p, "main_grad"):
                    found.append(p.main_grad.data)
        return found

    def step(self, closure=None):
        """optimizer.py 122-147: the sequence-parallel gradients summed over the tensor-parallel group when the
        config says ``sequence_parallel``; without ZeRO-1 the data-parallel reduction (`bucket_allreduce_gradients`)
        and clipping (`clip_global_norm`); the wrapped optimizer's step."""
        self.env.log.trace("optimizer_step", len(self.params))
        self.env.log.update_traced = True  # the step's checks last until the sync after this (`XlaLog.sync`)
        check_states_on_device(self.optimizer)
        if self.nxd_config["sequence_parallel"]:
            self.grads.allreduce_sequence_parallel_gradients(self)
        config = self.nxd_config["optimizer_config"]
        if not config["zero_one_enabled"]:
            bucket_allreduce_gradients(self._fetch_gradients(), self.env)
            if config["grad_clipping"]:
                self._grad_norm = clip_global_norm(self.params, config["max_grad_norm"], self.env)
        result = self.optimizer.step(closure=closure)
        mark_steps_on_host(self.optimizer)
        if config["zero_one_enabled"]:
            self._grad_norm = self.optimizer.grad_norm
        return result


class Zero1Optimizer(torch.optim.Optimizer):
    """torch-xla 2.9's ``ZeroRedundancyOptimizer`` (distributed/zero_redundancy_optimizer.py) as NxD's
    ``NeuronZero1Optimizer`` (optimizer/zero_redundancy_optimizer.py at v2.28.0) subclasses it, sharded over the
    data-parallel groups NxD's trainer passes."""

    env: Env  # set on the class `nxd_modules` binds

    def __init__(self, params, optimizer_class, optimizer_dtype=None, grad_clipping=True, max_norm=None,
                 pin_layout=True, sharding_groups=None, grad_norm_groups=None, lazy_init=False,
                 bucket_cap_mb_all_gather=0, bucket_cap_mb_reduce_scatter=0, use_grad_acc_hook=False,
                 save_master_weights=False, higher_cc_precision=False, **defaults):
        if not self.env.grid:  # NxD's NeuronZero1Optimizer.__init__ (optimizer/zero_redundancy_optimizer.py 32)
            raise RuntimeError("initialize_model_parallel need to be called before creating NeuronZero1Optimizer")
        if lazy_init:
            raise NotImplementedError("the ZeRO-1 double does not model lazy_init")
        if not save_master_weights:  # torch-xla's constructor, every time (86-89)
            logging.warning("Not saving master weights may have accuracy issues when resuming training!")
        super().__init__(params, defaults)
        self.optimizer_dtype = optimizer_dtype if optimizer_dtype is not None else torch.float32
        self.grad_clipping, self.max_norm = grad_clipping, 1.0 if max_norm is None else max_norm
        self.pin_layout, self.save_master_weights = pin_layout, save_master_weights
        # NxD's default: its data-parallel replica groups (36-37)
        self._sharding_groups = sharding_groups or self.env.dp_groups()
        self._grad_norm_groups = grad_norm_groups
        self.local_world_size, self.local_rank = self._local_rank()
        self.use_grad_acc_hook, self.higher_cc_precision = use_grad_acc_hook, higher_cc_precision
        # torch-xla coalesces its collectives when a bucket cap is set (105-108)
        self.bucket_cap_mb_all_gather, self.bucket_cap_mb_reduce_scatter = (bucket_cap_mb_all_gather,
                                                                            bucket_cap_mb_reduce_scatter)
        self.grad_acc_hooks: list[Any] = []
        self._grad_norm = None
        self._check_one_xla_device()
        shard_groups = []
        for group in self.param_groups:
            shards = [nn.Parameter(self._shard_tensor(p.detach()).clone().to(self.optimizer_dtype),
                                   requires_grad=p.requires_grad) for p in group["params"]]
            for p, shard in zip(group["params"], shards):
                if use_grad_acc_hook:
                    self._register_hook(p, shard)
            shard_groups.append({**group, "params": shards})
        self.base_optimizer = optimizer_class(shard_groups, **defaults)

    grad_norm = property(lambda self: self._grad_norm)
    sharding_groups = property(lambda self: self._sharding_groups)

    def _check_one_xla_device(self) -> None:
        """``_shard_parameters`` (torch-xla 234-247) asserts that every parameter is on one device, an XLA one;
        NxD turns that AssertionError into its RuntimeError (58-69). On the double a parameter is on the XLA
        device once NxD's ``initialize_parallel_model`` moved it (`_move_in_waves` marks it): a parameter of
        another stage, or one made after the move, is not."""
        if not all(getattr(p, ON_XLA_DEVICE, False) for group in self.param_groups for p in group["params"]):
            raise RuntimeError("To use NeuronZero1Optimizer, all parameters passed in should on the same XLA device."
                               "If you are using pipeline parallel, use `model.local_parameters` or "
                               "`model.local_named_parameters`.")

    def _local_rank(self) -> tuple[int, int]:
        """``init_zero`` (torch-xla zero_redundancy_optimizer.py 121-134): the shard count is the first group's
        size, this rank's index in the group holding it; a rank in no group is a ValueError."""
        rank, local = self.env.rank(), None
        for group in self._sharding_groups:
            if rank in group:
                local = list(group).index(rank)
        if local is None:
            raise ValueError(f"Current rank {rank} is missing from the sharding_groups {self._sharding_groups}")
        return len(self._sharding_groups[0]), local

    def _pad(self, tensor: torch.Tensor) -> torch.Tensor:
        """``_pad_to_world_size`` (183-189): dim 0 padded to a multiple of the shard count; ``tensor.size(0)``
        makes a 0-dim parameter an IndexError there, as here."""
        if tensor.size(0) % self.local_world_size != 0:
            pad = self.local_world_size - tensor.size(0) % self.local_world_size
            tensor = F.pad(tensor, [0, 0] * (tensor.dim() - 1) + [0, pad])
        return tensor

    def _shard_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """``_shard_tensor`` (191-197): this rank's chunk of the padded tensor."""
        return self._pad(tensor).chunk(self.local_world_size)[self.local_rank]

    def _register_hook(self, param: nn.Parameter, shard: nn.Parameter) -> None:
        """torch-xla's gradient-accumulation hook (199-226): on the parameter's grad accumulator, after each
        accumulation the gradient moves into an fp32 ``main_grad`` of the parameter's full shape and ``param.grad``
        is freed."""
        def move_to_main_grad(*unused: Any) -> None:
            if param.grad is not None:
                if not hasattr(shard, "main_grad"):
                    shard.main_grad = torch.zeros(param.shape, dtype=self.optimizer_dtype, device=param.device)
                    param.main_grad = shard.main_grad
                shard.main_grad.add_(param.grad.data.to(self.optimizer_dtype))
                param.grad = None

        if not param.requires_grad:
            return
        accumulator = param.expand_as(param).grad_fn.next_functions[0][0]
        self.grad_acc_hooks.append(accumulator.register_hook(move_to_main_grad))
        self._accumulators = getattr(self, "_accumulators", []) + [accumulator]  # keep them alive, as torch-xla

    def _pairs(self) -> list[tuple[nn.Parameter, nn.Parameter]]:
        return [(p, s) for g, sg in zip(self.param_groups, self.base_optimizer.param_groups)
                for p, s in zip(g["params"], sg["params"])]

    def _has_grad(self, param: nn.Parameter, shard: nn.Parameter) -> bool:
        return param.grad is not None or (self.use_grad_acc_hook and hasattr(shard, "main_grad"))

    def _buckets(self, tensors: list[torch.Tensor], cap_mb: int) -> list[list[int]]:
        """The coalesced collectives over `tensors` (one each without a cap: torch-xla's uncoalesced path)."""
        return coalescing_buckets(tensors, cap_mb) if cap_mb > 0 else [[i] for i in range(len(tensors))]

    def _reduce_gradients(self) -> None:
        """``_reduce_gradients`` (339-401): each (main) gradient padded, in fp32 with ``higher_cc_precision``,
        reduce-scattered over the sharding groups with scale 1 / shard count; this rank's shard of the mean becomes
        its shard's gradient (gloo has no reduce-scatter: a sum, then this rank's chunk)."""
        pairs = [(p, s) for p, s in self._pairs() if self._has_grad(p, s)]
        padded = [self._pad(s.main_grad if self.use_grad_acc_hook else p.grad) for p, s in pairs]
        if self.higher_cc_precision:
            padded = [g.to(self.optimizer_dtype) for g in padded]
        for bucket in self._buckets(padded, self.bucket_cap_mb_reduce_scatter):
            self.env.log.trace("reduce_scatter", self._sharding_groups, [tuple(padded[i].shape) for i in bucket],
                               padded[bucket[0]].dtype)
            for i in bucket:
                summed = self.env.reduce(padded[i], self._sharding_groups, 1.0 / self.local_world_size, trace=False)
                pairs[i][1].grad = summed.chunk(self.local_world_size)[self.local_rank].to(self.optimizer_dtype)

    def _clip_grad_norm(self) -> None:
        """NxD's ``_clip_grad_norm`` (71-104): the shards' gradients (carrying their parameters' ``shared`` and
        ``tensor_model_parallel``) through NxD's norm, summed over the sharding groups too; the shards clipped."""
        shards = []
        for param, shard in self._pairs():
            if shard.grad is not None:
                for attribute in ("shared", "tensor_model_parallel"):
                    if hasattr(param, attribute):
                        setattr(shard, attribute, getattr(param, attribute))
                shards.append(shard)
        self._grad_norm = clip_global_norm(shards, self.max_norm, self.env, self._sharding_groups).detach().clone()

    def _all_gather_weights(self) -> None:
        """``allgather_weights_and_update_full_parameter`` (440-486): each updated shard in its parameter's dtype
        (a bf16 model's fp32 master rounded to nearest), all-gathered over the sharding groups along dim 0, the
        padding cut off and copied into the parameter."""
        pairs = [(p, s) for p, s in self._pairs() if self._has_grad(p, s)]
        data = [s.data.to(p.dtype) for p, s in pairs]
        for bucket in self._buckets(data, self.bucket_cap_mb_all_gather):
            self.env.log.trace("all_gather", self._sharding_groups, [tuple(data[i].shape) for i in bucket],
                               data[bucket[0]].dtype)
            for i in bucket:
                param = pairs[i][0]
                param.data.copy_(self._gathered(data[i])[: param.size(0)])

    def _gathered(self, shard: torch.Tensor) -> torch.Tensor:
        mine = next(list(g) for g in self._sharding_groups if self.env.rank() in g)
        if len(mine) == 1:
            return shard
        parts = [torch.empty_like(shard) for _ in mine]
        dist.all_gather(parts, shard.contiguous(), group=self.env.group_of(mine))
        return torch.cat(parts, 0)

    @torch.no_grad()
    def step(self, closure=None, **kwargs):
        """torch-xla's ``step`` (418-438): sync the groups to the base optimizer, reduce-scatter the gradients, clip,
        step the base optimizer on the shards, drop their gradients, all-gather the weights, sync the groups back."""
        if kwargs:
            raise NotImplementedError(f"the ZeRO-1 double does not model step arguments {sorted(kwargs)}")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._sync_groups(self.param_groups, self.base_optimizer.param_groups)
        self._reduce_gradients()
        if self.grad_clipping:
            self._clip_grad_norm()
        self.base_optimizer.step()
        self.base_optimizer.zero_grad(set_to_none=True)
        self._all_gather_weights()
        self._sync_groups(self.base_optimizer.param_groups, self.param_groups)
        return loss

    @staticmethod
    def _sync_groups(source: list[dict], target: list[dict]) -> None:
        """``_sync_param_groups`` (156-181): every group setting but ``params``."""
        assert len(source) == len(target), "Mismatch between number of source and destination parameter groups"
        for src, dst in zip(source, target):
            dst.update({k: v for k, v in src.items() if k != "params"})

    def zero_grad(self, set_to_none=False):
        super().zero_grad(set_to_none=set_to_none)
        if self.use_grad_acc_hook:
            for _, shard in self._pairs():
                if hasattr(shard, "main_grad"):
                    shard.main_grad.zero_()

    def state_dict(self) -> dict:
        """torch-xla's ``state_dict`` (496-510): the wrapper's, with the base optimizer's per-shard states, the
        full shapes and, with ``save_master_weights``, the shards themselves (the fp32 masters)."""
        state = super().state_dict()
        state["base_state"] = self.base_optimizer.state_dict()["state"]
        state["shape_info"] = {i: p.shape for i, (p, _) in enumerate(self._pairs())}
        if self.save_master_weights:
            state["sharded_master_weights"] = {i: s.data for i, (_, s) in enumerate(self._pairs())}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        raise NotImplementedError("the ZeRO-1 double does not model load_state_dict (our checkpoints restore the "
                                  "base optimizer's states and the masters themselves)")


def on_device(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    """`params`, marked as NxD's ``initialize_parallel_model`` leaves the parameters it moved to the device (for a
    test that builds an optimizer over a module of its own, as ``module.to(xla_device)`` would)."""
    params = list(params)
    for param in params:
        setattr(param, ON_XLA_DEVICE, True)
    return params


class NxDCheckpointWrapper(CheckpointWrapper):
    """NxD's activation-checkpoint wrapper: module names without the wrapper's prefix (parameter names keep it)."""

    def named_modules(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, nn.Module]]:
        for name, module in super().named_modules(*args, **kwargs):
            yield name.replace(_CHECKPOINT_PREFIX, ""), module


def nxd_checkpoint_wrapper(module, checkpoint_impl=CheckpointImpl.NO_REENTRANT, checkpoint_fn=None,
                           **checkpoint_fn_kwargs):
    """NxD's ``checkpoint_wrapper``: on torch >= 2.1 always torch-xla's reentrant checkpoint."""
    if checkpoint_fn is None:
        checkpoint_fn, checkpoint_impl = partial(reentrant_checkpoint, use_reentrant=True), CheckpointImpl.REENTRANT
    return NxDCheckpointWrapper(module, checkpoint_impl, checkpoint_fn, **checkpoint_fn_kwargs)


# The mapping functions NxD's ``parallel_layers/__init__.py`` (v2.28.0) imports into the package: not
# ``scatter_to_sequence_parallel_region``, which only ``parallel_layers.mappings`` holds.
PACKAGE_MAPPINGS = ("copy_to_tensor_model_parallel_region", "gather_from_tensor_model_parallel_region",
                    "reduce_from_tensor_model_parallel_region", "scatter_to_tensor_model_parallel_region")


def nxd_modules(env: Env) -> dict[str, types.ModuleType]:
    """NxD's modules by import name, recording into ``env.log``."""
    initialize = _model_parallel_initializer(env)
    api = nxd_layers.make(nxd_layers.GridGroup(env), env.log.calls.setdefault("layers", []), fake_module,
                          **_parallel_state(env, initialize))
    bound = {name: type(name, (cls,), {"env": env}) for name, cls in
             (("NxDModel", NxDModel), ("NxDOptimizer", NxDOptimizer), ("NeuronZero1Optimizer", Zero1Optimizer),
              ("NxDPPModel", nxd_pp.NxDPPModel))}
    bound["NxDOptimizer"].grads = api[nxd_api.GRADS]
    mappings, loss_functions = api[nxd_api.MAPPINGS], api[nxd_api.LOSS_FUNCTIONS]
    utils = _utils(env)
    trainer = _trainer(env, initialize, bound)
    parallel_layers = fake_module("neuronx_distributed.parallel_layers", parallel_state=api[nxd_api.PARALLEL_STATE],
                                  layers=api[nxd_api.LAYERS], mappings=mappings, loss_functions=loss_functions,
                                  utils=utils, parallel_cross_entropy=loss_functions.parallel_cross_entropy,
                                  **{name: getattr(mappings, name) for name in PACKAGE_MAPPINGS})
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
        "neuronx_distributed.trainer.model": fake_module("neuronx_distributed.trainer.model",
                                                         NxDModel=bound["NxDModel"]),
        "neuronx_distributed.trainer.optimizer": fake_module("neuronx_distributed.trainer.optimizer",
                                                             NxDOptimizer=bound["NxDOptimizer"]),
        "neuronx_distributed.optimizer": fake_module("neuronx_distributed.optimizer",
                                                     NeuronZero1Optimizer=bound["NeuronZero1Optimizer"]),
        "neuronx_distributed.pipeline": fake_module("neuronx_distributed.pipeline", NxDPPModel=bound["NxDPPModel"]),
        "neuronx_distributed.parallel_layers": parallel_layers,
        **api,
        "neuronx_distributed.parallel_layers.utils": utils,
    }


def _model_parallel_initializer(env: Env) -> Callable[..., Any]:
    """``parallel_state.initialize_model_parallel``: NxD's checks and NxD's replica groups (`nxd_replica_groups`,
    so a layout NxD cannot build fails here as there), then, for the training loop, the grid and a gloo
    group for every replica group of more than one rank. ``mesh_only=True`` returns the groups (NxD's ``ParallelGroups``, line 673)
    for any layout, as NxD does, without initialising anything."""
    def initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                                  context_parallel_size=1, expert_model_parallel_size=1, skip_collective_init=False,
                                  lnc_size=1, mesh_only=False):
        assert dist.is_initialized()  # as NxD (parallel_state.py 557)
        world = dist.get_world_size()
        # NxD clips every degree to the world size and needs the world divisible by their product (564-579)
        tp, pp = min(tensor_model_parallel_size, world), min(pipeline_model_parallel_size, world)
        cp = min(context_parallel_size, world)
        if world % (tp * pp * cp):
            raise RuntimeError(f"invalid implied data parallel degree: `world_size` ({world}) is not divisible by "
                               f"tensor_model_parallel_size ({tp}) x pipeline_model_parallel_size ({pp})"
                               f"context_parallel_size ({cp})")  # sic: NxD's message joins these two
        if cp != 1 or expert_model_parallel_size != 1 or skip_collective_init:
            raise NotImplementedError("the doubles model tensor and pipeline parallelism only")
        groups = nxd_replica_groups(world, tp, pp, env.platform)
        if mesh_only:
            # with expert degree 1 the expert groups are the data groups and one rank each (lines 149-170)
            return ParallelGroups(groups["tp"], groups["dp"], groups["pp"], groups["cp"], groups["dp"], groups["cp"])
        env.grid.update(tp=tp, pp=pp, dp=world // (tp * pp))
        env.replica_groups.update(groups)
        for kind in ("tp", "dp", "pp"):  # NxD creates its groups here, every rank each group in the same order
            for group in groups[kind]:
                if len(group) > 1:
                    env.group_of(group)
        env.log.calls["initialize_model_parallel"] = env.log.calls.get("initialize_model_parallel", 0) + 1
        return None
    return initialize_model_parallel


# NxD's ``ParallelGroups`` (parallel_state.py line 105): what ``initialize_model_parallel(mesh_only=True)`` returns
ParallelGroups = namedtuple("ParallelGroups", ["tp_groups", "dp_groups", "pp_groups", "ep_model_groups",
                                               "ep_data_groups", "cp_groups"])


def nxd_replica_groups(world: int, tp: int, pp: int, platform: str = "trn1") -> dict[str, list[list[int]]]:
    """The tensor-, data-, pipeline- and context-parallel replica groups NxD v2.28.0 builds (context and expert
    degree 1).

    ``parallel_state.py`` lays the ranks out as a ``[pp, dp, cp, tp]`` grid (lines 619-636) and takes each group
    along one axis (``ascending_ring_PG_group``, lines 107-174, the logic ``get_logic_chosen`` picks on trn1).
    On trn1 at tp = 4 (lines 594-618) the grid is ``[pp, dp // n, cp, tp, n]`` with ``n = LOCAL_WORLD_SIZE // tp``
    (the variable read at line 608, the world size when unset), its last two axes swapped: a tensor group takes
    every n-th rank of a node. That reshape is where NxD fails on a layout it cannot build, and so does this:
    a ``RuntimeError`` from torch when n does not divide dp, a ``ZeroDivisionError`` when a node has fewer than
    tp ranks.
    """
    dp = world // (tp * pp)
    if tp == 4 and platform in TRN1_PLATFORMS:
        n = int(os.environ.get("LOCAL_WORLD_SIZE", world)) // tp
        grid = torch.arange(world).reshape(pp, dp // n, 1, tp, n).transpose(-1, -2).reshape(pp, dp, 1, tp)
    else:
        grid = torch.arange(world).reshape(pp, dp, 1, tp)
    return {"tp": [grid[p, d, 0, :].tolist() for p, d in itertools.product(range(pp), range(dp))],
            "dp": [grid[p, :, 0, t].tolist() for p, t in itertools.product(range(pp), range(tp))],
            "pp": [grid[:, d, 0, t].tolist() for d, t in itertools.product(range(dp), range(tp))],
            "cp": [grid[p, d, :, t].tolist() for p, d, t in itertools.product(range(pp), range(dp), range(tp))]}


# The platform strings NxD's ``hardware`` enum maps to TRN1 (utils/utils.py lines 6-27 at v2.28.0)
TRN1_PLATFORMS = ("trn1", "trn1n", "inf2")


def _parallel_state(env: Env, initialize: Callable[..., None]) -> dict[str, Callable]:
    """``parallel_state``'s functions, read from ``env.grid`` and NxD's replica groups (a rank's tensor- and
    data-parallel rank is its index in its group).

    As NxD's, every getter of a group, size or rank asserts that ``initialize_model_parallel`` ran (and
    ``destroy_model_parallel`` did not since): NxD reads them from its process groups.
    """
    grid = env.grid

    def initialized(group: str, read: Callable[[], Any]) -> Callable[[], Any]:
        def getter() -> Any:
            assert grid, f"{group} group is not initialized"
            return read()
        return getter

    def destroy_model_parallel() -> None:
        grid.clear()
        env.replica_groups.clear()
        env.groups.clear()

    tp, dp, pp = "intra_layer_model parallel", "data parallel", "pipeline_model parallel"
    return dict(
        initialize_model_parallel=initialize, model_parallel_is_initialized=lambda: bool(grid),
        destroy_model_parallel=destroy_model_parallel,
        get_tensor_model_parallel_size=initialized(tp, lambda: grid["tp"]),
        get_tensor_model_parallel_rank=initialized(tp, lambda: env.group_index("tp")[1]),
        get_pipeline_model_parallel_size=initialized(pp, lambda: grid["pp"]),
        get_pipeline_model_parallel_rank=initialized(pp, env.pp_rank),
        get_data_parallel_size=initialized(dp, lambda: grid["dp"]),
        get_data_parallel_rank=initialized(dp, lambda: env.group_index("dp")[1]),
        # every group of the world, as NxD's (parallel_state.py 847-850, 875-878, 1089-1092), as it built them
        get_data_parallel_replica_groups=initialized(dp, env.dp_groups),
        get_pipeline_model_parallel_replica_groups=initialized(pp, env.pp_groups),
        get_tensor_model_parallel_replica_groups=initialized(tp, lambda: env.replica_groups["tp"]),
        is_global_rank_zero=lambda: env.rank() == 0,
    )


def _utils(env: Env) -> types.ModuleType:
    """``parallel_layers.utils``: host copies (recorded when a step graph is pending) and tensor attributes."""
    log = env.log

    def move_all_tensor_to_cpu(data, convert=True):
        """utils.py 230-243: the XLA tensors in `data` synced together and copied to the host; a host tensor is not
        selected, so the rewrite hands it back as an alias (`_rewrite`). Without any XLA tensor nothing is synced
        (``ToXlaTensorArena._convert`` calls ``convert_fn`` only when it collected one, xla_model.py 312-317), and
        a sync of tensors that are device data already executes no graph."""
        if not convert:
            raise NotImplementedError("the doubles model convert=True only")
        if not _has_device_tensor(data, set()):
            return _rewrite(data, _host_alias, {})
        if log.step_work:
            log.violations.append(f"host copy while a step graph was pending ({bmojo_caller()})")
        if log.pending():
            log.cut("to_cpu")  # NxD syncs the tensors it copies: their pending graph runs now
        if extracting():  # neuron_parallel_compile's trial run: the graphs ran as stubs with zero outputs
            log.extraction_reads.append(bmojo_caller() or "move_all_tensor_to_cpu")
            return _zeros_like(data)
        return _host_copy(data)

    def set_tensor_model_parallel_attributes(tensor, is_parallel, dim, stride, num_partitions=-1,
                                             rank_ordering=None):
        for attribute in ("tensor_model_parallel", "partition_dim", "partition_stride", "num_partitions"):
            assert not hasattr(tensor, attribute), attribute  # as NxD: never set twice
        if num_partitions == -1:  # NxD's own warning (its default "may not work correctly")
            warnings.warn('NeuronxDistributed: Please pass "num_partitions" argument to '
                          "set_tensor_model_parallel_attributes() method. Default value may not work correctly and "
                          "will be removed in later versions.")
            num_partitions = env.grid.get("tp", 1)
        tensor.tensor_model_parallel, tensor.partition_dim, tensor.partition_stride = is_parallel, dim, stride
        tensor.num_partitions, tensor.rank_ordering = num_partitions, rank_ordering

    return fake_module("neuronx_distributed.parallel_layers.utils", move_all_tensor_to_cpu=move_all_tensor_to_cpu,
                       set_tensor_model_parallel_attributes=set_tensor_model_parallel_attributes)


def extracting() -> bool:
    """Whether this is ``neuron_parallel_compile``'s graph-extraction run (``NEURON_EXTRACT_GRAPHS_ONLY``):
    torch-neuronx then executes empty stubs with zero outputs, so every device value read is invalid."""
    return os.environ.get("NEURON_EXTRACT_GRAPHS_ONLY", "") not in ("", "0")


def _host_copy(data: Any) -> Any:
    """Plain host tensors (never `LoadedOnHost`, which a checkpoint would pickle by its class)."""
    return _rewrite(data, lambda t: t.detach().to("cpu", copy=True).as_subclass(torch.Tensor), {})


def _zeros_like(data: Any) -> Any:
    return _rewrite(data, lambda t: torch.zeros_like(t, device="cpu"), {})


def _has_device_tensor(data: Any, seen: set[int]) -> bool:
    """Whether the rewrite would collect any XLA tensor in `data` (``for_each_instance``, utils.py 139-162; NxD's
    ``is_xla_tensor``, utils.py 231-232, selects what is not on the host: `xla_host.on_host`)."""
    if id(data) in seen:
        return False
    seen.add(id(data))
    if isinstance(data, torch.Tensor):
        return not on_host(data)
    if isinstance(data, dict):
        return any(_has_device_tensor(k, seen) or _has_device_tensor(v, seen) for k, v in data.items())
    if isinstance(data, (list, tuple, set)):
        return any(_has_device_tensor(x, seen) for x in data)
    return False


def _host_alias(tensor: torch.Tensor) -> torch.Tensor:
    """What the rewrite makes of a host tensor: ``copy.copy`` of it (every unselected object with a ``__dict__``
    is shallow-copied, torch_xla/utils/utils.py 199-204), which for a tensor is a new tensor object over the same
    storage (``Tensor.__reduce_ex__`` rebuilds from its storage): writing into one writes into the other. A
    `LoadedOnHost` comes back as a plain tensor (it stands for one), without the double's marks (a checkpoint
    would pickle them) but known to be on the host."""
    alias = copy.copy(tensor.as_subclass(torch.Tensor) if isinstance(tensor, LoadedOnHost) else tensor)
    for mark in (HOST, MADE_ON_HOST):
        alias.__dict__.pop(mark, None)
    hold_on_host(alias)
    return alias


def _rewrite(data: Any, convert: Callable[[torch.Tensor], torch.Tensor], done: dict[int, Any]) -> Any:
    """torch-xla's ``for_each_instance_rewrite`` (torch_xla/utils/utils.py 165-211), as NxD's
    ``move_all_tensor_to_cpu`` applies it (``ToXlaTensorArena``, xla_model.py 298-342): the device tensors are
    `convert`-ed, a host tensor becomes an alias of itself (`_host_alias`), dicts come back as plain dicts, lists
    and tuples as lists, sets as sets, and an object met twice is converted once (the same result in both places).
    Other objects with a ``__dict__`` (which torch-xla shallow-copies and rewrites attribute by attribute) are
    handed back as they are: our code passes none."""
    if id(data) in done:
        return done[id(data)]
    if isinstance(data, torch.Tensor):
        result: Any = _host_alias(data) if on_host(data) else convert(data)
    elif isinstance(data, dict):
        result = {_rewrite(k, convert, done): _rewrite(v, convert, done) for k, v in data.items()}
    elif isinstance(data, set):
        result = {_rewrite(x, convert, done) for x in data}
    elif isinstance(data, (list, tuple)):
        result = [_rewrite(x, convert, done) for x in data]
    else:
        return data
    done[id(data)] = result
    return result


def _trainer(env: Env, initialize: Callable[..., None], bound: dict[str, type]) -> types.ModuleType:
    """``neuronx_distributed.trainer``: config, model and optimizer initialisation (``trainer/trainer.py``)."""
    log, grid = env.log, env.grid

    def neuronx_distributed_config(tensor_parallel_size=1, pipeline_parallel_size=1, expert_parallel_size=1,
                                   context_parallel_size=1, pipeline_config=None, optimizer_config=None,
                                   activation_checkpoint_config=None, pad_model=False, sequence_parallel=False,
                                   model_init_config=None, lora_config=None, mixed_precision_config=None,
                                   sequential_move_factor=11, lnc_size=1):
        given = dict(locals())
        log.calls["config"] = dict(given)
        config = nxd_api.filled_config(given)
        if dist.is_initialized():
            initialize(tensor_parallel_size, pipeline_parallel_size)
        return config

    def initialize_parallel_model(nxd_config, model_fn, include_buffers=False, *model_args, **model_kwargs):
        if not grid:
            initialize(nxd_config["tensor_parallel_size"], nxd_config["pipeline_parallel_size"])
        init_config = nxd_config["model_init_config"]
        if init_config["meta_device_init"]:
            raise NotImplementedError("the NxD double does not model meta_device_init")
        module = model_fn(*model_args, **model_kwargs)
        if nxd_config["pipeline_parallel_size"] > 1:  # as NxD: its pipeline wrapper, fed the pipeline_config
            nxd_config["pipeline_config"].update(param_init_fn=init_config.get("param_init_fn"),
                                                 use_model_wrapper=True, _delay_tracing=False)
            module = bound["NxDPPModel"](module, **nxd_config["pipeline_config"])
        _move_in_waves(env, module, init_config["sequential_move_factor"])
        model = bound["NxDModel"](module, nxd_config)
        model.register_forward_pre_hook(
            lambda m, args: log.forward_seen(m.training, [tuple(a.shape) for a in args if torch.is_tensor(a)]))
        classes = nxd_config["activation_checkpoint_config"]
        if classes is not None:
            if classes == "full":
                raise NotImplementedError("the NxD double does not model activation_checkpoint_config='full'")
            classes = tuple(classes) if isinstance(classes, (list, tuple)) else (classes,)
            assert classes and all(issubclass(c, nn.Module) for c in classes)
            for local in model.local_modules():  # NxD's apply_activation_checkpointing wraps these
                apply_activation_checkpointing(local, checkpoint_wrapper_fn=nxd_checkpoint_wrapper,
                                               check_fn=lambda m: isinstance(m, classes))
        return model

    def initialize_parallel_optimizer(nxd_config, optimizer_class, parameters, **defaults):
        log.calls["optimizer_defaults"] = dict(defaults)
        optimizer_config, precision = nxd_config["optimizer_config"], nxd_config["mixed_precision_config"]
        if optimizer_config["zero_one_enabled"]:
            bucket_cap = zero1_bucket_cap(precision["use_master_weights"])
            zero1 = {"grad_clipping": optimizer_config["grad_clipping"], "pin_layout": False,
                     "sharding_groups": env.dp_groups(), "grad_norm_groups": env.replica_groups["tp"],
                     "bucket_cap_mb_all_gather": max(1, bucket_cap // grid.get("dp", 1)),
                     "bucket_cap_mb_reduce_scatter": bucket_cap}
            if precision["use_master_weights"] and os.environ.get("XLA_DOWNCAST_BF16") == "1":
                defaults["optimizer_dtype"] = torch.double  # trainer.py 281-283
            if precision["use_fp32_grad_acc"]:
                zero1.update(use_grad_acc_hook=True, higher_cc_precision=True)
            zero1["save_master_weights"] = bool(precision["use_master_weights_in_ckpt"])
            defaults.pop("decoupled_weight_decay", None)
            log.calls["zero1_config"] = dict(zero1)
            optimizer = bound["NeuronZero1Optimizer"](parameters, optimizer_class, **zero1, **defaults)
        else:
            if precision["use_master_weights"]:
                raise RuntimeError("ZeRO-1 optimizer is not enabled, while `use_master_weights` is True.")
            if precision["use_fp32_grad_acc"] or precision["use_master_weights_in_ckpt"]:
                raise RuntimeError("Non Zero-1 optimizer does not support `use_fp32_grad_acc` of "
                                   "`use_master_weights_in_ckpt`.")
            optimizer = optimizer_class(parameters, **defaults)
        return bound["NxDOptimizer"](optimizer, nxd_config)

    return fake_module(nxd_api.TRAINER, neuronx_distributed_config=neuronx_distributed_config,
                       initialize_parallel_model=initialize_parallel_model,
                       initialize_parallel_optimizer=initialize_parallel_optimizer)


def zero1_bucket_cap(use_master_weights: bool) -> int:
    """The ZeRO-1 reduce-scatter bucket in MB NxD's ``initialize_optimizer_from_class`` picks (trainer/trainer.py
    258-279 at v2.28.0, torch >= 2.2): 130, 65 when ``XLA_DOWNCAST_BF16`` is "0" with master weights, and
    ``ALL_GATHER_REDUCE_SCATTER_BUCKET_CAP_MB`` over both (``int()`` of it: a ValueError when not an integer)."""
    default = 65 if os.environ.get("XLA_DOWNCAST_BF16") == "0" and use_master_weights else 130
    return int(os.environ.get("ALL_GATHER_REDUCE_SCATTER_BUCKET_CAP_MB", default))


def _move_in_waves(env: Env, module: nn.Module, sequential_move_factor: int) -> None:
    """NxD's ``get_model_sequential`` (utils/model_utils.py 335-356 at v2.28.0): the ranks of a node move their
    model to the device in waves of `sequential_move_factor` local ordinals, every rank meeting at a rendezvous
    after each wave; the waves are counted over the node's processes (``get_local_world_size``,
    parallel_layers/utils.py 246-256: torch-xla's ``local_process_count()`` on Neuron)."""
    local_rank, local_world = local_ordinal(), local_world_size()
    for wave in range(math.ceil(local_world / sequential_move_factor)):
        if local_rank // sequential_move_factor == wave:
            # this rank's parameters and buffers (under pp its stage's, as NxD moves only those): new objects
            if isinstance(module, nxd_pp.NxDPPModel):
                module.move_model_to_device()
            else:
                move_model_to_device(module)
            mark_attributes_left_on_the_host(module)
            env.log.moved_modules.append(module)
            env.log.calls["moved_in_wave"] = wave
        env.rendezvous(f"get_model_sequential{wave}")


def local_world_size() -> int:
    """NxD's ``get_local_world_size`` (parallel_layers/utils.py 246-256 at v2.28.0): torch-xla's
    ``local_process_count()`` when ``PJRT_DEVICE`` is ``NEURON`` (``is_pjrt_device``, 171-172); otherwise it reads
    ``xenv.HOST_WORLD_SIZE``, which torch-xla 2.9's ``core/xla_env_vars.py`` no longer defines."""
    if os.environ.get("PJRT_DEVICE") != "NEURON":
        raise AttributeError("module 'torch_xla.core.xla_env_vars' has no attribute 'HOST_WORLD_SIZE'")
    return local_process_count()
