"""Convert between a full (single-device) state dict and tensor-parallel shards, and the shapes of a shard.

Every sharded tensor is split into contiguous blocks along exactly one dimension
(the layouts in docs/parallel.md are chosen so that this holds, e.g. Mamba-2's
``in_proj_bc`` is group-major). The split dimension is read off the shapes: the one
dimension where the rank's tensor is ``1/tp`` of the full tensor. `shard_shapes` gives
those shapes without any weights or process group (the model built on the meta device).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..layers.factory import LayerFactory, use_layer_factory
from ..modeling_bmojo import BMojoForCausalLM
from .tensor_parallel import TorchTensorParallelFactory

EMBEDDING = "model.embed_tokens.weight"
TIED_HEAD = "lm_head.weight"  # with tie_word_embeddings: the embedding, stored once under its name


def split_dims(full: dict[str, Tensor], local_shapes: dict[str, torch.Size], tp: int) -> dict[str, int | None]:
    """Name -> the dimension split over ranks (None: replicated)."""
    dims: dict[str, int | None] = {}
    for name, shape in local_shapes.items():
        if name not in full:
            raise KeyError(f"tensor {name!r} of the sharded model is missing from the full state dict")
        whole = full[name].shape
        differ = [d for d, (a, b) in enumerate(zip(whole, shape)) if a != b]
        if len(whole) != len(shape) or len(differ) > 1 or (differ and whole[differ[0]] != shape[differ[0]] * tp):
            raise ValueError(f"{name}: a shard of shape {tuple(shape)} is not a 1/{tp} block of {tuple(whole)}")
        dims[name] = differ[0] if differ else None
    return dims


def shard_state_dict(full: dict[str, Tensor], local_shapes: dict[str, torch.Size], rank: int, tp: int) -> dict[str, Tensor]:
    """This rank's state dict from the full one."""
    dims = split_dims(full, local_shapes, tp)
    return {
        name: full[name] if dim is None else full[name].chunk(tp, dim=dim)[rank].clone()
        for name, dim in dims.items()
    }


def consolidate_state_dicts(shards: list[dict[str, Tensor]], full_shapes: dict[str, torch.Size]) -> dict[str, Tensor]:
    """The full state dict from every rank's shard (in rank order)."""
    tp = len(shards)
    out = {}
    for name, shape in full_shapes.items():
        local = shards[0][name]
        differ = [d for d, (a, b) in enumerate(zip(shape, local.shape)) if a != b]
        out[name] = local.clone() if not differ else torch.cat([s[name] for s in shards], dim=differ[0])
        if tuple(out[name].shape) != tuple(shape):
            raise ValueError(f"{name}: {tp} shards of {tuple(local.shape)} do not make {tuple(shape)}")
    return out


def shape_only_factory(tp: int, tp_rank: int) -> LayerFactory:
    """A tensor-parallel factory without a process group: good for building shard-shaped (meta) layers only."""

    class ShapeOnly(TorchTensorParallelFactory):
        def __init__(self) -> None:  # no collective runs while a model is built
            self.group, self.tp_size, self.tp_rank, self.sequence_parallel = None, tp, tp_rank, False

    return ShapeOnly()


def shard_shapes(config: Any, tp: int, tp_rank: int = 0) -> dict[str, torch.Size]:
    """State-dict shapes of tensor rank `tp_rank`'s model (built on the meta device, no process group)."""
    with torch.device("meta"):
        if tp == 1:
            model = BMojoForCausalLM(config)
        else:
            with use_layer_factory(shape_only_factory(tp, tp_rank)):
                model = BMojoForCausalLM(config)
    return {name: t.shape for name, t in model.state_dict().items()}


def tied_names(config: Any) -> set[str]:
    """Names that alias another tensor (``lm_head.weight`` when tied): checkpoints store them once, under the
    embedding's name."""
    return {TIED_HEAD} if getattr(config, "tie_word_embeddings", False) else set()


def load_into(model: nn.Module, tensors: dict[str, Tensor], what: str) -> None:
    """`load_state_dict` that accepts the tied names being absent, and nothing else missing."""
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if k not in tied_names(model.config)]
    if missing or unexpected:
        raise ValueError(f"{what} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
