"""The sharded checkpoint format of parallel runs, and its conversion to and from one full model.

A sharded checkpoint ``step-XXXXXXX/`` holds::

    parallel.json                 degrees (tp, pp, dp, sp, zero1), split dim and full shape of every tensor
    rank-TT-PP.safetensors        model shard of tensor rank TT, pipeline stage PP (written by data rank 0);
                                  each stage's file holds the tensors of that stage only
    optim-TT-PP-DDD.pt            per rank: AdamW states keyed by parameter name (ZeRO-1: only the
                                  names that rank owns), scheduler and RNG states
    recipe.json, config.json
    trainer_state.json            written last, by rank 0, after every rank's files are on disk

A tied ``lm_head.weight`` is never stored: it is the embedding (stage 0's file and
optimizer states); under pp the last stage reads its copy from there.

Optimizer states are keyed by the full model's parameter names and hold this rank's
shard of each tensor, so they are resharded exactly like the weights; a rank with
ZeRO-1 reads the files of every data rank of its (TT, PP) and keeps what it owns,
so the data-parallel degree and ZeRO-1 can change freely on resume. Changing tp or
pp goes through a consolidated directory (``bmojo-neuron checkpoint consolidate`` /
``shard``): NxD cannot reshard on load either.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..layers.factory import LayerFactory, use_layer_factory
from .sharding import split_dims

PARALLEL_FILE = "parallel.json"
EMBEDDING = "model.embed_tokens.weight"
TIED_HEAD = "lm_head.weight"  # with tie_word_embeddings: the embedding, stored once under its name
TRAINING_STATE_FILE = "training_state.pt"  # optimizer/scheduler/trainer state beside a consolidated export
FORMAT = "bmojo-sharded-v1"


def model_file(tp_rank: int, pp_rank: int) -> str:
    return f"rank-{tp_rank:02d}-{pp_rank:02d}.safetensors"


def optim_file(tp_rank: int, pp_rank: int, dp_rank: int) -> str:
    return f"optim-{tp_rank:02d}-{pp_rank:02d}-{dp_rank:03d}.pt"


def is_sharded(path: str | Path) -> bool:
    return (Path(path) / PARALLEL_FILE).is_file()


def read_meta_for(path: str | Path, tp: int, pp: int, hint: str) -> dict[str, Any]:
    """`read_meta` of a checkpoint a run at degrees (`tp`, `pp`) resumes; `hint` says how to convert it."""
    if not is_sharded(path):
        raise ValueError(f"{path} is a one-process checkpoint; to resume it with parallel degrees, {hint}")
    meta = read_meta(path)
    if (meta["tp"], meta["pp"]) != (tp, pp):
        raise ValueError(f"{path} was saved with tp={meta['tp']}, pp={meta['pp']} but this run has "
                         f"tp={tp}, pp={pp}; {hint}")
    return meta


def read_meta(path: str | Path) -> dict[str, Any]:
    file = Path(path) / PARALLEL_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a sharded checkpoint (no {PARALLEL_FILE})")
    meta = json.loads(file.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{file}: unknown format {meta.get('format')!r} (expected {FORMAT})")
    return meta


def _shape_only_factory(tp: int, tp_rank: int) -> LayerFactory:
    """A tensor-parallel factory without a process group: good for building shard-shaped (meta) layers only."""
    from .tensor_parallel import TorchTensorParallelFactory

    class ShapeOnly(TorchTensorParallelFactory):
        def __init__(self) -> None:  # no collective runs while a model is built
            self.group, self.tp_size, self.tp_rank, self.sequence_parallel = None, tp, tp_rank, False

    return ShapeOnly()


def shard_shapes(config: Any, tp: int, tp_rank: int = 0) -> dict[str, torch.Size]:
    """State-dict shapes of tensor rank `tp_rank`'s model (built on the meta device, no process group)."""
    from bmojo_neuron import BMojoForCausalLM

    with torch.device("meta"):
        if tp == 1:
            model = BMojoForCausalLM(config)
        else:
            with use_layer_factory(_shape_only_factory(tp, tp_rank)):
                model = BMojoForCausalLM(config)
    return {name: t.shape for name, t in model.state_dict().items()}


def tied_names(config: Any) -> set[str]:
    """Names the files leave out because they alias another tensor (``lm_head.weight`` when tied)."""
    return {TIED_HEAD} if getattr(config, "tie_word_embeddings", False) else set()


def save_tensors(tensors: dict[str, Tensor], path: Path, skip: set[str] = frozenset()) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items() if k not in skip}, str(path))


def load_file_tensors(path: Path) -> dict[str, Tensor]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} is missing: the checkpoint is incomplete")
    return load_file(str(path))


def load_into(model: nn.Module, tensors: dict[str, Tensor], what: str) -> None:
    """`load_state_dict` that accepts the tied names being absent, and nothing else missing."""
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if k not in tied_names(model.config)]
    if missing or unexpected:
        raise ValueError(f"{what} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def consolidate_model(path: str | Path) -> dict[str, Tensor]:
    """The full model state dict from a sharded checkpoint's ``rank-TT-PP`` files (every stage's)."""
    path = Path(path)
    meta = read_meta(path)
    out = _consolidate_stages(path, meta)
    from bmojo_neuron import BMojoConfig

    missing = sorted(set(meta["full_shapes"]) - set(out)
                     - tied_names(BMojoConfig.from_json_file(str(path / "config.json"))))
    if missing:
        raise ValueError(f"{path}: no stage file holds {missing[:5]}; the checkpoint is incomplete")
    return out


def _consolidate_stages(path: Path, meta: dict[str, Any]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for pp_rank in range(meta["pp"]):
        shards = []
        for tp_rank in range(meta["tp"]):
            file = path / model_file(tp_rank, pp_rank)
            if not file.is_file():
                raise FileNotFoundError(f"{file} is missing: the checkpoint is incomplete")
            shards.append(load_file(str(file)))
        for name in shards[0]:
            dim = meta["split_dims"][name]
            out[name] = shards[0][name] if dim is None else torch.cat([s[name] for s in shards], dim=dim)
            if list(out[name].shape) != meta["full_shapes"][name]:
                raise ValueError(f"{path}: {name} consolidates to {list(out[name].shape)}, "
                                 f"expected {meta['full_shapes'][name]}")
    return out


def load_optim_files(path: Path, tp_rank: int, pp_rank: int) -> list[dict[str, Any]]:
    """Every data rank's optimizer file of (tp_rank, pp_rank), in data-rank order."""
    files = sorted(path.glob(f"optim-{tp_rank:02d}-{pp_rank:02d}-*.pt"))
    if not files:
        raise FileNotFoundError(f"{path} has no optimizer file for tensor rank {tp_rank}, stage {pp_rank}")
    return [torch.load(f, map_location="cpu", weights_only=False) for f in files]


def merge_named_states(blobs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """One (tp, pp) shard's optimizer states from its data ranks' files (ZeRO-1 partitions are disjoint)."""
    merged: dict[str, dict[str, Any]] = {}
    for blob in blobs:
        merged.update(blob["optimizer"])
    return merged


def consolidate_optimizer(path: str | Path) -> dict[str, Any]:
    """Full-model AdamW states keyed by name, plus the scheduler and RNG states of rank 0."""
    path = Path(path)
    meta = read_meta(path)
    full: dict[str, dict[str, Any]] = {}
    first = None
    for pp_rank in range(meta["pp"]):
        per_tp = []
        for tp_rank in range(meta["tp"]):
            blobs = load_optim_files(path, tp_rank, pp_rank)
            first = first or blobs[0]
            per_tp.append(merge_named_states(blobs))
        for name, state in per_tp[0].items():
            dim = meta["split_dims"][name]
            full[name] = {
                key: (value if dim is None or not isinstance(value, Tensor) or value.dim() == 0
                      else torch.cat([s[name][key] for s in per_tp], dim=dim))
                for key, value in state.items()
            }
    return {"optimizer": full, "scheduler": first["scheduler"], "rng": first["rng"]}


def shard_named_states(full: dict[str, dict[str, Any]], dims: dict[str, int | None], names: set[str], tp: int,
                       tp_rank: int) -> dict[str, dict[str, Any]]:
    """Tensor rank `tp_rank`'s optimizer states (of the parameters in `names`) from full ones."""
    out = {}
    for name, state in full.items():
        if name not in names:
            continue
        dim = dims[name]
        out[name] = {key: (value.chunk(tp, dim=dim)[tp_rank].clone()
                           if dim is not None and isinstance(value, Tensor) and value.dim() > 0 else value)
                     for key, value in state.items()}
    return out


def parallel_meta(full_shapes: dict[str, torch.Size], local_shapes: dict[str, torch.Size], tp: int, pp: int, dp: int,
                  sp: bool, zero1: bool) -> dict[str, Any]:
    """The content of ``parallel.json`` (split dims computed from full vs. tensor-rank shapes)."""
    full_like = {k: torch.empty(s, device="meta") for k, s in full_shapes.items()}
    dims = split_dims(full_like, local_shapes, tp)
    return {"format": FORMAT, "tp": tp, "pp": pp, "dp": dp, "sp": sp, "zero1": zero1,
            "split_dims": dims, "full_shapes": {k: list(s) for k, s in full_shapes.items()}}
