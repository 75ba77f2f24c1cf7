"""What `prime` is asked to make, checked without torch or transformers: the layer pattern and the B'MOJO
options (`key=value`), so a typo in either is one line before the seconds of start-up that building the model
takes. `prime.primed_config` applies the same checks, for callers that do not come through the command line."""

from __future__ import annotations

import inspect
from typing import Any, Mapping

from ..config_fields import LAYER_KINDS, BMojoFields

# Fields the source fixes whatever the options say (`source.SourceModel.config_fields`, and the layer count and
# pattern), so an option naming one is refused; the special-token ids are fixed only where the source sets them,
# which `prime.primed_config` checks once the source is read.
SOURCE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "head_dim", "intermediate_size", "rms_norm_eps", "rope_theta", "rope_scaling_params",
                 "tie_word_embeddings", "attention_bias", "attention_output_bias", "qk_norm", "layer_pattern")


def config_field_names() -> list[str]:
    """The keyword arguments of `BMojoConfig` (the keys a recipe's model section and `prime` accept): those of
    `BMojoFields`, whose ``__init__`` `BMojoConfig` takes as its own."""
    params = inspect.signature(BMojoFields.__init__).parameters.values()
    return [p.name for p in params if p.name != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD]


def check_options(overrides: Mapping[str, Any], fixed: set[str] | frozenset[str] = frozenset(SOURCE_FIELDS)) -> None:
    """Refuse an option that is no `BMojoConfig` field, or one of `fixed`, the fields the source decides."""
    unknown = sorted(set(overrides) - set(config_field_names()))
    if unknown:
        raise ValueError(f"{unknown[0]}={overrides[unknown[0]]!r}: not a B'MOJO option (BMojoConfig field); "
                         "docs/priming.md lists the ones a primed model takes")
    clash = sorted(set(overrides) & set(fixed))
    if clash:
        raise ValueError(f"{clash[0]}={overrides[clash[0]]!r}: comes from the source checkpoint"
                         + (" (use --pattern)" if clash[0] == "layer_pattern" else "") + " and cannot be set")


def expand_pattern(pattern: str, layers: int) -> str:
    """`pattern` itself when it has one letter per layer, else repeated when its length divides `layers`."""
    bad = sorted(set(pattern) - set(LAYER_KINDS))
    if not pattern or bad:
        raise ValueError(f"--pattern {pattern!r}: use the letters {''.join(LAYER_KINDS)} (one per layer, or a "
                         f"group repeated over the {layers} layers)")
    if len(pattern) == layers:
        return pattern
    if layers % len(pattern):
        raise ValueError(f"--pattern {pattern!r} has {len(pattern)} letters; the source has {layers} layers, "
                         "so give one letter per layer or a group whose length divides it")
    return pattern * (layers // len(pattern))
