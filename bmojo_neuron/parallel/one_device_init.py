"""The one-device initialisation of a tensor-parallel model, built on the host in waves of ranks.

So that every tp degree starts from the weights a one-device run would, each rank
builds the whole one-device model in fp32 once and loads its shard of it
(`one_device_shard`, called by `bmojo_neuron.parallel.nxd_training.build_nxd_model`).
On a node of 32 ranks that would hold 32 fp32 models at once (about 250 GiB for
1.4B parameters), so the ranks of a node take turns: `ranks_per_wave` at a time,
keeping the transient models under `HOST_BUILD_BUDGET`, with an ``xm.rendezvous``
after each wave (as NxD moves models to the device in waves of
``sequential_move_factor``). The number of waves depends only on the model and
``LOCAL_WORLD_SIZE``, so every rank meets the same rendezvous.

`BUILD_OVERHEAD` is measured (``python -m bmojo_neuron.launch.host_memory RECIPE``,
docs/trn1.md): the peak RSS growth of building ``BMojoForCausalLM`` in fp32 over its
fp32 parameter bytes, initialisation temporaries included.
"""

from __future__ import annotations

import gc
import math
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..modeling_bmojo import BMojoForCausalLM
from ..neuron import import_neuron_module
from .sharding import load_into, shard_shapes, shard_state_dict, tied_names

FP32 = 4
BUILD_OVERHEAD = 1.31  # measured: bmojo-130m, (peak RSS after the build - before) / fp32 parameter bytes
HOST_BUILD_BUDGET = 128 * 1024**3  # transient full models per node: a quarter of a trn1.32xlarge's 512 GiB


def full_model_bytes(config: Any, full_shapes: Mapping[str, torch.Size] | None = None) -> int:
    """fp32 bytes of the whole one-device model, from its state-dict shapes (`full_shapes`, or built on the meta
    device: nothing allocated)."""
    skip = tied_names(config)
    shapes = shard_shapes(config, 1) if full_shapes is None else full_shapes
    return FP32 * sum(shape.numel() for name, shape in shapes.items() if name not in skip)


def ranks_per_wave(full_bytes: int, budget: int | None = None) -> int:
    """How many ranks of a node build the one-device model at once: the transient builds fit `budget`
    (default `HOST_BUILD_BUDGET`)."""
    budget = HOST_BUILD_BUDGET if budget is None else budget
    return max(1, int(budget // (BUILD_OVERHEAD * full_bytes)))


def build_waves(local_world: int, full_bytes: int, budget: int | None = None) -> int:
    """Waves of one-device builds on a node of `local_world` ranks (the same number on every rank)."""
    return math.ceil(local_world / ranks_per_wave(full_bytes, budget))


def one_device_shard(model: nn.Module, config: Any, tp_rank: int, tp: int, rng_state: Tensor,
                     start_weights: dict[str, Tensor] | None = None) -> None:
    """Load into `model` its shard of the one-device `BMojoForCausalLM(config)` built from `rng_state`,
    with `start_weights` (the whole model's, e.g. a primed checkpoint) loaded into it first if given.

    The ranks of a node take turns (`build_waves`: the
    transient fp32 models of a wave fit the node's build budget), meeting at an
    ``xm.rendezvous`` after each wave; every rank computes the same number of waves.
    The torch RNG is left where that build leaves it.
    """
    local_rank, local_world = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    full_bytes = full_model_bytes(config)
    waves, per_wave = build_waves(local_world, full_bytes), ranks_per_wave(full_bytes)
    xm = import_neuron_module("torch_xla.core.xla_model", "the one-device initialisation on Trainium") if waves > 1 else None
    after = None
    for wave in range(waves):
        if local_rank // per_wave == wave:
            torch.set_rng_state(rng_state)
            full = BMojoForCausalLM(config)
            after = torch.get_rng_state()
            if start_weights is not None:
                full.load_state_dict(start_weights)
            shapes = {k: v.shape for k, v in model.state_dict().items()}
            load_into(model, shard_state_dict(full.state_dict(), shapes, tp_rank, tp),
                      "the tensor shard of the one-device initialisation")
            del full
            gc.collect()
        if xm is not None:
            xm.rendezvous(f"bmojo-one-device-build-{wave}")
    torch.set_rng_state(after)
