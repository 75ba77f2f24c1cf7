"""Write an all-attention B'MOJO model as a Hugging Face transformer checkpoint (the inverse of priming).

A B'MOJO model whose every layer is ``A`` is a Llama (Qwen2 with q/k/v biases but no
o bias, Qwen3 with q/k norms): `export_transformer` writes it in that family's layout,
so any Hugging Face tool reads it, and so `prime` can start a hybrid from a transformer
trained with this package (the CPU priming demo does exactly that).
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import torch

from ..checkpoints.export import quiet_transformers, save_tokenizer_files
from ..checkpoints.inference import load_trained
from ..checkpoints.exportable import exported_family
from ..config_fields import transformer_family
from ..fsutil import check_new_output, publish_dir
from ..modeling_bmojo import BMojoForCausalLM
from .mapping import ATTENTION, LAYER_NORMS, MLP, QK_NORMS
from .primed import RUN_INFO_FILE
from .source import copy_tokenizer_files


def transformer_config(config, dtype: torch.dtype = torch.float32, max_position_embeddings: int | None = None):
    """The Hugging Face config (Llama / Qwen2 / Qwen3) of an all-attention `BMojoConfig`, weights in `dtype`.

    `max_position_embeddings` is the source transformer's (B'MOJO has no such limit, so its config does not
    hold it); None leaves the Hugging Face class's default.
    """
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    family = transformer_family(config)
    rope = {"rope_type": "default", **(config.rope_scaling_params or {}), "rope_theta": config.rope_theta}
    fields = dict(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim, hidden_act="silu",
        rms_norm_eps=config.rms_norm_eps, rope_parameters=rope, tie_word_embeddings=config.tie_word_embeddings,
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
        dtype=dtype,
    )
    if max_position_embeddings is not None:
        fields["max_position_embeddings"] = max_position_embeddings
    if family == "llama":
        return LlamaConfig(**fields, attention_bias=config.attention_bias)
    if family == "qwen3":
        return Qwen3Config(**fields, attention_bias=config.attention_bias)
    return Qwen2Config(**fields)


def transformer_state_dict(model) -> dict[str, torch.Tensor]:
    """The weights of an all-attention `BMojoForCausalLM` under Hugging Face Llama / Qwen names."""
    state = model.state_dict()
    out = {"model.embed_tokens.weight": state["model.embed_tokens.weight"], "model.norm.weight": state["model.norm.weight"]}
    if not model.config.tie_word_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    for i in range(model.config.num_hidden_layers):
        layer = f"model.layers.{i}."
        for hf_name, name in LAYER_NORMS.items():
            out[layer + hf_name] = state[layer + name]
        for proj in MLP:
            out[f"{layer}mlp.{proj}.weight"] = state[f"{layer}mlp.{proj}.weight"]
        for part in [f"{p}.{kind}" for p in ATTENTION for kind in ("weight", "bias")] + [f"{n}.weight" for n in QK_NORMS]:
            if f"{layer}mixer.{part}" in state:
                out[f"{layer}self_attn.{part}"] = state[f"{layer}mixer.{part}"]
    return {name: t.detach().clone().contiguous() for name, t in out.items()}


def export_transformer(path: str | Path, output_dir: str | Path, overwrite: bool = False) -> Path:
    """Write the all-attention model behind `path` (run, checkpoint or export) as a Hugging Face folder, in the
    model's own dtype."""
    from transformers import AutoModelForCausalLM

    output = Path(output_dir).expanduser()
    check_new_output(output, overwrite)
    exported_family(path)  # a Hugging Face model or a hybrid is refused before any weight is read
    trained = load_trained(path)
    if not isinstance(trained.model, BMojoForCausalLM):
        raise ValueError(f"{path} is not a B'MOJO model (it holds a {type(trained.model).__name__})")
    dtype = next(trained.model.parameters()).dtype
    hf_config = transformer_config(trained.model.config, dtype, _source_max_positions(trained.source))
    hf_model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    weights = transformer_state_dict(trained.model)
    expected = set(hf_model.state_dict()) - ({"lm_head.weight"} if hf_config.tie_word_embeddings else set())
    if set(weights) != expected:
        raise RuntimeError(f"export names differ from {hf_config.model_type}'s: {sorted(set(weights) ^ expected)[:5]}")
    hf_model.load_state_dict(weights, strict=not hf_config.tie_word_embeddings)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".tmp-export-{uuid.uuid4().hex[:8]}"
    try:
        with quiet_transformers():
            hf_model.save_pretrained(str(tmp))
        _carry_tokenizer(trained.tokenizer, tmp, output, hf_config.vocab_size)
        publish_dir(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


def _source_max_positions(model_dir: Path) -> int | None:
    """The source transformer's ``max_position_embeddings`` when `model_dir` is a primed folder."""
    info = model_dir / RUN_INFO_FILE
    if not info.is_file():
        return None
    try:
        return (json.loads(info.read_text()).get("priming") or {}).get("source_max_position_embeddings")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def _carry_tokenizer(tokenizer: str, folder: Path, output: Path, vocab_size: int) -> None:
    """Put the tokenizer's files into `folder` (published as `output`) and name the tokenizer in
    ``bmojo_run.json``.

    A local tokenizer folder's files are copied and `output` names itself, as `prime` does. Any other tokenizer
    (``byte``, a hub name) is named as given, and its Hugging Face files are written as a run's ``final/``
    export writes them (only for a model whose vocabulary it fits), so ``pipeline(model=output)`` works; one
    this machine cannot load costs a warning.
    """
    source = Path(tokenizer).expanduser()
    # replace=False keeps the generation_config.json written with the model
    if source.is_dir() and copy_tokenizer_files(source, folder, replace=False):
        tokenizer = str(output.resolve())
    else:
        save_tokenizer_files(folder, tokenizer, vocab_size)
    (folder / RUN_INFO_FILE).write_text(json.dumps({"tokenizer": tokenizer, "recipe": {}}, indent=2))
