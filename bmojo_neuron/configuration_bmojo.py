"""`BMojoConfig`: the hyper-parameters of a B'MOJO language model as a Hugging Face config.

The fields, their defaults, derived sizes and validation are `BMojoFields`
(config_fields.py, which imports no transformers); this module adds what transformers
needs: the model type, loading saved configs, and saving a directory that loads by name.
"""

from __future__ import annotations

import os
from typing import Any

from transformers import PretrainedConfig

from .config_fields import (DEFAULTS_BEFORE_SAVED, LAYER_KINDS, MAX_HEAD_DIM, MODEL_TYPE, SSM_MIXERS, BMojoFields,
                            check_rope_scaling, model_fields_as_trained, saved_defaults)

__all__ = ["BMojoConfig", "DEFAULTS_BEFORE_SAVED", "LAYER_KINDS", "MAX_HEAD_DIM", "SSM_MIXERS", "check_rope_scaling",
           "saved_defaults", "model_fields_as_trained"]


class BMojoConfig(BMojoFields, PretrainedConfig):
    """Configuration of `BMojoModel` / `BMojoForCausalLM`: the fields of `BMojoFields` (documented there).

    Hugging Face conventions: use_cache (an eval-mode forward returns the recurrent
    `BMojoCache` unless told otherwise; never in training mode), output_hidden_states.
    `save_pretrained` also writes the ``auto_map`` and loader module of
    `bmojo_neuron.auto_map`, so the directory loads by name.
    """

    model_type = MODEL_TYPE
    # What `Trainer.predict` / `evaluate` leave out of the predictions, so they are the logits alone.
    keys_to_ignore_at_inference = ["cache", "past_key_values", "lm_loss", "aux_loss"]
    # Named in the class itself: transformers 5 makes every config subclass a dataclass and, when the class
    # defines no `__init__` of its own, keeps the dataclass-generated one, which takes only annotated fields
    # (`PreTrainedConfig.__init_subclass__`, transformers 5.25.0 configuration_utils.py lines 538-548): the
    # B'MOJO fields and their validation would be skipped.
    __init__ = BMojoFields.__init__

    def _set_common_fields(self, **fields: Any) -> None:
        PretrainedConfig.__init__(self, **fields)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> BMojoConfig:
        """`PretrainedConfig.from_dict`, keeping the layer a saved config was trained with (`saved_defaults`)."""
        return super().from_dict(saved_defaults(config_dict), **kwargs)

    @classmethod
    def _dict_from_json_file(cls, json_file: str | os.PathLike) -> dict[str, Any]:
        return saved_defaults(super()._dict_from_json_file(json_file))

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs: Any) -> None:
        """`PretrainedConfig.save_pretrained`, plus what lets transformers load the directory by name."""
        from .auto_map import AUTO_MAP, write_loader

        self.auto_map = {**(getattr(self, "auto_map", None) or {}), **AUTO_MAP}
        write_loader(save_directory)  # before the parent, which may push the directory to the Hub
        super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
