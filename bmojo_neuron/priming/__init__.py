"""Priming: start a B'MOJO model from a pretrained transformer (Llama, Mistral, Qwen2, Qwen3).

`source` reads and checks a local Hugging Face checkpoint folder, `mapping` says where
every weight of the primed model comes from (copied, seeded from the attention, or
initialised), and `prime` builds and writes the primed model. docs/priming.md has the
weight map, the initialisation choices and the stages that follow (distillation,
fine-tuning).
"""

from .mapping import SSM_INITS, attention_ssm_mismatch, ssm_from_attention
from .prime import PrimedModel, expand_pattern, prime, prime_model, primed_config
from .source import SUPPORTED_TYPES, SourceModel, load_source_weights, read_source

__all__ = [
    "SSM_INITS",
    "SUPPORTED_TYPES",
    "PrimedModel",
    "SourceModel",
    "attention_ssm_mismatch",
    "expand_pattern",
    "load_source_weights",
    "prime",
    "prime_model",
    "primed_config",
    "read_source",
    "ssm_from_attention",
]
