"""The installed version of `bmojo-neuron` (from package metadata)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

# Used when running from a source tree that was never installed; keep it equal to
# `version` in pyproject.toml (tests/test_cli.py checks).
FALLBACK_VERSION = "0.1.0"

try:
    __version__ = version("bmojo-neuron")
except PackageNotFoundError:  # not installed
    __version__ = FALLBACK_VERSION

__all__ = ["__version__"]
