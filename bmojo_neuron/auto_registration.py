"""Make ``model_type="bmojo"`` known to Hugging Face's Auto classes as soon as they exist.

`import bmojo_neuron` must be enough for `AutoConfig`, `AutoModel`,
`AutoModelForCausalLM` and `pipeline(...)` to find B'MOJO, yet it must not import
torch or transformers: the ``bmojo-neuron`` command line imports the package and
answers ``--help`` or a bad argument in a fraction of a second.

So `install()` registers at once what transformers has already loaded, and
otherwise puts a finder on `sys.meta_path` that registers when transformers'
``configuration_auto`` (then the config) and ``modeling_auto`` (then the model
classes) have been imported. The model classes import transformers modules that may
still be executing at that moment (``transformers.modeling_layers`` imports
``modeling_auto`` half-way through), so they are registered only when no watched
module (transformers' or ours) is half-imported: the finder wraps the loader of
every such module and retries each time one finishes. Importing a model class
(``from bmojo_neuron import BMojoForCausalLM``) registers the same way, when its
module is done. Once everything is registered the finder removes itself.
"""

from __future__ import annotations

import importlib.machinery
import sys
import threading
import warnings
from types import ModuleType
from typing import Any

CONFIG_AUTO = "transformers.models.auto.configuration_auto"
MODELING_AUTO = "transformers.models.auto.modeling_auto"
WATCHED_PREFIXES = ("transformers.", "bmojo_neuron.")


class _State:
    config = False  # BMojoConfig is registered with AutoConfig
    models = False  # BMojoModel / BMojoForCausalLM are registered
    gave_up = False  # a registration failed: warned once, never retried
    busy = False  # registering now; imports this triggers must not start another registration
    executing: set[str] = set()  # watched modules whose code is running now
    half_imported_at_install: set[str] = set()  # transformers modules mid-import when install() ran


_lock = threading.RLock()


def register_config() -> None:
    """Register `BMojoConfig` with `AutoConfig` (needs transformers' configuration code, not its models)."""
    from transformers import AutoConfig

    from .configuration_bmojo import BMojoConfig

    AutoConfig.register(BMojoConfig.model_type, BMojoConfig, exist_ok=True)
    _State.config = True


def register_auto_classes() -> None:
    """Register ``bmojo`` with `AutoConfig`, `AutoModel` and `AutoModelForCausalLM` (idempotent)."""
    from transformers import AutoModel, AutoModelForCausalLM

    from .configuration_bmojo import BMojoConfig
    from .modeling_bmojo import BMojoForCausalLM, BMojoModel

    register_config()
    AutoModel.register(BMojoConfig, BMojoModel, exist_ok=True)
    AutoModelForCausalLM.register(BMojoConfig, BMojoForCausalLM, exist_ok=True)
    _State.models = True


def is_registered() -> bool:
    """True once the config and both model classes are registered."""
    return _State.config and _State.models


def install() -> None:
    """Register what can be registered now; watch imports for the rest (cheap: imports nothing)."""
    with _lock:
        _State.half_imported_at_install.update(
            name for name, module in list(sys.modules.items())
            if name.startswith("transformers") and _initializing(module)
        )
    _register_what_is_ready()
    with _lock:
        if not _finished() and not any(isinstance(f, _AutoClassesWatcher) for f in sys.meta_path):
            sys.meta_path.insert(0, _AutoClassesWatcher())


def _finished() -> bool:
    return is_registered() or _State.gave_up


def _initializing(module: ModuleType) -> bool:
    spec = getattr(module, "__spec__", None)
    return bool(getattr(spec, "_initializing", False))


def _mid_import(name: str) -> bool:
    if name in _State.executing:
        return True
    module = sys.modules.get(name)
    return name in _State.half_imported_at_install and module is not None and _initializing(module)


def _loaded(name: str) -> bool:
    return name in sys.modules and not _mid_import(name)


def _anything_mid_import() -> bool:
    return bool(_State.executing) or any(_mid_import(name) for name in _State.half_imported_at_install)


def _register_what_is_ready() -> None:
    """Register what became possible. The imports run outside `_lock`: another thread may hold the
    import lock of a module we need while it waits for `_lock` in `_NotifyingLoader`."""
    with _lock:
        if _State.busy or _finished():
            return
        do_config = not _State.config and _loaded(CONFIG_AUTO)
        do_models = not _State.models and _loaded(MODELING_AUTO) and not _anything_mid_import()
        if not (do_config or do_models):
            return
        _State.busy = True
    try:
        if do_config:
            register_config()
        if do_models:
            register_auto_classes()
    except Exception as err:  # never break the import that triggered us; register_auto_classes() re-raises it
        _State.gave_up = True
        warnings.warn(f"bmojo_neuron could not register model_type 'bmojo' with transformers: {err}", stacklevel=2)
    finally:
        _State.busy = False
    if _finished():
        with _lock:
            sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _AutoClassesWatcher)]


class _AutoClassesWatcher:
    """A `sys.meta_path` finder that finds nothing itself: wraps the loader of each watched module so we hear when it finishes."""

    def find_spec(self, fullname: str, path: Any, target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if not fullname.startswith(WATCHED_PREFIXES):
            return None
        spec = _spec_from_other_finders(self, fullname, path, target)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _NotifyingLoader(spec.loader, fullname)
        return spec


def _spec_from_other_finders(watcher: object, fullname: str, path: Any, target: ModuleType | None):
    for finder in list(sys.meta_path):
        if finder is watcher or not hasattr(finder, "find_spec"):
            continue
        spec = finder.find_spec(fullname, path, target)
        if spec is not None:
            return spec
    return None


class _NotifyingLoader:
    """Delegates to the real loader; after the module's code ran, registers what became possible."""

    def __init__(self, loader: Any, name: str) -> None:
        self._loader = loader
        self._name = name

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        with _lock:
            _State.executing.add(self._name)
        try:
            self._loader.exec_module(module)
        finally:
            with _lock:
                _State.executing.discard(self._name)
        _register_what_is_ready()

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, is_package, ... for tools that ask
        return getattr(self._loader, name)
