"""Hot ops (selective scans, eidetic-window attention) behind one dispatch point.

Call these functions, never a backend directly: `dispatch` routes each call to the
active backend (``torch`` reference, ``nki`` on Trainium, ``nki-sim`` on CPU).
Decode-step updates are small and always run in torch.
"""

from __future__ import annotations

from typing import Any

from bmojo_neuron.neuron import INSTALL_COMMAND, is_neuron_available

from . import cpu_c, dispatch
from .dispatch import available_backends, get_backend, register_backend, set_backend, use_backend
from .reference.eidetic_attention import eidetic_attention as attention_ref
from .reference.rotary import rotary as rotary_ref
from .reference.selective_scan import selective_scan as scan_ref
from .reference.selective_scan import selective_state_update
from .reference.ssd import ssd_scan as ssd_ref
from .reference.ssd import ssd_state_update


def selective_scan(*args: Any, **kwargs: Any) -> Any:
    """Mamba-1 selective scan; see `ops.reference.selective_scan` for layouts."""
    return dispatch.resolve("selective_scan")(*args, **kwargs)


def ssd_scan(*args: Any, **kwargs: Any) -> Any:
    """Mamba-2 chunked SSD scan; see `ops.reference.ssd` for layouts."""
    return dispatch.resolve("ssd_scan")(*args, **kwargs)


def eidetic_attention(*args: Any, **kwargs: Any) -> Any:
    """B'MOJO attention (window + fading + memory, one softmax); see `ops.reference.eidetic_attention`."""
    return dispatch.resolve("eidetic_attention")(*args, **kwargs)


def rotary(*args: Any, **kwargs: Any) -> Any:
    """Rotate-half RoPE of `x` by cos/sin tables; see `ops.reference.rotary`."""
    return dispatch.resolve("rotary")(*args, **kwargs)


def _torch_impls() -> dict:
    return {"selective_scan": scan_ref, "ssd_scan": ssd_ref, "eidetic_attention": attention_ref, "rotary": rotary_ref}


def _nki_availability() -> tuple[bool, str]:
    """The real kernels need the Neuron SDK and NKI 0.2 (never imported unless installed)."""
    if not is_neuron_available():
        return False, f"the Neuron SDK is not installed ({INSTALL_COMMAND} on a Trn1 instance)"
    from nki_kernels import compat

    if not compat.NKI_AVAILABLE:
        return False, f"NKI 0.2 is not usable: {compat.NKI_UNAVAILABLE_REASON}"
    return True, "NKI kernels on Trainium (selective_scan, ssd_scan, eidetic_attention; XLA tensors)"


def _nki_sim_availability() -> tuple[bool, str]:
    try:
        import nki_kernels.emulator  # noqa: F401
        from nki_kernels import compat
    except Exception as exc:  # e.g. ml_dtypes missing
        return False, f"the NKI emulator failed to import ({type(exc).__name__}: {exc})"
    if compat.NKI_AVAILABLE:
        # The kernel modules bind nki/nl/nisa once, at import, from compat: with the real NKI
        # present they are real `nki.jit` kernels, which the emulator cannot run.
        return False, "the kernels are bound to the real NKI 0.2 here (the emulator runs them only where it is absent)"
    return True, "NKI kernels on CPU through the emulator (selective_scan, ssd_scan, eidetic_attention; slow, exact)"


# The NKI backends import the kernels (and with them the emulator) only when first selected, so importing the
# model never pays for them.
def _nki_impls() -> dict:
    from .nki_backend import attention_device_ops, device_ops

    return {**device_ops(), **attention_device_ops()}


def _nki_sim_impls() -> dict:
    from .nki_backend import attention_emulator_ops, emulator_ops

    return {**emulator_ops(), **attention_emulator_ops()}


register_backend("torch", lambda: (True, "reference implementation"), _torch_impls)
register_backend("nki", _nki_availability, _nki_impls)
register_backend("nki-sim", _nki_sim_availability, _nki_sim_impls)
register_backend("cpu-c", cpu_c.availability, cpu_c.impls)

__all__ = [
    "available_backends",
    "eidetic_attention",
    "get_backend",
    "register_backend",
    "rotary",
    "selective_scan",
    "selective_state_update",
    "set_backend",
    "ssd_scan",
    "ssd_state_update",
    "use_backend",
]
