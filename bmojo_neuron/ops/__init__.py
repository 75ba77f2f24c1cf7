"""Hot ops (selective scans, eidetic-window attention, Mamba-2's causal conv, the norms and SwiGLU's product)
behind one dispatch point.

Call these functions, never a backend directly: `dispatch` routes each call to the
active backend (``torch`` reference, ``nki`` on Trainium, ``nki-sim`` on CPU, ``cpu-c``
C kernels; by default ``auto``: ``cpu-c`` on eager CPU float32, ``torch`` elsewhere).
Decode-step updates are small and always run in torch.
"""

from __future__ import annotations

from typing import Any

from bmojo_neuron.neuron import INSTALL_COMMAND, is_neuron_available

from . import auto, cpu_c, dispatch
from .dispatch import available_backends, get_backend, register_backend, set_backend, use_backend
from .reference import elementwise as elementwise_ref
from .reference.causal_conv import causal_conv1d_rows as conv_rows_ref
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


def rms_norm(x: Any, weight: Any, eps: float) -> Any:
    """``x / rms(x) * weight`` over the last dim; see `ops.reference.elementwise.rms_norm`."""
    return dispatch.resolve("rms_norm")(x, weight, eps)


def gated_rms_norm(x: Any, z: Any, weight: Any, group_size: int, eps: float) -> Any:
    """Mamba-2's ``rmsnorm_per_group(x * silu(z)) * weight``; see `ops.reference.elementwise.gated_rms_norm`."""
    return dispatch.resolve("gated_rms_norm")(x, z, weight, group_size, eps)


def swiglu_product(gate: Any, up: Any) -> Any:
    """SwiGLU's ``silu(gate) * up``; see `ops.reference.elementwise.swiglu_product`."""
    return dispatch.resolve("swiglu_product")(gate, up)


def causal_conv1d_rows(*args: Any, **kwargs: Any) -> Any:
    """Causal depthwise conv of time-major rows (+ SiLU) continuing from a conv state; see
    `ops.reference.causal_conv` for layouts. Decode steps run `layers.ssm_state.causal_conv1d_step`."""
    return dispatch.resolve("causal_conv1d_rows")(*args, **kwargs)


def rotary(*args: Any, **kwargs: Any) -> Any:
    """Rotate-half RoPE of `x` by cos/sin tables; see `ops.reference.rotary`."""
    return dispatch.resolve("rotary")(*args, **kwargs)


def _torch_impls() -> dict:
    return {"selective_scan": scan_ref, "ssd_scan": ssd_ref, "eidetic_attention": attention_ref,
            "rms_norm": elementwise_ref.rms_norm, "gated_rms_norm": elementwise_ref.gated_rms_norm,
            "swiglu_product": elementwise_ref.swiglu_product,
            "causal_conv1d_rows": conv_rows_ref, "rotary": rotary_ref}


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
register_backend(dispatch.AUTO, auto.availability, auto.impls)  # the default: cpu-c where it runs, else torch

__all__ = [
    "available_backends",
    "causal_conv1d_rows",
    "eidetic_attention",
    "gated_rms_norm",
    "get_backend",
    "register_backend",
    "rms_norm",
    "rotary",
    "selective_scan",
    "selective_state_update",
    "set_backend",
    "ssd_scan",
    "ssd_state_update",
    "swiglu_product",
    "use_backend",
]
