"""The one module through which kernels import NKI (written against NKI 0.2.0).

    from nki_kernels.compat import nki, nl, nisa, NKI_AVAILABLE

`nki`, `nl` (`nki.language`) and `nisa` (`nki.isa`) are the real modules when the
Neuron SDK's `nki` 0.2.x imports (`NKI_AVAILABLE`), otherwise the project's CPU
emulator (`nki_kernels.emulator`), so kernels always import and run; `NKI_IMPLEMENTATION`
says which ("nki" or "emulator") and `NKI_UNAVAILABLE_REASON` why the real one is not
used (not installed, the PyPI placeholder "WRONG PACKAGE", another version). NKI 0.3.0
broke compatibility with 0.2.0, so another version counts as unavailable until this
module learns the differences. `emulator()` always returns the emulator's
(nki, nl, nisa); the kernel modules, though, bind whichever this module chose when
they are imported, so where the real NKI is used they cannot run on the emulator
(the `nki-sim` backend reports itself unavailable there).
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


def emulator() -> tuple[ModuleType, ModuleType, ModuleType]:
    """The CPU emulator's (nki, nl, nisa)."""
    from nki_kernels.emulator import nisa as _enisa
    from nki_kernels.emulator import nki as _enki
    from nki_kernels.emulator import nl as _enl

    return _enki, _enl, _enisa


nki, nl, nisa, NKI_UNAVAILABLE_REASON = _probe()
NKI_AVAILABLE: bool = nki is not None
NKI_IMPLEMENTATION: str = "nki" if NKI_AVAILABLE else "emulator"
if not NKI_AVAILABLE:
    nki, nl, nisa = emulator()

__all__ = ["NKI_AVAILABLE", "NKI_IMPLEMENTATION", "NKI_UNAVAILABLE_REASON", "SUPPORTED_NKI", "emulator", "nisa",
           "nki", "nl"]
