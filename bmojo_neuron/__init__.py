"""bmojo-neuron: B'MOJO language models on the torch reference path, NKI kernels and Trainium.

The model classes load lazily (PEP 562), so ``import bmojo_neuron`` and the
``bmojo-neuron`` command line start without importing torch or transformers: a
command that fails on its arguments, or on a missing Neuron SDK, answers at once.
Touching any model class (``from bmojo_neuron import BMojoForCausalLM``) imports
`bmojo_neuron.modeling_bmojo`, which registers the ``bmojo`` model type with Hugging
Face's `AutoConfig`, `AutoModel` and `AutoModelForCausalLM`; `register_auto_classes()`
does the same explicitly.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

# public name -> the submodule that defines it
_LAZY = {
    "BMojoCache": "cache_bmojo",
    "BMojoConfig": "configuration_bmojo",
    "BMojoForCausalLM": "modeling_bmojo",
    "BMojoModel": "modeling_bmojo",
    "BMojoPreTrainedModel": "modeling_bmojo",
}

if TYPE_CHECKING:
    from .cache_bmojo import BMojoCache
    from .configuration_bmojo import BMojoConfig
    from .modeling_bmojo import BMojoForCausalLM, BMojoModel, BMojoPreTrainedModel


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'bmojo_neuron' has no attribute {name!r}")
    importlib.import_module(".modeling_bmojo", __name__)  # registers the Auto classes with every class
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def register_auto_classes() -> None:
    """Register ``model_type="bmojo"`` with the transformers Auto classes (idempotent)."""
    from .modeling_bmojo import register_auto_classes as register

    register()


__all__ = ["BMojoCache", "BMojoConfig", "BMojoForCausalLM", "BMojoModel", "BMojoPreTrainedModel",
           "__version__", "register_auto_classes"]
