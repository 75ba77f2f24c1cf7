"""A torch.distributed rank's half of a sharded checkpoint: its model shard and its optimizer's states by name.

The files and their publication are `bmojo_neuron.checkpoints.sharded`'s. Here the
rank's model is its tensor shard (and pipeline stage) of `BMojoForCausalLM`, named like
the full model; the optimizer is AdamW or, with ZeRO-1, torch's
`ZeroRedundancyOptimizer`, which holds states only for the parameters this data rank owns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.optim import ZeroRedundancyOptimizer

from .sharded import (ShardRanks, load_into, load_rank_weights, model_file, optim_file, restore_lr, save_tensors,
                      tied_names)
from .state import Checkpoint, rng_states, set_rng_states


def _inner(optimizer: Any) -> torch.optim.Optimizer:
    return optimizer.optim if isinstance(optimizer, ZeroRedundancyOptimizer) else optimizer


def named_optimizer_states(model: nn.Module, optimizer: Any) -> dict[str, dict[str, Any]]:
    """AdamW states of the parameters this rank's optimizer holds, keyed by parameter name (host copies)."""
    names = {id(p): n for n, p in model.named_parameters()}
    opt = _inner(optimizer)
    return {names[id(p)]: {k: (v.detach().cpu().clone() if isinstance(v, Tensor) else v)
                           for k, v in opt.state[p].items()}
            for group in opt.param_groups for p in group["params"] if p in opt.state}


def load_named_optimizer_states(model: nn.Module, optimizer: Any, states: dict[str, dict[str, Any]]) -> None:
    """Put back `named_optimizer_states` (ZeRO-1: only the parameters this rank owns)."""
    names = {id(p): n for n, p in model.named_parameters()}
    opt = _inner(optimizer)
    for group in opt.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            if name not in states:
                raise ValueError(f"the checkpoint has no optimizer state for {name}")
            opt.state[p] = {k: (v.to(p.device) if k == "step" else v.to(p.device, p.dtype)) if isinstance(v, Tensor)
                            else v for k, v in states[name].items()}


def write_rank_files(tmp: Path, ranks: ShardRanks, model: nn.Module, optimizer: Any, scheduler: Any) -> None:
    """This rank's files of a sharded checkpoint: the model shard (data rank 0 only) and its optimizer file.

    `model` is the rank's `BMojoForCausalLM` (its stage's part under pp, full names); a tied
    head is stored once, as stage 0's embedding.
    """
    tied = tied_names(model.config)
    if ranks.dp_rank == 0:
        save_tensors(model.state_dict(), tmp / model_file(ranks.tp_rank, ranks.pp_rank), tied)
    states = {k: v for k, v in named_optimizer_states(model, optimizer).items() if k not in tied}
    blob = {"optimizer": states, "scheduler": scheduler.state_dict(), "rng": rng_states()}
    torch.save(blob, tmp / optim_file(ranks.tp_rank, ranks.pp_rank, ranks.dp_rank))


def restore_rank(previous: Checkpoint, ranks: ShardRanks, model: nn.Module, optimizer: Any, scheduler: Any,
                 tied_copy: bool = False) -> None:
    """Weights, optimizer states, scheduler and RNG of this rank from `previous` (`sharded.load_rank_view`).

    A checkpoint made by `checkpoint shard` from a plain export has no scheduler: only the
    weights are loaded (a warm start at step 0).
    """
    tensors = load_rank_weights(previous.path, ranks, tied_copy)
    load_into(model, tensors, f"{previous.path.name}/{model_file(ranks.tp_rank, ranks.pp_rank)}")
    if previous.scheduler is None:
        return
    load_named_optimizer_states(model, optimizer, previous.optimizer)
    scheduler.load_state_dict(previous.scheduler)
    restore_lr(optimizer, scheduler)
    set_rng_states(previous.rng)
