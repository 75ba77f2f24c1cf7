"""The models the benchmarks compare, built locally at matched size (no downloads).

Ours (`BMojoForCausalLM` with one layer letter repeated): ``bmojo`` (B), ``bmojo-f``
(F), ``mamba-only`` (M), ``swa-only`` (S), ``full-attn`` (A).
Baselines (Hugging Face `transformers`): ``hf-mamba`` (`MambaForCausalLM`),
``hf-mamba2`` (`Mamba2ForCausalLM`), ``hf-mistral-swa`` (`MistralForCausalLM` with
``sliding_window = w``) and ``hf-mistral`` (full attention).

Compiled (`train-step` only): ``bmojo-compiled`` is ``bmojo`` with its decoder layers
compiled as ``train.compile: true`` compiles them (`layers.compiled_layers`);
``hf-mistral-swa-compiled`` is ``hf-mistral-swa`` compiled whole (``nn.Module.compile``).
Each is built exactly as its eager twin (same width, same weights for the same seed).

Every candidate has the same ``d_model``, number of layers, vocabulary, heads and
head dim as the B'MOJO reference, tied embeddings, and its one free width (MLP
``intermediate_size``; for the MLP-free HF Mamba stacks the SSM inner width, i.e.
``expand``) chosen so that its non-embedding parameter count is as close as
possible to B'MOJO's. `Shape` holds the shared sizes.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import transformers
from huggingface_hub.errors import StrictDataclassError  # what transformers 5's strict configs raise
from torch import nn
from transformers import Mamba2Config, MambaConfig, MistralConfig

from bmojo_neuron.configuration_bmojo import BMojoConfig
from bmojo_neuron.layers.compiled_layers import compile_layers, default_backend
from bmojo_neuron.modeling_bmojo import BMojoForCausalLM, BMojoModel

OURS = {"bmojo": "B", "bmojo-f": "F", "mamba-only": "M", "swa-only": "S", "full-attn": "A"}
HF = ("hf-mamba", "hf-mamba2", "hf-mistral-swa", "hf-mistral")
COMPILED = {"bmojo-compiled": "bmojo", "hf-mistral-swa-compiled": "hf-mistral-swa"}  # -> the eager twin
ALL = tuple(OURS) + HF + tuple(COMPILED)
LABELS = {
    "bmojo": "B'MOJO",
    "bmojo-f": "B'MOJO-F",
    "mamba-only": "Mamba-2 only (ours)",
    "swa-only": "SWA only (ours)",
    "full-attn": "full attention (ours)",
    "hf-mamba": "HF MambaForCausalLM",
    "hf-mamba2": "HF Mamba2ForCausalLM",
    "hf-mistral-swa": "HF Mistral, sliding window",
    "hf-mistral": "HF Mistral, full attention",
    "bmojo-compiled": "B'MOJO, compiled layers",
    "hf-mistral-swa-compiled": "HF Mistral, sliding window, compiled",
}


@dataclass(frozen=True)
class Shape:
    """Sizes shared by every candidate (the B'MOJO reference config)."""

    vocab_size: int = 512
    hidden_size: int = 256
    num_layers: int = 4
    head_dim: int = 64
    window: int = 512
    memory_size: int = 64
    memory_picks: int = 8
    ssm_state_size: int = 64
    ssm_head_dim: int = 64
    ssm_chunk_size: int = 128
    max_length: int = 16384  # for position tables (Mistral RoPE)

    @property
    def heads(self) -> int:
        return max(1, self.hidden_size // self.head_dim)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


TOY_SHAPE = Shape(vocab_size=128, hidden_size=64, num_layers=2, head_dim=32, window=32, memory_size=8,
                  memory_picks=4, ssm_state_size=16, ssm_head_dim=32, ssm_chunk_size=32, max_length=1024)


def eager_name(name: str) -> str:
    """The eager candidate `name` is built as (itself unless it is a compiled one)."""
    return COMPILED.get(name, name)


def is_baseline(name: str) -> bool:
    return eager_name(name) in HF


def check_names(names: list[str], allowed: tuple[str, ...] = ALL) -> list[str]:
    bad = [n for n in names if n not in allowed]
    if bad:
        raise ValueError(f"unknown candidate(s) {bad}; choose from {list(allowed)}")
    if not names:
        raise ValueError("no candidates given")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"candidate(s) {repeated} given more than once; name each once")
    return names


# ----------------------------------------------------------------------------- configs
def bmojo_config(shape: Shape, letter: str = "B", num_layers: int | None = None, intermediate_size: int | None = None):
    n = shape.num_layers if num_layers is None else num_layers
    return BMojoConfig(
        vocab_size=shape.vocab_size, hidden_size=shape.hidden_size, num_hidden_layers=n, layer_pattern=letter * n,
        num_attention_heads=shape.heads, num_key_value_heads=shape.heads, head_dim=shape.head_dim,
        window_size=shape.window, fading_window=shape.window, memory_size=shape.memory_size,
        memory_chunk=shape.window, memory_picks=shape.memory_picks, ssm_mixer="mamba2",
        ssm_state_size=shape.ssm_state_size, ssm_head_dim=shape.ssm_head_dim, ssm_chunk_size=shape.ssm_chunk_size,
        intermediate_size=intermediate_size, tie_word_embeddings=True,
    )


def hf_config(name: str, shape: Shape, num_layers: int | None = None, width: int | None = None):
    """HF config of baseline `name`; `width` is its free size (MLP or SSM inner width)."""
    n = shape.num_layers if num_layers is None else num_layers
    d = shape.hidden_size
    if name == "hf-mamba":
        config = MambaConfig(vocab_size=shape.vocab_size, hidden_size=d, state_size=16, num_hidden_layers=n,
                             expand=2, tie_word_embeddings=True, pad_token_id=0, bos_token_id=0, eos_token_id=0)
        if width is not None:
            config.intermediate_size = width  # = expand * d; set directly so any multiple of 8 works
        return config
    if name == "hf-mamba2":
        inner = 2 * d if width is None else width  # Mamba2Config only takes an integer expand
        return Mamba2Config(vocab_size=shape.vocab_size, hidden_size=d, state_size=shape.ssm_state_size,
                            num_hidden_layers=n, head_dim=shape.ssm_head_dim, num_heads=inner // shape.ssm_head_dim,
                            expand=inner // d, n_groups=1, chunk_size=shape.ssm_chunk_size, tie_word_embeddings=True,
                            pad_token_id=0, bos_token_id=0, eos_token_id=0)
    if name in ("hf-mistral-swa", "hf-mistral"):
        config = MistralConfig(vocab_size=shape.vocab_size, hidden_size=d,
                               intermediate_size=width if width is not None else bmojo_config(shape).intermediate_size,
                               num_hidden_layers=n, num_attention_heads=shape.heads, num_key_value_heads=shape.heads,
                               head_dim=shape.head_dim, max_position_embeddings=2 * shape.max_length,
                               sliding_window=shape.window if name == "hf-mistral-swa" else None,
                               tie_word_embeddings=True, pad_token_id=0, bos_token_id=0, eos_token_id=0)
        config._attn_implementation = "sdpa"
        return config
    raise ValueError(f"not a Hugging Face baseline: {name!r}")


def _hf_class(name: str, causal_lm: bool):
    base = {"hf-mamba": "Mamba", "hf-mamba2": "Mamba2", "hf-mistral-swa": "Mistral", "hf-mistral": "Mistral"}[name]
    return getattr(transformers, f"{base}ForCausalLM" if causal_lm else f"{base}Model")


def _config(name: str, shape: Shape, num_layers: int | None, width: int | None):
    name = eager_name(name)
    if name in OURS:
        return bmojo_config(shape, OURS[name], num_layers, width)
    return hf_config(name, shape, num_layers, width)


def _instantiate(name: str, config, causal_lm: bool) -> nn.Module:
    name = eager_name(name)
    if name in OURS:
        return (BMojoForCausalLM if causal_lm else BMojoModel)(config)
    return _hf_class(name, causal_lm)(config)


def non_embedding_params(model: nn.Module) -> int:
    """Parameters outside the token embedding and LM head (tied or not)."""
    skip = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            skip.add(id(module.weight))
    head = getattr(model, "lm_head", None)
    if head is not None:
        skip.add(id(head.weight))
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen or id(p) in skip:
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def total_params(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _count(name: str, shape: Shape, num_layers: int | None, width: int | None, causal_lm: bool) -> int:
    with torch.device("meta"):
        model = _instantiate(name, _config(name, shape, num_layers, width), causal_lm)
    return non_embedding_params(model)


def _width_grid(name: str, shape: Shape) -> list[int]:
    """Candidate values of `name`'s free width: MLP size for models with an MLP, SSM inner width otherwise."""
    d = shape.hidden_size
    if name == "hf-mamba2":  # an integer expand, and whole heads: inner = expand * d = num_heads * head_dim
        step = math.lcm(d, shape.ssm_head_dim)
        return list(range(step, 16 * d + 1, step)) or [step]
    if name == "hf-mamba":
        return list(range(16, 16 * d + 1, 16))
    return list(range(0 if name in OURS else 32, 16 * d + 1, 32))  # ours: 0 = no MLP is allowed


@functools.lru_cache(maxsize=None)  # the suite's up-front check and its build ask the same question
def matched_width(name: str, shape: Shape, target: int, num_layers: int | None = None,
                  causal_lm: bool = True) -> int | None:
    """The free width that brings `name`'s non-embedding parameters closest to `target`.

    None for the reference itself. Parameter counts are monotone in the width, so a
    binary search over the grid finds the closest point with ~10 meta-device builds.
    """
    name = eager_name(name)
    if name == "bmojo":
        return None
    grid = _width_grid(name, shape)
    lo, hi = 0, len(grid) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if _count(name, shape, num_layers, grid[mid], causal_lm) < target:
            lo = mid + 1
        else:
            hi = mid
    best = grid[lo]
    if lo > 0:
        below = grid[lo - 1]
        if abs(_count(name, shape, num_layers, below, causal_lm) - target) < abs(
                _count(name, shape, num_layers, best, causal_lm) - target):
            best = below
    return best


@dataclass
class Built:
    """A candidate model, its config and sizes."""

    name: str
    model: nn.Module
    config: Any
    width: int | None
    params: int
    non_embedding_params: int

    def describe(self, reference_params: int | None = None) -> dict[str, Any]:
        info = {
            "name": self.name,
            "label": LABELS[self.name],
            "role": "baseline" if is_baseline(self.name) else "ours",
            "class": type(self.model).__name__,
            "compiled": self.name in COMPILED,
            "params": self.params,
            "non_embedding_params": self.non_embedding_params,
            "matched_width": self.width,
            "config": _config_summary(self.name, self.config),
        }
        if reference_params:
            info["params_vs_bmojo"] = round(self.non_embedding_params / reference_params, 4)
        return info


def _config_summary(name: str, config) -> dict[str, Any]:
    keys = ("hidden_size", "num_hidden_layers", "layer_pattern", "intermediate_size", "num_attention_heads",
            "num_key_value_heads", "head_dim", "window_size", "fading_window", "memory_size", "memory_chunk",
            "memory_picks", "ssm_mixer", "ssm_state_size", "ssm_head_dim", "ssm_chunk_size", "sliding_window",
            "state_size", "expand", "num_heads", "n_groups", "chunk_size", "vocab_size")
    out = {}
    for key in keys:
        if hasattr(config, key):
            value = getattr(config, key)
            if isinstance(value, (int, float, str)) or value is None:
                out[key] = value
    return out


def check_buildable(names: list[str], shape: Shape, num_layers: int | None = None, causal_lm: bool = True) -> None:
    """ValueError naming the first candidate that cannot be built at `shape`, checked as the suite builds them
    (B'MOJO, the reference, first; the others at their matched widths) but on the meta device: no weights, so
    a bad --d-model, --layers, --window or --vocab-size is refused in well under a second."""
    factory = CandidateFactory(shape, num_layers, causal_lm)
    for name in dict.fromkeys(["bmojo", *names]):
        try:
            with torch.device("meta"):
                _instantiate(name, _config(name, shape, num_layers, factory.width(name)), causal_lm)
        except (ValueError, StrictDataclassError) as exc:  # the configs' own checks (HF's: strict dataclasses)
            layers = shape.num_layers if num_layers is None else num_layers
            raise ValueError(f"{name} cannot be built at d_model {shape.hidden_size}, {layers} layer(s), window "
                             f"{shape.window}, vocab {shape.vocab_size} (--d-model, --layers, --window, "
                             f"--vocab-size): {_cause(exc)}") from None


def _cause(exc: Exception) -> str:
    """The innermost message of a config check (HF wraps its validators' ValueErrors in one of its own)."""
    while isinstance(exc, StrictDataclassError) and isinstance(exc.__cause__, Exception):
        exc = exc.__cause__
    return str(exc).strip()


class CandidateFactory:
    """Builds candidates at `shape`, matching parameters to B'MOJO once per (layers, head) setting."""

    def __init__(self, shape: Shape, num_layers: int | None = None, causal_lm: bool = True,
                 match: bool = True) -> None:
        self.shape = shape
        self.num_layers = num_layers
        self.causal_lm = causal_lm
        self.match = match
        self._widths: dict[str, int | None] = {}
        self._target: int | None = None

    @property
    def target(self) -> int:
        if self._target is None:
            self._target = _count("bmojo", self.shape, self.num_layers, None, self.causal_lm)
        return self._target

    def width(self, name: str) -> int | None:
        if not self.match:
            return None
        name = eager_name(name)
        if name not in self._widths:
            self._widths[name] = matched_width(name, self.shape, self.target, self.num_layers, self.causal_lm)
        return self._widths[name]

    def build(self, name: str, seed: int = 0, device: str = "cpu") -> Built:
        return build_candidate(name, self.shape, self.width(name), self.num_layers, self.causal_lm, seed, device)


def build_candidate(name: str, shape: Shape, width: int | None, num_layers: int | None = None,
                    causal_lm: bool = True, seed: int = 0, device: str = "cpu") -> Built:
    """Build `name` with an already matched `width` (deterministic given `seed`).

    A compiled candidate is compiled here, lazily: its first call compiles (see `compile_candidate`).
    """
    config = _config(name, shape, num_layers, width)
    torch.manual_seed(seed)
    model = _instantiate(name, config, causal_lm).to(device)
    if name in COMPILED:
        compile_candidate(name, model)
    return Built(name, model, config, width, total_params(model), non_embedding_params(model))


def compile_candidate(name: str, model: nn.Module) -> None:
    """Compile a ``*-compiled`` candidate in place (its parameter names and state dict stay as they are).

    Ours: the decoder layers, as ``train.compile`` does in training. Hugging Face's: the
    whole model (graph breaks allowed), as a user of theirs would compile it. Both with
    static shapes: one compile per (batch, length).
    """
    if eager_name(name) in OURS:
        compiled = compile_layers(model)
        if not compiled.active:
            raise RuntimeError(f"{name}: torch.compile is unavailable here")
    else:
        model.compile(dynamic=False, backend=default_backend())


def first_layer(built: Built) -> nn.Module:
    """The model's only decoder layer (used by the scaling suite for our models)."""
    model = built.model
    inner = getattr(model, "model", model)
    return inner.layers[0]

