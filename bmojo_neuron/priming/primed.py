"""Prime a B'MOJO model from a transformer checkpoint: config, weights, tokenizer, report.

`primed_config` derives the `BMojoConfig` (the source fixes the shapes, the pattern
says which layers keep full attention, the user may set every B'MOJO-specific field);
`prime_model` builds the model in memory; `prime` writes it as a Hugging Face folder
that `generate`, `eval` and the training recipes read.
"""

from __future__ import annotations

import json
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from ..checkpoints.export import quiet_transformers
from ..configuration_bmojo import BMojoConfig
from ..fsutil import check_new_output, publish_dir
from ..modeling_bmojo import BMojoForCausalLM
from .mapping import SSM_INITS, attention_ssm_mismatch, new_weights, seeded_paths, shared_weights
from .options import check_options, expand_pattern
from .source import SourceModel, copy_tokenizer_files, load_source_weights, read_source

RUN_INFO_FILE = "bmojo_run.json"  # the run-info file every exported model carries (tokenizer, recipe, ...)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class PrimedModel:
    model: Any  # BMojoForCausalLM
    source: SourceModel
    report: dict[str, Any]


def primed_config(source: SourceModel, pattern: str, overrides: Mapping[str, Any] | None = None) -> BMojoConfig:
    """The B'MOJO config of `source` primed with layer `pattern` and B'MOJO-specific `overrides`."""
    overrides = dict(overrides or {})
    fixed = source.config_fields()
    check_options(overrides, set(fixed) | {"layer_pattern", "num_hidden_layers"})
    fields = {**default_bmojo_fields(source), **overrides, **fixed,
              "layer_pattern": expand_pattern(pattern, source.num_layers)}
    return BMojoConfig(**fields)


def default_bmojo_fields(source: SourceModel) -> dict[str, Any]:
    """B'MOJO defaults for a primed model: an SSM shaped like the attention so it can be seeded from it."""
    fields: dict[str, Any] = {
        "ssm_mixer": "mamba2",
        "ssm_head_dim": source.head_dim,
        "ssm_state_size": source.head_dim,
        "ssm_n_groups": source.num_heads,
        "ssm_proj_bias": source.qkv_bias,
    }
    if (source.num_heads * source.head_dim) % source.hidden_size == 0:
        fields["ssm_expand"] = source.num_heads * source.head_dim // source.hidden_size
    windows = {w for w in source.sliding_windows if w is not None}
    if len(windows) == 1:
        fields["window_size"] = windows.pop()
    return fields


def prime_model(
    source_dir: str | Path,
    pattern: str,
    overrides: Mapping[str, Any] | None = None,
    ssm_init: str = "auto",
    seed: int = 0,
) -> PrimedModel:
    """Build the primed model (float32, eval mode) in memory."""
    if ssm_init not in ("auto",) + SSM_INITS:
        raise ValueError(f"--ssm-init {ssm_init!r}: choose one of auto, {', '.join(SSM_INITS)}")
    source = read_source(source_dir)
    config = primed_config(source, pattern, overrides)
    notes = _notes(source, config)
    needs_ssm = any(kind in "BFM" for kind in config.layer_pattern)
    mismatch = attention_ssm_mismatch(config) if needs_ssm else None
    if ssm_init == "attention" and mismatch is not None:
        raise ValueError(f"--ssm-init attention: the SSM is not shaped like the attention ({mismatch})")
    if ssm_init == "auto":
        ssm_init = "attention" if mismatch is None else "random"
        if needs_ssm and mismatch is not None:
            notes.append(f"the SSM keeps the Mamba initialisation: it cannot be seeded from attention ({mismatch})")

    tensors = load_source_weights(source)
    mapped = shared_weights(tensors, config)
    seeded = new_weights(tensors, config, ssm_init)
    torch.manual_seed(seed)
    model = BMojoForCausalLM(config).float().eval()
    missing, unexpected = model.load_state_dict({**mapped, **seeded}, strict=False)
    if unexpected:
        raise RuntimeError(f"priming produced names the model does not have: {unexpected[:5]}")
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    initialised = sorted(set(missing) - tied)
    report = {
        "source": str(source.path.resolve()),
        "source_model_type": source.model_type,
        "layer_pattern": config.layer_pattern,
        "ssm_init": ssm_init if needs_ssm else None,
        "seed": seed,
        "copied": _count(model, mapped),
        "seeded_from_source": _count(model, seeded),
        "seeded_paths": seeded_paths(seeded),
        "initialised": _count(model, initialised),
        "initialised_names": _group_names(initialised),
        "notes": notes,
        "source_max_position_embeddings": source.max_position_embeddings,
    }
    return PrimedModel(model, source, report)


def prime(
    source_dir: str | Path,
    output_dir: str | Path,
    pattern: str,
    overrides: Mapping[str, Any] | None = None,
    ssm_init: str = "auto",
    seed: int = 0,
    dtype: str = "float32",
    overwrite: bool = False,
) -> PrimedModel:
    """Prime and write `output_dir` (model, config, tokenizer files, ``bmojo_run.json`` with the report)."""
    output = Path(output_dir).expanduser()
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if output.resolve() == Path(source_dir).expanduser().resolve():
        raise ValueError(f"OUTPUT {output} is the source folder; write the primed model elsewhere")
    check_new_output(output, overwrite)
    primed = prime_model(source_dir, pattern, overrides, ssm_init, seed)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".tmp-prime-{uuid.uuid4().hex[:8]}"
    try:
        with quiet_transformers():
            primed.model.to(DTYPES[dtype]).save_pretrained(str(tmp))
        tokenizer = _copy_tokenizer(primed.source, tmp, output)
        info = {"tokenizer": tokenizer, "recipe": {}, "priming": primed.report}
        (tmp / RUN_INFO_FILE).write_text(json.dumps(info, indent=2))
        publish_dir(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    primed.model.float()
    return primed


def _copy_tokenizer(source: SourceModel, tmp: Path, output: Path) -> str | None:
    """Copy the tokenizer files; the tokenizer the primed folder names (itself, or what the source named)."""
    if copy_tokenizer_files(source.path, tmp):
        return str(output.resolve())
    info = source.path / RUN_INFO_FILE
    if info.is_file():  # a source exported by bmojo-neuron names its tokenizer (e.g. "byte")
        return json.loads(info.read_text()).get("tokenizer")
    return None


def _notes(source: SourceModel, config: BMojoConfig) -> list[str]:
    notes = []
    for i, (window, kind) in enumerate(zip(source.sliding_windows, config.layer_pattern)):
        if window is None:
            continue
        if kind == "A":
            notes.append(f"layer {i}: the source attends over a {window}-token sliding window, the primed 'A' layer "
                         f"over all past tokens (the same up to {window} tokens)")
        elif kind in "SFB" and config.window_size != window:
            notes.append(f"layer {i}: the source's sliding window is {window}, the primed window_size "
                         f"{config.window_size}")
    return notes


def _count(model: Any, names: Any) -> int:
    params = dict(model.named_parameters(remove_duplicate=False))
    return int(sum(params[n].numel() for n in set(names) if n in params))


def _group_names(names: list[str]) -> list[str]:
    """Parameter names with the layer index replaced by ``*`` (a short, readable list)."""
    import re

    return sorted({re.sub(r"layers\.\d+\.", "layers.*.", n) for n in names})
