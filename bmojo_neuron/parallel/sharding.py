"""Convert between a full (single-device) state dict and tensor-parallel shards.

Every sharded tensor is split into contiguous blocks along exactly one dimension
(the layouts in docs/parallel.md are chosen so that this holds, e.g. Mamba-2's
``in_proj_bc`` is group-major). The split dimension is read off the shapes: the one
dimension where the rank's tensor is ``1/tp`` of the full tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor


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
