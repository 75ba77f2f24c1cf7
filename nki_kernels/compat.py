"""The one module through which kernels import NKI (written against NKI 0.2.0).

    from nki_kernels.compat import nki, nl, nisa, NKI_AVAILABLE

`nki`, `nl` (`nki.language`) and `nisa` (`nki.isa`) are the real modules when the
Neuron SDK's `nki` 0.2.x imports, otherwise None, with `NKI_UNAVAILABLE_REASON`
saying why (not installed, the PyPI placeholder "WRONG PACKAGE", another version).
NKI 0.3.0 broke compatibility with 0.2.0, so another version counts as unavailable
until this module learns the differences.

The CPU emulator of the `nki`/`nl`/`nisa` subset our kernels use arrives with the
kernels issue; from then on it is returned here when the real NKI is absent, and
these names are never None.
"""

from __future__ import annotations

from types import ModuleType

SUPPORTED_NKI = "0.2"  # major.minor the kernels are written for


def _dist_version(dist: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return None


def _probe() -> tuple[ModuleType | None, ModuleType | None, ModuleType | None, str | None]:
    """Import the real NKI; returns (nki, nl, nisa, reason-unavailable or None)."""
    try:
        import nki as _nki
        import nki.isa as _nisa
        import nki.language as _nl
    except Exception as exc:  # the PyPI placeholder raises ImportError("WRONG PACKAGE ...")
        if "WRONG PACKAGE" in str(exc):
            return None, None, None, f"PyPI placeholder 'nki' installed (WRONG PACKAGE): {exc}"
        if isinstance(exc, ModuleNotFoundError) and exc.name == "nki":
            return None, None, None, "nki is not installed (Neuron SDK 2.28 ships nki 0.2.0)"
        return None, None, None, f"nki failed to import ({type(exc).__name__}: {exc})"
    found = getattr(_nki, "__version__", None) or _dist_version("nki")
    if found and str(found).split(".")[:2] != SUPPORTED_NKI.split("."):
        return None, None, None, f"nki {found} installed; the kernels need nki {SUPPORTED_NKI}.x"
    return _nki, _nl, _nisa, None


nki, nl, nisa, NKI_UNAVAILABLE_REASON = _probe()
NKI_AVAILABLE: bool = nki is not None

__all__ = ["NKI_AVAILABLE", "NKI_UNAVAILABLE_REASON", "SUPPORTED_NKI", "nisa", "nki", "nl"]
