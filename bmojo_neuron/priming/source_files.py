"""A source checkpoint folder as its files describe it, read without torch or transformers.

`check_source_files` is what `prime` asks before torch loads (seconds): the folder, its config.json and
``model_type``, and, for safetensors weights, that the names and shapes in each file's header are the ones
config.json implies. A safetensors file starts with an 8-byte little-endian header length and a JSON header
mapping each tensor name to its ``dtype``, ``shape`` and ``data_offsets`` (the format section of the
safetensors README), so reading it costs a few kilobytes, not the weights. `source.read_source`
and `source.load_source_weights` make the same checks again on what transformers and torch read (config
defaults filled in, the tensors themselves), so a folder the quick look cannot judge is still judged.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..checkpoints.layout import has_run

SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
TORCH_BIN, TORCH_BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
# A checkpoint's header is kilobytes (a few megabytes for thousands of tensors): a length past this is not one,
# and reading it would cost what the quick look exists to avoid
MAX_HEADER_BYTES = 100_000_000
MAX_HEAD_DIM = 128
# What a user who points prime at a B'MOJO model may have meant: a transformer made of one (all `A` layers)
EXPORT_HINT = " (an all-attention B'MOJO model is written as one by `bmojo-neuron export-transformer RUN OUTPUT`)"
# Per decoder layer, the tensors priming copies whatever the pattern (`mapping.shared_weights`)
LAYER_TENSORS = ("input_layernorm.weight", "post_attention_layernorm.weight", "mlp.gate_proj.weight",
                 "mlp.up_proj.weight", "mlp.down_proj.weight")


@dataclass(frozen=True)
class SourceSizes:
    """The sizes config.json gives a Llama-family model, which fix every weight's shape."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


def raw_config(path: Path) -> dict[str, Any]:
    """config.json of the folder `path` as written (no defaults filled in), refusing a path that is no
    Hugging Face checkpoint folder of a family prime reads."""
    if not path.is_dir():
        raise FileNotFoundError(f"source {path}: not a local directory (prime reads a Hugging Face checkpoint folder)")
    if not (path / "config.json").is_file():
        if has_run(path):
            raise ValueError(f"source {path}: a bmojo-neuron run's folder: its model is B'MOJO already; prime reads "
                             f"a transformer{EXPORT_HINT}")
        raise FileNotFoundError(f"source {path}: no config.json (not a Hugging Face checkpoint folder)")
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"source {path}: config.json is not readable JSON: {err}") from None
    if not isinstance(config, dict):
        raise ValueError(f"source {path}: config.json is not readable JSON: not an object")
    model_type = config.get("model_type")
    if model_type == "bmojo":
        raise ValueError(f"source {path}: is already a B'MOJO checkpoint; prime reads a transformer{EXPORT_HINT}")
    if model_type not in SUPPORTED_TYPES:
        raise ValueError(f"source {path}: model_type {model_type!r} is not supported; prime reads "
                         f"{', '.join(SUPPORTED_TYPES)} checkpoints")
    return config


def check_head_dim(path: Path, head_dim: int) -> None:
    """Refuse a head_dim B'MOJO's kernels do not take (rotary pairs need it even; one tile holds 128)."""
    if head_dim > MAX_HEAD_DIM or head_dim % 2:
        raise ValueError(f"source {path}: head_dim {head_dim} is not supported (B'MOJO needs an even head_dim "
                         f"<= {MAX_HEAD_DIM}, one Trainium partition tile)")


def refuse_unsupported(path: Path, config: Mapping[str, Any]) -> None:
    """Refuse what B'MOJO has no counterpart for: another MLP activation, MLP biases, quantized weights, experts."""
    act = config.get("hidden_act", "silu")
    problems = [
        (act != "silu", f"hidden_act {act!r} (B'MOJO's MLP is SwiGLU: silu)"),
        (bool(config.get("mlp_bias")), "mlp_bias true (B'MOJO's MLP has no biases)"),
        (config.get("quantization_config") is not None, "quantized weights (quantization_config); "
                                                        "prime a full-precision checkpoint"),
        (config.get("num_experts") or config.get("num_local_experts"), "mixture-of-experts layers"),
    ]
    for bad, what in problems:
        if bad:
            raise ValueError(f"source {path}: {what} is not supported")


def sizes_written(config: Mapping[str, Any]) -> SourceSizes | None:
    """The sizes of a config.json that states them all (``head_dim`` and ``num_key_value_heads`` may be left out,
    as transformers allows); None when one is missing or the heads do not divide the hidden size, which only
    transformers' defaults and its own message settle."""
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    if not all(isinstance(config.get(key), int) and config[key] > 0 for key in keys):
        return None
    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    head_dim = config.get("head_dim") or (hidden // heads if hidden % heads == 0 else None)
    kv_heads = config.get("num_key_value_heads") or heads
    if not isinstance(head_dim, int) or not isinstance(kv_heads, int):
        return None
    return SourceSizes(config["vocab_size"], hidden, config["intermediate_size"], config["num_hidden_layers"],
                       heads, kv_heads, head_dim)


def expected_shapes(sizes: SourceSizes) -> dict[str, tuple[int, ...]]:
    """The shape config.json implies for each tensor priming reads (Llama names; biases and q/k norms included
    whether or not the source has them: only the names present are compared)."""
    d, inner = sizes.hidden_size, sizes.intermediate_size
    q, kv = sizes.num_heads * sizes.head_dim, sizes.num_kv_heads * sizes.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (sizes.vocab_size, d), "lm_head.weight": (sizes.vocab_size, d),
        "model.norm.weight": (d,),
    }
    per_layer = {
        "input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
        "mlp.gate_proj.weight": (inner, d), "mlp.up_proj.weight": (inner, d), "mlp.down_proj.weight": (d, inner),
        "self_attn.q_proj.weight": (q, d), "self_attn.k_proj.weight": (kv, d), "self_attn.v_proj.weight": (kv, d),
        "self_attn.o_proj.weight": (d, q), "self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,),
        "self_attn.v_proj.bias": (kv,), "self_attn.o_proj.bias": (d,),
        "self_attn.q_norm.weight": (sizes.head_dim,), "self_attn.k_norm.weight": (sizes.head_dim,),
    }
    for i in range(sizes.num_layers):
        shapes.update({f"model.layers.{i}.{name}": shape for name, shape in per_layer.items()})
    return shapes


def llama_names(names: Iterable[str]) -> dict[str, str]:
    """``name in the file -> Llama name``: weights saved from the bare decoder (no ``model.`` prefix) get it."""
    names = list(names)
    if not names or any(name.startswith("model.") for name in names):
        return {name: name for name in names}
    return {name: name if name == "lm_head.weight" else f"model.{name}" for name in names}


def check_layout(path: Path, sizes: SourceSizes, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Refuse weights (`shapes`: Llama name -> shape) that config.json's `sizes` do not describe: another
    number of layers, a tensor every layer needs missing, or a shape other than the one the sizes imply."""
    layers = {int(name.split(".")[2]) for name in shapes if name.startswith("model.layers.")
              and name.split(".")[2].isdigit()}
    if layers and max(layers) + 1 != sizes.num_layers:
        raise ValueError(f"source {path}: the weights hold {max(layers) + 1} layers, but config.json says "
                         f"num_hidden_layers {sizes.num_layers}; the config does not describe these weights")
    needed = ["model.embed_tokens.weight", "model.norm.weight",
              *(f"model.layers.{i}.{name}" for i in range(sizes.num_layers) for name in LAYER_TENSORS)]
    missing = [name for name in needed if name not in shapes]
    if missing:
        raise ValueError(f"source {path}: the weights have no {missing[0]}"
                         f"{f' (and {len(missing) - 1} more missing)' if len(missing) > 1 else ''}; is the "
                         "checkpoint complete?")
    for name, shape in expected_shapes(sizes).items():
        if name in shapes and tuple(shapes[name]) != shape:
            raise ValueError(f"source {path}: {name} has shape {tuple(shapes[name])} in the weights, "
                             f"but config.json implies {shape}; the config does not describe these weights")


def weight_files(path: Path) -> list[Path]:
    """The weight files of the folder `path`: one file, or the shards its index names (all present)."""
    for single, index in ((SAFETENSORS, SAFETENSORS_INDEX), (TORCH_BIN, TORCH_BIN_INDEX)):
        if (path / single).is_file():
            return [path / single]
        if (path / index).is_file():
            shards = sorted(set(json.loads((path / index).read_text())["weight_map"].values()))
            missing = [s for s in shards if not (path / s).is_file()]
            if missing:
                raise FileNotFoundError(f"source {path}: {index} names missing files: {', '.join(missing)}")
            return [path / s for s in shards]
    raise FileNotFoundError(f"source {path}: no weights ({SAFETENSORS}, {SAFETENSORS_INDEX}, {TORCH_BIN} "
                            f"or {TORCH_BIN_INDEX})")


def unreadable_weights(file: Path, problem: str) -> ValueError:
    """The one-line error of a weight file that cannot be read, whoever finds it."""
    return ValueError(f"source {file.parent}: {file.name} is not a readable weight file ({problem}); "
                      "is it complete?")


def safetensors_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """``name -> shape`` from the header of the safetensors file `file`; a file too short for the tensors its
    header places (cut short in a copy) or with no readable header is refused (`unreadable_weights`)."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        start = f.read(8)
        length = struct.unpack("<Q", start)[0] if len(start) == 8 else None
        if length is None or length > min(size - 8, MAX_HEADER_BYTES):
            raise unreadable_weights(file, "no safetensors header")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise unreadable_weights(file, "its safetensors header is not JSON") from None
    if not isinstance(header, dict):
        raise unreadable_weights(file, "its safetensors header is not JSON")
    tensors = {name: entry for name, entry in header.items() if name != "__metadata__"}
    try:
        end = max((int(entry["data_offsets"][1]) for entry in tensors.values()), default=0)
        shapes = {name: tuple(int(n) for n in entry["shape"]) for name, entry in tensors.items()}
    except (KeyError, IndexError, TypeError, ValueError):
        raise unreadable_weights(file, "its safetensors header lacks a tensor's shape or data_offsets") from None
    if 8 + length + end > size:
        raise unreadable_weights(file, f"{size} bytes, its header places tensors up to byte {8 + length + end}")
    return shapes


def check_source_files(path: str | Path) -> dict[str, Any]:
    """What the source folder `path` shows without torch: a folder of a supported family, with no feature
    B'MOJO lacks (`refuse_unsupported`) and a head size it takes, whose safetensors
    weights (their headers) are the ones its config.json describes. ``pytorch_model.bin`` weights are pickles,
    read only by torch: the load checks them. A config.json without every size is left to transformers.
    Returns config.json as written."""
    path = Path(path).expanduser()
    config = raw_config(path)
    refuse_unsupported(path, config)
    if isinstance(config.get("head_dim"), int):
        check_head_dim(path, config["head_dim"])
    sizes = sizes_written(config)
    files = weight_files(path)
    if sizes is None or any(file.suffix != ".safetensors" for file in files):
        return config
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        shapes.update(safetensors_shapes(file))
    check_layout(path, sizes, {llama_names(shapes)[name]: shape for name, shape in shapes.items()})
    return config
