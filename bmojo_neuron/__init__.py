"""bmojo-neuron: B'MOJO language models on the torch reference path, NKI kernels and Trainium.

Importing the package registers the ``bmojo`` model type with Hugging Face's
`AutoConfig`, `AutoModel` and `AutoModelForCausalLM`.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from ._version import __version__
from .cache_bmojo import BMojoCache
from .configuration_bmojo import BMojoConfig
from .modeling_bmojo import BMojoForCausalLM, BMojoModel, BMojoPreTrainedModel


def _register_auto_classes() -> None:
    AutoConfig.register(BMojoConfig.model_type, BMojoConfig, exist_ok=True)
    AutoModel.register(BMojoConfig, BMojoModel, exist_ok=True)
    AutoModelForCausalLM.register(BMojoConfig, BMojoForCausalLM, exist_ok=True)


_register_auto_classes()

__all__ = ["BMojoCache", "BMojoConfig", "BMojoForCausalLM", "BMojoModel", "BMojoPreTrainedModel", "__version__"]
