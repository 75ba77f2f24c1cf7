"""The sharded checkpoint format of parallel runs (torchrun and Neuron alike): files, metadata, consolidation.

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
``shard``, `bmojo_neuron.checkpoints.convert`): NxD cannot reshard on load either.

What every rank of every backend does the same way lives here: `save_sharded` (one
temp dir all ranks write into, published by rank 0 between barriers), `load_rank_view`
(a rank's optimizer, scheduler and RNG states) and `load_rank_weights`. The
backend-specific halves (how tensors reach the host) are `torch_sharded` and `neuron`.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from safetensors.torch import save_file
from torch import Tensor

from bmojo_neuron.configuration_bmojo import BMojoConfig
from bmojo_neuron.modeling_bmojo import BMojoForCausalLM
from bmojo_neuron.parallel.sharding import EMBEDDING, TIED_HEAD, load_into, split_dims, tied_names

from .layout import CONFIG_FILE, PARALLEL_FILE, is_sharded, latest_intact_checkpoint, publish_step, step_dir_name
from .manifest import DamagedCheckpointError, read_safetensors, read_torch_file
from .state import Checkpoint, TrainerState, read_recipe, read_trainer_state

TRAINING_STATE_FILE = "training_state.pt"  # optimizer/scheduler/trainer state beside a consolidated export
FORMAT = "bmojo-sharded-v1"
CONVERT_HINT = ("convert it with `bmojo-neuron checkpoint consolidate RUN_DIR OUT` then "
                "`bmojo-neuron checkpoint shard OUT --tp N --pp M --output-dir NEW_RUN_DIR`")
__all__ = ["EMBEDDING", "TIED_HEAD", "load_into", "tied_names"]  # re-exported: the names files use


class ShardRanks(Protocol):
    """Where a rank sits in the ``dp × pp × tp`` grid (`ParallelLayout`, the Neuron runtime)."""

    @property
    def tp(self) -> int: ...
    @property
    def pp(self) -> int: ...
    @property
    def tp_rank(self) -> int: ...
    @property
    def pp_rank(self) -> int: ...
    @property
    def dp_rank(self) -> int: ...


def model_file(tp_rank: int, pp_rank: int) -> str:
    return f"rank-{tp_rank:02d}-{pp_rank:02d}.safetensors"


def optim_file(tp_rank: int, pp_rank: int, dp_rank: int) -> str:
    return f"optim-{tp_rank:02d}-{pp_rank:02d}-{dp_rank:03d}.pt"


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


def save_tensors(tensors: dict[str, Tensor], path: Path, skip: set[str] = frozenset()) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items() if k not in skip}, str(path))


def load_file_tensors(path: Path) -> dict[str, Tensor]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} is missing: the checkpoint is incomplete")
    return read_safetensors(Path(path))


def consolidate_model(path: str | Path) -> dict[str, Tensor]:
    """The full model state dict from a sharded checkpoint's ``rank-TT-PP`` files (every stage's)."""
    path = Path(path)
    meta = read_meta(path)
    out = _consolidate_stages(path, meta)
    missing = sorted(set(meta["full_shapes"]) - set(out)
                     - tied_names(BMojoConfig.from_json_file(str(path / CONFIG_FILE))))
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
            shards.append(read_safetensors(file))
        for name in shards[0]:
            dim = meta["split_dims"][name]
            out[name] = shards[0][name] if dim is None else torch.cat([s[name] for s in shards], dim=dim)
            if list(out[name].shape) != meta["full_shapes"][name]:
                raise ValueError(f"{path}: {name} consolidates to {list(out[name].shape)}, "
                                 f"expected {meta['full_shapes'][name]}")
    return out


def load_optim_files(path: Path, tp_rank: int, pp_rank: int) -> list[dict[str, Any]]:
    """Every data rank's optimizer file of (tp_rank, pp_rank), in data-rank order."""
    return list(_optim_blobs(path, tp_rank, pp_rank).values())


def _optim_blobs(path: Path, tp_rank: int, pp_rank: int) -> dict[str, dict[str, Any]]:
    """``file name -> content`` of every data rank's optimizer file of (tp_rank, pp_rank), in data-rank order."""
    files = sorted(path.glob(f"optim-{tp_rank:02d}-{pp_rank:02d}-*.pt"))
    if not files:
        raise FileNotFoundError(f"{path} has no optimizer file for tensor rank {tp_rank}, stage {pp_rank}")
    return {f.name: read_torch_file(f) for f in files}


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


def consolidated_model(path: str | Path) -> BMojoForCausalLM:
    """The full `BMojoForCausalLM` of a sharded checkpoint, in eval mode."""
    path = Path(path)
    model = BMojoForCausalLM(BMojoConfig.from_json_file(str(path / CONFIG_FILE)))
    load_into(model, consolidate_model(path), str(path))
    return model.eval()


# ------------------------------------------------------------------ one rank's save and resume


def save_sharded(run_dir: Path, state: TrainerState, is_main: bool, barrier: Callable[[str], None],
                 write_rank_files: Callable[[Path], None], meta: dict[str, Any], recipe: dict[str, Any], config: Any,
                 keep_last: int) -> Path:
    """Every rank writes its files (`write_rank_files(tmp)`) into one temp dir; rank 0 publishes it (then
    `latest`) after a barrier. Collective: every rank calls it, `barrier(tag)` waits for all of them."""
    name = step_dir_name(state.step)
    tmp = run_dir / f".tmp-{name}-parallel"  # one name every rank knows without communicating
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(f"{name}-open")
    try:
        write_rank_files(tmp)
    finally:
        barrier(f"{name}-written")
    if is_main:
        publish_sharded(tmp, run_dir, name, meta, recipe, config, state, keep_last)
    barrier(f"{name}-published")
    return run_dir / name


def publish_sharded(tmp: Path, run_dir: Path, name: str, meta: dict[str, Any], recipe: dict[str, Any],
                    config: Any, state: Any, keep_last: int) -> None:
    """Rank 0's end of a sharded save: ``parallel.json``, then `publish_step`."""
    try:
        (tmp / PARALLEL_FILE).write_text(json.dumps(meta, indent=1))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_step(tmp, run_dir, name, recipe, config, state, keep_last)


def load_rank_view(run_dir: Path, ranks: ShardRanks, tied_copy: bool = False) -> Checkpoint | None:
    """This rank's view of the latest checkpoint of `run_dir` (None without one): the merged optimizer states
    of its (tensor rank, stage) shard from every data rank's file, its own scheduler and RNG states.

    `tied_copy`: this rank is a last stage holding the copy of a tied embedding; stage 0's
    embedding states are added as its ``lm_head.weight``'s. The degrees must match the run's.
    """
    # Sizes only: every rank must reach the same verdict without each reading every rank's bytes.
    first_rank = ranks.tp_rank == ranks.pp_rank == ranks.dp_rank == 0
    path = latest_intact_checkpoint(run_dir, hashes=False, on_skip=_warn_skipped if first_rank else None)
    if path is None:
        return None
    read_meta_for(path, ranks.tp, ranks.pp, CONVERT_HINT)
    blobs = _optim_blobs(path, ranks.tp_rank, ranks.pp_rank)
    own = blobs.get(optim_file(ranks.tp_rank, ranks.pp_rank, ranks.dp_rank), next(iter(blobs.values())))
    states = merge_named_states(list(blobs.values()))
    if tied_copy:
        embedding = merge_named_states(load_optim_files(path, ranks.tp_rank, 0))
        if EMBEDDING in embedding:  # absent for a warm start from a plain export
            states[TIED_HEAD] = embedding[EMBEDDING]
    return Checkpoint(path, read_trainer_state(path), read_recipe(path), states, own["scheduler"], own["rng"])


def _warn_skipped(problem: DamagedCheckpointError) -> None:
    print(f"warning: skipping {problem.directory.name}: {problem.file}: {problem.problem}; resuming from the "
          "newest intact checkpoint before it", file=sys.stderr, flush=True)


def load_rank_weights(path: Path, ranks: ShardRanks, tied_copy: bool = False) -> dict[str, Tensor]:
    """This rank's model file; with `tied_copy` its ``lm_head.weight`` is stage 0's embedding."""
    tensors = load_file_tensors(path / model_file(ranks.tp_rank, ranks.pp_rank))
    if tied_copy:
        embedding = load_file_tensors(path / model_file(ranks.tp_rank, 0))
        tensors[TIED_HEAD] = embedding[EMBEDDING]
    return tensors


def restore_lr(optimizer: Any, scheduler: Any) -> None:
    """Set the groups' lr from a just-restored scheduler (``LambdaLR.load_state_dict`` does not)."""
    for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr
