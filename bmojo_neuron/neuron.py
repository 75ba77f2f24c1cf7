"""The one place that imports AWS Neuron packages, always lazily.

Nothing here imports a Neuron package at module import time: the CPU/CUDA path must
never import `torch_xla` / `neuronx_distributed` (docs/trn1.md).
Code that needs Neuron calls `require_neuron(feature)` or
`import_neuron_module(name, feature)` and gets a `NeuronUnavailableError` that says
what is missing and how to install it.
"""

from __future__ import annotations

import importlib
import importlib.util
from importlib.metadata import PackageNotFoundError, version
from types import ModuleType

from bmojo_neuron.nxd_compat import hide_nxd_training, provide_transformers_fx

NEURON_INDEX_URL = "https://pip.repos.neuron.amazonaws.com"
INSTALL_COMMAND = f'pip install "bmojo-neuron[neuron]" --extra-index-url {NEURON_INDEX_URL}'

# import name -> distribution name (for versions and messages)
NEURON_PACKAGES: dict[str, str] = {
    "torch_neuronx": "torch-neuronx",
    "neuronxcc": "neuronx-cc",
    "neuronx_distributed": "neuronx-distributed",
    "nki": "nki",
    "torch_xla": "torch-xla",
}
# What running a model on a NeuronCore needs unless a caller asks for more.
DEFAULT_REQUIRED = ("torch_neuronx", "torch_xla", "neuronxcc")
# What `bmojo-neuron train` with run.device: neuron needs: NxD and NKI besides the above.
TRAINING_PACKAGES = ("torch_neuronx", "torch_xla", "neuronx_distributed", "neuronxcc", "nki")
TRAINING_FEATURE = "training on Trainium (run.device: neuron)"

# Status values of `neuron_status()[name]["status"]`.
OK = "ok"
NOT_INSTALLED = "not installed"
PLACEHOLDER = "placeholder"
IMPORT_ERROR = "import error"


class NeuronUnavailableError(RuntimeError):
    """A feature needs the AWS Neuron SDK and it is not (properly) installed."""


def _dist_version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None
    except Exception:  # broken metadata
        return None


def _probe(name: str) -> dict:
    """Try to import one Neuron package; never raises."""
    dist = NEURON_PACKAGES.get(name, name)
    dist_version = _dist_version(dist)
    info = {"importable": False, "version": None, "status": NOT_INSTALLED, "reason": None}
    try:
        if importlib.util.find_spec(name) is None:
            info["reason"] = f"{dist} is not installed"
            return info
        if name == "neuronx_distributed":  # what NxD 0.17 imports at import time (nxd_compat)
            provide_transformers_fx()
            hide_nxd_training()
        module = importlib.import_module(name)
    except Exception as exc:
        text = f"{type(exc).__name__}: {exc}"
        if "WRONG PACKAGE" in str(exc):
            info["status"] = PLACEHOLDER
            installed = f"{dist} {dist_version}" if dist_version else dist
            info["reason"] = (
                f"PyPI placeholder installed (WRONG PACKAGE): {installed} is not the "
                f"Neuron SDK package; uninstall it and install from {NEURON_INDEX_URL}"
            )
        elif isinstance(exc, ModuleNotFoundError) and exc.name == name:
            info["reason"] = f"{dist} is not installed"
        elif isinstance(exc, ModuleNotFoundError) and exc.name:
            info["status"] = IMPORT_ERROR
            info["reason"] = f"import failed, missing dependency {exc.name!r} ({text})"
        else:
            info["status"] = IMPORT_ERROR
            info["reason"] = f"import failed ({text})"
        return info
    except BaseException as exc:  # e.g. SystemExit from a broken package: still report
        if isinstance(exc, KeyboardInterrupt):
            raise
        info["status"] = IMPORT_ERROR
        info["reason"] = f"import failed ({type(exc).__name__}: {exc})"
        return info
    info["importable"] = True
    info["status"] = OK
    info["version"] = str(getattr(module, "__version__", None) or dist_version or "unknown")
    return info


def neuron_status() -> dict[str, dict]:
    """For each Neuron package, whether it imports and its version or why not.

    Returns ``{import_name: {"importable": bool, "version": str | None,
    "status": "ok" | "not installed" | "placeholder" | "import error",
    "reason": str | None}}``. Importing is attempted only for installed packages.
    """
    return {name: _probe(name) for name in NEURON_PACKAGES}


def _missing(packages: tuple[str, ...] | list[str]) -> dict[str, dict]:
    return {name: s for name in packages if not (s := _probe(name))["importable"]}


def is_neuron_available(packages: tuple[str, ...] | list[str] = DEFAULT_REQUIRED) -> bool:
    """True when every package in `packages` imports (does not check for a device)."""
    return not _missing(packages)


def require_neuron(feature: str, packages: tuple[str, ...] | list[str] = DEFAULT_REQUIRED) -> None:
    """Raise `NeuronUnavailableError` unless every package in `packages` imports."""
    missing = _missing(packages)
    if not missing:
        return
    raise NeuronUnavailableError(
        f"{feature} needs the AWS Neuron SDK (2.28), which is not available here ({_why_unusable(missing)}); "
        f"install it on a Trn1 instance with the Neuron driver and runtime: {INSTALL_COMMAND} "
        f'(from a checkout: pip install -e ".[neuron]" --extra-index-url {NEURON_INDEX_URL})'
    )


def _why_unusable(missing: dict[str, dict]) -> str:
    """One clause for the packages that do not import: those merely not installed named together (the usual
    case: no SDK at all), each of the others with its own reason (a placeholder, a failed import)."""
    absent = [name for name, s in missing.items() if s["status"] == NOT_INSTALLED]
    parts = [f"not installed: {', '.join(absent)}"] if absent else []
    parts += [f"{name}: {s['reason']}" for name, s in missing.items() if s["status"] != NOT_INSTALLED]
    return "; ".join(parts)


def import_neuron_module(name: str, feature: str) -> ModuleType:
    """Import a Neuron module (e.g. ``"torch_xla.core.xla_model"``) for `feature`.

    Raises `NeuronUnavailableError` (not ImportError) when its package is unusable.
    """
    require_neuron(feature, (name.split(".")[0],))
    try:
        return importlib.import_module(name)
    except Exception as exc:
        raise NeuronUnavailableError(
            f"{feature} needs {name}, which failed to import ({type(exc).__name__}: {exc})"
        ) from exc


__all__ = [
    "INSTALL_COMMAND",
    "NEURON_INDEX_URL",
    "NEURON_PACKAGES",
    "NeuronUnavailableError",
    "TRAINING_FEATURE",
    "TRAINING_PACKAGES",
    "import_neuron_module",
    "is_neuron_available",
    "neuron_status",
    "require_neuron",
]
