"""Package attributes that import their submodule on first use (PEP 562 module `__getattr__`).

The packages that use it (`bmojo_neuron`, `bmojo_neuron.checkpoints`, `bmojo_neuron.priming`) keep the
submodules that need torch or transformers out of their import, so a command that fails on its
arguments or its files answers before seconds of start-up.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_getattr(package: str, exports: dict[str, str], namespace: dict[str, Any],
                 first: str | None = None) -> Callable[[str], Any]:
    """A module `__getattr__` for `package`: ``exports`` maps a public name to the submodule defining it.

    The value is stored in the package's `namespace` (its ``globals()``), so later lookups skip the hook.
    `first`, a submodule name, is imported before any of them (for an import with side effects the
    others rely on, such as registering the Auto classes)."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        if first is not None:
            importlib.import_module(f".{first}", package)
        value = getattr(importlib.import_module(f".{module}", package), name)
        namespace[name] = value
        return value

    return __getattr__
