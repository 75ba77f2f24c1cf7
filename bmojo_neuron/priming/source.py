"""Read a local Hugging Face causal-LM directory (Llama, Mistral, Qwen2, Qwen3) for priming.

`read_source` checks everything B'MOJO cannot reproduce before any weight is read and
raises one `ValueError` naming it; `load_source_weights` reads the tensors from
``model.safetensors`` (one file or sharded with an index) or ``pytorch_model.bin``.
Nothing here downloads: the path must be a local directory.

What is supported (and mapped onto `BMojoConfig` fields by `SourceModel.config_fields`):
GQA (``num_key_value_heads``), an explicit ``head_dim`` up to 128, RoPE theta with
no, ``linear`` or ``llama3`` frequency scaling, tied or untied embeddings, the
RMSNorm epsilon, SwiGLU MLPs (``hidden_act`` silu, no MLP bias), Llama's optional
``attention_bias`` (q, k, v and o), Qwen2's q/k/v biases (no o bias), Qwen3's per-head
q/k RMSNorms, and Mistral / Qwen sliding windows (recorded per layer, see
`SourceModel.sliding_windows`).
"""

from __future__ import annotations

import pickle
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .source_files import (SourceSizes, check_head_dim, check_layout, llama_names, raw_config,
                           refuse_unsupported, unreadable_weights, weight_files)

ROPE_TYPES = ("default", "linear", "llama3")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)


@dataclass
class SourceModel:
    """The facts of a source checkpoint that priming needs (all read from its config.json)."""

    path: Path
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    qk_norm: bool
    sliding_windows: list[int | None] = field(default_factory=list)  # per layer; None = full attention
    special_tokens: dict[str, Any] = field(default_factory=dict)
    # B'MOJO has no position limit (RoPE), so BMojoConfig has no such field; the priming report keeps the
    # source's value so that `export_transformer` can write it back
    max_position_embeddings: int | None = None

    def config_fields(self) -> dict[str, Any]:
        """The `BMojoConfig` fields the source fixes (a user override of one of them is refused)."""
        return {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling_params": self.rope_scaling,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.qkv_bias,
            "attention_output_bias": self.o_bias,
            "qk_norm": self.qk_norm,
            **self.special_tokens,
        }


def copy_tokenizer_files(source: Path, folder: Path, replace: bool = True) -> bool:
    """Copy `source`'s tokenizer files (`TOKENIZER_FILES`) into `folder` (only those it lacks unless `replace`);
    whether a tokenizer itself came with them (not only ``generation_config.json`` or a chat template), so that
    `folder` can name itself as its tokenizer."""
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file() and (replace or not (folder / name).exists()):
            shutil.copy2(source / name, folder / name)
            copied.append(name)
    return any(name.startswith("tokenizer") or name in ("vocab.json", "merges.txt") for name in copied)


def read_source(path: str | Path) -> SourceModel:
    """Check and describe the checkpoint in the local directory `path`."""
    path = Path(path).expanduser()
    config = _load_config(path)
    model_type = config["model_type"]
    refuse_unsupported(path, config)
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    check_head_dim(path, head_dim)
    theta, scaling = _rope(path, config)
    attention_bias = bool(config.get("attention_bias", False))
    return SourceModel(
        path=path,
        model_type=model_type,
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        intermediate_size=config["intermediate_size"],
        rms_norm_eps=config["rms_norm_eps"],
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        qkv_bias=True if model_type == "qwen2" else attention_bias,
        o_bias=False if model_type == "qwen2" else attention_bias,
        qk_norm=model_type == "qwen3",
        sliding_windows=_sliding_windows(config),
        special_tokens={k: config.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None},
        max_position_embeddings=config.get("max_position_embeddings"),
    )


def _load_config(path: Path) -> dict[str, Any]:
    """The checkpoint's config with the defaults of its transformers class filled in."""
    from huggingface_hub.errors import StrictDataclassError  # transformers' config validation errors
    from transformers import AutoConfig

    raw = raw_config(path)
    if isinstance(raw.get("head_dim"), int):  # transformers refuses some (odd) with its own, longer message
        check_head_dim(path, raw["head_dim"])
    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True).to_dict()
    except (OSError, ValueError, KeyError, TypeError, StrictDataclassError) as err:
        message = " ".join(str(err).split())  # transformers' validation messages span several lines
        raise ValueError(f"source {path}: config.json could not be read as a {raw['model_type']} config: "
                         f"{message}") from None


def _rope(path: Path, config: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """RoPE theta and the frequency scaling, from transformers 5's ``rope_parameters`` or the older keys."""
    params = dict(config.get("rope_parameters") or {})
    if not params:  # transformers 4 layout: rope_theta + rope_scaling
        params = dict(config.get("rope_scaling") or {})
        params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"source {path}: RoPE type {rope_type!r} is not supported (supported: "
                         f"{', '.join(ROPE_TYPES)}; dynamic, yarn and longrope rescale with the length or the scores)")
    partial = params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ValueError(f"source {path}: partial_rotary_factor {partial} is not supported (B'MOJO rotates the whole head)")
    if rope_type == "default":
        return float(params["rope_theta"]), None
    keys = ("factor",) if rope_type == "linear" else (
        "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keys if k not in params]
    if missing:
        raise ValueError(f"source {path}: RoPE scaling {rope_type!r} lacks {', '.join(missing)}")
    return float(params["rope_theta"]), {"rope_type": rope_type, **{k: params[k] for k in keys}}


def _sliding_windows(config: dict[str, Any]) -> list[int | None]:
    layers = config["num_hidden_layers"]
    window = config.get("sliding_window")
    if config["model_type"] == "mistral":
        return [window] * layers
    if config["model_type"] == "llama" or window is None:
        return [None] * layers
    types = config.get("layer_types") or ["full_attention"] * layers
    return [window if kind == "sliding_attention" else None for kind in types]


# ------------------------------------------------------------------------------- weights


def load_source_weights(source: SourceModel, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """Every tensor of the checkpoint, named ``model.…`` / ``lm_head.weight`` as in `LlamaForCausalLM`, in `dtype`;
    weights that config.json does not describe (a shape, a missing tensor, another layer count) are refused,
    naming what differs (`source_files.check_layout`)."""
    tensors: dict[str, Tensor] = {}
    for file in weight_files(source.path):
        tensors.update(_read_weight_file(file))
    tensors = {llama: tensors[name] for name, llama in llama_names(tensors).items()}
    sizes = SourceSizes(source.vocab_size, source.hidden_size, source.intermediate_size, source.num_layers,
                        source.num_heads, source.num_kv_heads, source.head_dim)
    check_layout(source.path, sizes, {name: tuple(t.shape) for name, t in tensors.items()})
    return {name: t.to(dtype) for name, t in tensors.items()}


def _read_weight_file(file: Path) -> dict[str, Tensor]:
    """The tensors of one weight file; a damaged file (truncated, not a checkpoint) is named in one line."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        if file.suffix == ".safetensors":
            return load_file(str(file))
        return torch.load(file, map_location="cpu", weights_only=True)
    except (SafetensorError, EOFError, RuntimeError, pickle.UnpicklingError) as err:
        raise unreadable_weights(file, " ".join(str(err).split()) or type(err).__name__) from None
