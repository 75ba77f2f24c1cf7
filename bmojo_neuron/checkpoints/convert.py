"""Change a run's parallel degrees: sharded checkpoint -> one `save_pretrained` directory -> sharded at any degree.

The consolidated directory is a normal Hugging Face export (``config.json``,
``model.safetensors``; `eval` / `generate` / `from_pretrained` read it) plus
``training_state.pt``: AdamW states keyed by parameter name, scheduler, RNG and
trainer state, so a run resumed from its re-sharded copy continues exactly.
Both directions check the source against its ``manifest.json`` first, write to a temp
directory with a manifest of its own (as the trainer does) and publish it with one rename.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from bmojo_neuron.configuration_bmojo import BMojoConfig
from bmojo_neuron.fsutil import publish_dir, write_text_atomic
from bmojo_neuron.parallel.pipeline import stage_of
from bmojo_neuron.parallel.sharding import shard_shapes, shard_state_dict

from . import layout
from . import sharded as fmt
from .export import save_for_hf
from .locate import check_shard_request, resolve_sharded
from .manifest import check_readable, read_safetensors, read_torch_file, verify_manifest, write_manifest
from .state import TrainerState, rng_states


def consolidate_checkpoint(source: str | Path, output: str | Path) -> Path:
    """Write the full model of a sharded checkpoint (and its training state) to `output`."""
    source, output = resolve_sharded(source), Path(output)
    if output.exists():
        raise ValueError(f"{output} already exists; pick a new output directory")
    verify_manifest(source)
    check_readable(source)  # the same for a checkpoint written before manifests existed
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = layout.new_tmp_dir(output.parent, output.name)
    try:
        recipe = json.loads((source / layout.RECIPE_FILE).read_text())
        tokenizer = str(recipe.get("data", {}).get("tokenizer") or "byte")
        save_for_hf(tmp, fmt.consolidated_model(source), recipe, tokenizer)
        state = json.loads((source / layout.STATE_FILE).read_text())
        torch.save({**fmt.consolidate_optimizer(source), "trainer_state": state, "recipe": recipe},
                   tmp / fmt.TRAINING_STATE_FILE)
        (tmp / layout.RECIPE_FILE).write_text(json.dumps(recipe, indent=2))
        info = {"tokenizer": tokenizer, "recipe": recipe, "consolidated_from": str(source), "step": state["step"]}
        (tmp / layout.RUN_INFO_FILE).write_text(json.dumps(info, indent=2))
        write_manifest(tmp)
        publish_dir(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


def shard_checkpoint(source: str | Path, run_dir: str | Path, tp: int, pp: int = 1,
                     recipe: dict[str, Any] | None = None) -> Path:
    """Write `source` (a `save_pretrained` dir, ideally from `consolidate_checkpoint`) as a sharded
    checkpoint of `run_dir` for tensor degree `tp` and pipeline degree `pp`; `latest` points at it.

    Without ``training_state.pt`` the checkpoint is step 0 with a fresh optimizer (a warm start) and the
    source's recipe (`source_recipe`).
    With ``pp > 1`` each stage's files hold that stage's tensors (`pipeline.stage_of`); a tied
    ``lm_head.weight`` is stored once, as stage 0's embedding.
    """
    source, run_dir = Path(source), Path(run_dir)
    check_shard_request(source, run_dir, tp, pp)
    verify_manifest(source)
    check_readable(source)  # the same for a directory written before manifests existed
    config = BMojoConfig.from_json_file(str(source / layout.CONFIG_FILE))
    if pp > config.num_hidden_layers:
        raise ValueError(f"--pp {pp} exceeds the model's {config.num_hidden_layers} layers")
    full = _read_pretrained_weights(source)
    state_file = source / fmt.TRAINING_STATE_FILE
    training = read_torch_file(state_file) if state_file.is_file() else None
    if recipe is None:
        recipe = training["recipe"] if training else source_recipe(source)
    recipe = json.loads(json.dumps(recipe))
    recipe.setdefault("parallel", {}).update(tp=tp, pp=pp)
    state = training["trainer_state"] if training else TrainerState().__dict__

    full_shapes = shard_shapes(config, 1)
    local_shapes = shard_shapes(config, tp)
    for name in fmt.tied_names(config):
        if name not in full and name in full_shapes:
            full[name] = full[fmt.EMBEDDING]
    missing = sorted(set(full_shapes) - set(full))
    if missing:
        raise ValueError(f"{source} lacks tensors of the model: {missing[:5]}")
    meta = fmt.parallel_meta(full_shapes, local_shapes, tp, pp, 1, bool(recipe["parallel"].get("sp", False)),
                             bool(recipe["parallel"].get("zero1", False)))
    meta["sharded_from"] = str(source.resolve())  # named by resume's refusal of a checkpoint no recipe trained
    run_dir.mkdir(parents=True, exist_ok=True)
    name = layout.step_dir_name(state["step"])
    tmp = layout.new_tmp_dir(run_dir, name)
    stages = [{n for n in local_shapes if stage_of(n, config, pp) == s} for s in range(pp)]
    try:
        for tp_rank in range(tp):
            shard = shard_state_dict(full, local_shapes, tp_rank, tp)
            for pp_rank, names in enumerate(stages):
                fmt.save_tensors({n: shard[n] for n in names}, tmp / fmt.model_file(tp_rank, pp_rank),
                                 fmt.tied_names(config))
                optimizer = {} if training is None else fmt.shard_named_states(
                    training["optimizer"], meta["split_dims"], names, tp, tp_rank)
                blob = {"optimizer": optimizer, "scheduler": training["scheduler"] if training else None,
                        "rng": training["rng"] if training else rng_states()}
                torch.save(blob, tmp / fmt.optim_file(tp_rank, pp_rank, 0))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # the trainer's own end of a save: parallel.json, recipe, config, trainer state, manifest, publish, `latest`
    fmt.publish_sharded(tmp, run_dir, name, meta, recipe, config, TrainerState(**state), keep_last=0)
    write_text_atomic(run_dir / layout.RECIPE_FILE, json.dumps(recipe, indent=2))
    return run_dir / name


def source_recipe(source: Path) -> dict[str, Any]:
    """The recipe a `save_pretrained` directory was trained with: its ``recipe.json``, else the one in
    ``bmojo_run.json`` (empty for a `prime` output, which no recipe trained), else none (``{}``)."""
    if (source / layout.RECIPE_FILE).is_file():
        return json.loads((source / layout.RECIPE_FILE).read_text())
    info = source / layout.RUN_INFO_FILE
    recipe = json.loads(info.read_text()).get("recipe") if info.is_file() else None
    return recipe if isinstance(recipe, dict) else {}


def _read_pretrained_weights(source: Path) -> dict[str, torch.Tensor]:
    files = sorted(source.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{source} has no *.safetensors weights")
    out: dict[str, torch.Tensor] = {}
    for file in files:
        out.update(read_safetensors(file))
    return out
