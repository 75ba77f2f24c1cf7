"""Whether the model behind a path can be written as a Hugging Face transformer, read from its config.json alone.

`export-transformer` asks this before torch loads (seconds), so a Hugging Face model or a hybrid B'MOJO model is
refused in one line at once; `priming.export` asks it again for library callers. No tensor is read and neither
torch nor transformers is imported: the fields are checked with `BMojoFields`, the model's own validation.
"""

from __future__ import annotations

import json
from pathlib import Path

from bmojo_neuron.config_fields import MODEL_TYPE, BMojoFields, saved_defaults, transformer_family

from .locate import resolve_sized_model_dir
from .names import CONFIG_FILE


def exported_family(path: str | Path) -> str | None:
    """The Hugging Face family (`transformer_family`: ``llama``, ``qwen2``, ``qwen3``) the model behind `path`
    exports as. ValueError when its config.json names another model type, or its layers are not all attention.

    None when the config.json cannot tell (missing, not JSON, or fields this version refuses): the loader then
    reads the folder and says what is wrong with it.
    """
    config_file = resolve_sized_model_dir(path, "export-transformer") / CONFIG_FILE
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    model_type = config.get("model_type")
    if model_type != MODEL_TYPE:
        raise ValueError(f"{path} is not a B'MOJO model (its config.json has model_type {model_type!r}); "
                         "export-transformer writes an all-attention B'MOJO model as a transformer")
    try:
        fields = BMojoFields(**saved_defaults(config))
    except (TypeError, ValueError):
        return None
    try:
        return transformer_family(fields)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
