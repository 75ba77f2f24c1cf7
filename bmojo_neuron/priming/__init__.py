"""Priming: start a B'MOJO model from a pretrained transformer (Llama, Mistral, Qwen2, Qwen3).

`source_files` reads a local Hugging Face checkpoint folder's files (config.json, safetensors headers) and
`options` checks the pattern and options asked for, both without torch; `source` reads and checks its config
and weights, `mapping` says where every weight of the primed model comes from (copied, seeded from the
attention, or initialised), and `primed` builds and writes the primed model.
docs/priming.md has the weight map, the initialisation choices and the stages that follow (distillation,
fine-tuning).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy_exports import lazy_getattr

# public name -> the submodule that defines it. They load on first use (PEP 562), so that `source_files` imports
# without torch: `prime` refuses a source folder its files show wrong before torch and transformers load.
_LAZY = {
    "SSM_INITS": "mapping",
    "SUPPORTED_TYPES": "source_files",
    "PrimedModel": "primed",
    "SourceModel": "source",
    "attention_ssm_mismatch": "mapping",
    "check_source_files": "source_files",
    "expand_pattern": "options",
    "load_source_weights": "source",
    "prime": "primed",
    "prime_model": "primed",
    "primed_config": "primed",
    "read_source": "source",
    "ssm_from_attention": "mapping",
}

if TYPE_CHECKING:
    from .mapping import SSM_INITS, attention_ssm_mismatch, ssm_from_attention
    from .options import expand_pattern
    from .primed import PrimedModel, prime, prime_model, primed_config
    from .source import SourceModel, load_source_weights, read_source
    from .source_files import SUPPORTED_TYPES, check_source_files


__getattr__ = lazy_getattr(__name__, _LAZY, globals())


__all__ = sorted(_LAZY)
