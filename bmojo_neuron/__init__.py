"""bmojo-neuron: B'MOJO language models on the torch reference path, NKI kernels and Trainium.

The model classes load lazily (PEP 562), so ``import bmojo_neuron`` and the
``bmojo-neuron`` command line start without importing torch or transformers: a
command that fails on its arguments, or on a missing Neuron SDK, answers at once.

``import bmojo_neuron`` is still enough for Hugging Face's `AutoConfig`,
`AutoModel`, `AutoModelForCausalLM` and `pipeline` to know ``model_type="bmojo"``:
the registration happens as soon as transformers' Auto classes are imported, before
or after this package (`bmojo_neuron.auto_registration`). `register_auto_classes()`
does it explicitly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import auto_registration
from ._version import __version__
from .lazy_exports import lazy_getattr

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


# modeling_bmojo first: with the Auto classes it imports, "bmojo" registers
__getattr__ = lazy_getattr(__name__, _LAZY, globals(), first="modeling_bmojo")


def register_auto_classes() -> None:
    """Register ``model_type="bmojo"`` with the transformers Auto classes now (idempotent)."""
    auto_registration.register_auto_classes()


__all__ = ["BMojoCache", "BMojoConfig", "BMojoForCausalLM", "BMojoModel", "BMojoPreTrainedModel",
           "__version__", "register_auto_classes"]

auto_registration.install()
