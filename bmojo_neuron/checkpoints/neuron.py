"""A Neuron rank's half of a sharded checkpoint (`bmojo_neuron.checkpoints.sharded`): XLA tensors, NxD optimizers.

The files are those of a torchrun run on CPU (``rank-TT-PP.safetensors``,
``optim-TT-PP-DDD.pt``, ``parallel.json``, published atomically by rank 0), so
``bmojo-neuron checkpoint consolidate`` / ``shard``, ``eval``, ``generate`` and
``--resume`` (with any data-parallel degree) read them. What differs on Trainium:

- Tensors live on the XLA device; they reach the host through NxD's
  ``move_all_tensor_to_cpu`` (one sync for many tensors), always after the step's
  ``torch_xla.sync``, never inside a step graph.
- Weights are stored in fp32. With bf16 + ZeRO-1 they are the optimizer's fp32
  master weights, so a resumed run continues from the exact master copy and an
  export is not rounded to bf16.
- NxD's ZeRO-1 optimizer (torch-xla's ``ZeroRedundancyOptimizer``) keeps each
  parameter's AdamW states as a dim-0 slice per data-parallel rank (the tensor
  padded to a multiple of dp, then chunked). On save the slices are all-gathered
  (every data rank joins the collective) and data rank 0 writes full, per-name
  states for its tensor shard; the other data ranks write only their scheduler
  and RNG states. On load each rank cuts its own slice again, so dp may change.
- Names: NxD's activation checkpointing wraps decoder layers in a
  ``CheckpointWrapper`` whose ``named_parameters`` carry a
  ``_checkpoint_wrapped_module.`` infix; it is removed so optimizer states are keyed
  like the state dict.
- Pipeline stages (pp > 1): NxD's model wrapper names and saves only this stage's
  parameters, under the full model's names, so each stage writes its
  ``rank-TT-PP`` file. A tied embedding is one Parameter that NxD's pipeline places
  on stage 0 (``model.embed_tokens.weight``) and on the last stage (``lm_head.weight``),
  summing their gradients, so both copies and their AdamW states stay equal: as in
  the torch path it is stored once, by stage 0, and the last stage reads its copy
  (weights, AdamW states, ZeRO-1 master) from stage 0's files on resume.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import sharded as fmt
from .sharded import ShardRanks
from .state import Checkpoint, TrainerState, rng_states, set_rng_states

WRAPPER_INFIX = "_checkpoint_wrapped_module."  # torch's checkpoint_wrapper prefix (NxD's activation checkpointing)


class NeuronRanks(ShardRanks, Protocol):
    """What checkpointing needs of the Neuron runtime: the grid position, host copies and collectives."""

    @property
    def is_main(self) -> bool: ...
    @property
    def device(self) -> torch.device: ...
    @property
    def dp(self) -> int: ...
    @property
    def last_stage(self) -> bool: ...
    def to_cpu(self, data: Any) -> Any: ...
    def sync(self) -> None: ...
    def gather_over(self, x: Tensor, groups: Any) -> Tensor: ...
    def barrier(self, tag: str) -> None: ...


def parameter_names(model: nn.Module) -> dict[int, str]:
    """``id(param) -> state-dict name`` (a tied parameter once, under its first name)."""
    return {id(p): name.replace(WRAPPER_INFIX, "") for name, p in model.named_parameters()}


def holds_tied_copy(runtime: NeuronRanks, config: Any) -> bool:
    """Whether this rank's stage holds the copy of a tied embedding that stage 0 stores (the last of pp > 1)."""
    return runtime.pp > 1 and runtime.last_stage and bool(getattr(config, "tie_word_embeddings", False))


def zero1_optimizer(optimizer: Any) -> Any | None:
    """NxD's ZeRO-1 optimizer inside the ``NxDOptimizer`` wrapper, or None without ZeRO-1."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return inner if hasattr(inner, "base_optimizer") else None


def _zero1_pairs(zero: Any) -> list[tuple[nn.Parameter, nn.Parameter]]:
    """(parameter, its dp shard held by the base optimizer), in the order ZeRO-1 created the shards."""
    return [(p, s) for group, shards in zip(zero.param_groups, zero.base_optimizer.param_groups)
            for p, s in zip(group["params"], shards["params"])]


def dp_slice(full: Tensor, dp: int, dp_rank: int) -> Tensor:
    """Data rank `dp_rank`'s ZeRO-1 slice of `full`: dim 0 padded to a multiple of dp, then chunked."""
    if full.dim() == 0:
        return full
    pad = -full.shape[0] % dp
    if pad:
        full = F.pad(full, [0, 0] * (full.dim() - 1) + [0, pad])
    return full.chunk(dp)[dp_rank]


def _state_to_device(value: Any, like: Tensor, device: torch.device) -> Any:
    """An AdamW state value read from a checkpoint (on the host) for a parameter like `like`, on the XLA `device`
    (AdamW updates it in place with the device gradient, which torch-xla refuses for a host tensor). The scalar
    ``step`` goes to the device too, in its own dtype: the Neuron AdamW is ``capturable`` (`build_nxd_optimizer`),
    which wants it on the parameter's device, as torch's own ``load_state_dict`` puts it (optim/optimizer.py
    ``_process_value_according_to_param_policy``). The runtime's device, not ``like.device``: the same on
    Trainium, and on the test doubles the one that tells the device from the host outside a step."""
    if not isinstance(value, Tensor):
        return value
    return value.to(device) if value.dim() == 0 else value.to(device, like.dtype)


# ------------------------------------------------------------------------------ save


def device_state(model: nn.Module, optimizer: Any, runtime: NeuronRanks) -> dict[str, dict]:
    """What a checkpoint reads from this rank's device: ``{"states": {name: {state: tensor}}, "weights":
    state dict}``, the ZeRO-1 states (and fp32 masters as ``__master__``) all-gathered over the data ranks.

    Every data rank joins every all-gather and materialises them (XLA collectives run in graphs), so each
    gets the gathered states; only data rank 0 keeps them, and only it reads the weights and, without ZeRO-1,
    its optimizer states.
    """
    keep = runtime.dp_rank == 0
    tied = fmt.tied_names(model.config)  # stored once, as stage 0's embedding
    names = {key: name for key, name in parameter_names(model).items() if name not in tied}
    zero = zero1_optimizer(optimizer)
    states: dict[str, dict] = {}
    if zero is None:
        inner = getattr(optimizer, "optimizer", optimizer)
        if keep:
            states = {names[id(p)]: dict(inner.state[p]) for group in inner.param_groups for p in group["params"]
                      if p in inner.state and id(p) in names}
    else:
        for param, shard in _zero1_pairs(zero):
            if id(param) not in names:
                continue  # the tied copy (every data rank of this stage skips it alike)
            full = {k: _unshard(v, param, zero, runtime) for k, v in zero.base_optimizer.state.get(shard, {}).items()}
            if shard.dtype != param.dtype:  # fp32 master weights of a bf16 model
                full["__master__"] = _unshard(shard.detach(), param, zero, runtime)
            states[names[id(param)]] = full
    return {"states": states, "weights": model.state_dict() if keep else {}}


def host_state(model: nn.Module, optimizer: Any, runtime: NeuronRanks) -> tuple[dict[str, Tensor], dict]:
    """(fp32 weights, optimizer states by name) of this rank's tensor shard on the host; empty off data rank 0.

    One host read (`NeuronRanks.to_cpu`) of everything `device_state` traced, so the save runs as one graph
    whatever the number of parameters (a read per parameter would compile and run one small graph each).
    """
    read = runtime.to_cpu(device_state(model, optimizer, runtime))
    if runtime.dp_rank != 0:
        return {}, {}
    states, masters = {}, {}
    for name, full in read["states"].items():
        master = full.pop("__master__", None)
        if master is not None:
            masters[name] = master
        states[name] = full
    weights = {k: v.float() for k, v in read["weights"].items()}
    weights.update(masters)
    return weights, states


def _unshard(value: Any, param: Tensor, zero: Any, runtime: NeuronRanks) -> Any:
    if not isinstance(value, Tensor) or value.dim() == 0:
        return value
    return runtime.gather_over(value, zero.sharding_groups)[: param.shape[0]]


def trace_save(model: nn.Module, optimizer: Any, runtime: NeuronRanks) -> None:
    """A save's device work (the ZeRO-1 all-gathers) cut as one graph, and nothing read or written: what a
    graph-extraction run does instead of `save_checkpoint`, so the real run finds the save's graph compiled."""
    device_state(model, optimizer, runtime)
    runtime.sync()


def save_checkpoint(run_dir: Path, runtime: NeuronRanks, model: nn.Module, optimizer: Any, scheduler: Any,
                    state: TrainerState, recipe: dict[str, Any], keep_last: int, meta: dict[str, Any],
                    xla_seed: int | None) -> Path:
    """Every rank writes its files into one temp dir; rank 0 publishes it (then `latest`) after a barrier.

    `xla_seed` is the XLA seed the next step starts from (the backend's ``step_seed``), kept as ``rng["xla"]``:
    not the seed as it stands during the save, which the save's own syncs have moved on.
    """

    def write_rank_files(tmp: Path) -> None:
        weights, states = host_state(model, optimizer, runtime)
        if runtime.dp_rank == 0:
            fmt.save_tensors(weights, tmp / fmt.model_file(runtime.tp_rank, runtime.pp_rank),
                             fmt.tied_names(model.config))
        blob = {"optimizer": states, "scheduler": scheduler.state_dict(),
                "rng": {**rng_states(), "xla": xla_seed}}
        torch.save(blob, tmp / fmt.optim_file(runtime.tp_rank, runtime.pp_rank, runtime.dp_rank))

    return fmt.save_sharded(run_dir, state, runtime.is_main, runtime.barrier, write_rank_files, meta, recipe,
                            model.config, keep_last)


# ------------------------------------------------------------------------------ load


def load_latest(run_dir: Path, runtime: NeuronRanks, tied_copy: bool = False) -> Checkpoint | None:
    """This rank's view of the latest checkpoint (`sharded.load_rank_view`)."""
    return fmt.load_rank_view(run_dir, runtime, tied_copy)


def restore_weights(model: nn.Module, previous: Checkpoint, runtime: NeuronRanks) -> dict[str, Tensor]:
    """Load this rank's model file into `model` (before the optimizer exists: ZeRO-1 shards copy the weights);
    the last stage's tied ``lm_head.weight`` is stage 0's embedding."""
    tensors = fmt.load_rank_weights(previous.path, runtime, holds_tied_copy(runtime, model.config))
    fmt.load_into(model, tensors, f"{previous.path.name}/{fmt.model_file(runtime.tp_rank, runtime.pp_rank)}")
    return tensors


def restore_training_state(model: nn.Module, optimizer: Any, scheduler: Any, previous: Checkpoint,
                           weights: dict[str, Tensor], runtime: NeuronRanks) -> None:
    """Optimizer states (ZeRO-1: this rank's slices and fp32 master weights), scheduler and the host RNGs (the
    XLA seed, ``previous.rng["xla"]``, is the backend's to set when its first step starts)."""
    if previous.scheduler is None:  # `checkpoint shard` of a plain export: a warm start at step 0
        return
    names = parameter_names(model)

    def states_of(param: Tensor) -> dict[str, Any]:
        name = names[id(param)]
        if name not in previous.optimizer:
            raise ValueError(f"{previous.path} has no optimizer state for {name}")
        return previous.optimizer[name]

    zero = zero1_optimizer(optimizer)
    if zero is None:
        inner = getattr(optimizer, "optimizer", optimizer)
        for group in inner.param_groups:
            for p in group["params"]:
                inner.state[p] = {k: _state_to_device(v, p, runtime.device) for k, v in states_of(p).items()}
    else:
        dp, rank = zero.local_world_size, zero.local_rank
        for param, shard in _zero1_pairs(zero):
            cut = {k: dp_slice(v, dp, rank) if isinstance(v, Tensor) else v for k, v in states_of(param).items()}
            zero.base_optimizer.state[shard] = {k: _state_to_device(v, shard, runtime.device) for k, v in cut.items()}
            name = names[id(param)]
            if shard.dtype != param.dtype and name in weights:  # the exact fp32 master copy
                with torch.no_grad():
                    shard.copy_(dp_slice(weights[name], dp, rank).to(shard.device, shard.dtype))
    scheduler.load_state_dict(previous.scheduler)
    fmt.restore_lr(optimizer, scheduler)
    set_rng_states(previous.rng)
