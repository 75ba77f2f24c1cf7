"""A CPU emulator of the NKI 0.2.0 subset our kernels use (`nki`, `nki.language`, `nki.isa`).

    from nki_kernels.emulator import nki, nl, nisa
    outputs = nki.simulate_kernel(kernel, *numpy_arrays)            # like the SDK's simulator
    outputs, profile = nki.simulate(kernel, *arrays, cost_only=False)  # + the Trn1 cost model

Kernels written against NKI 0.2.0 run unchanged: `nki_kernels.compat` hands them this
module when the real `nki` is absent. NumPy arrays passed in become HBM tensors; HBM
tensors returned come back as NumPy arrays. See docs/kernels.md.
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable

import numpy as np

from . import core, isa, language
from .core import NKIRuleError, NkiTensor, Profile

__version__ = "0.2.0-emulated"


def _unwrap(kernel: Callable) -> Callable:
    return getattr(kernel, "__nki_func__", kernel)


def _to_device(value: Any, index: int) -> Any:
    if isinstance(value, np.ndarray):
        return core.wrap_hbm(value, name=f"arg{index}")
    return value


def _to_host(value: Any) -> Any:
    if isinstance(value, NkiTensor):
        return value.numpy()
    if isinstance(value, (tuple, list)):
        return type(value)(_to_host(v) for v in value)
    return value


def simulate(kernel: Callable, *args: Any, cost_only: bool = False, **kwargs: Any) -> tuple[Any, Profile]:
    """Run `kernel` on NumPy inputs; returns (outputs as NumPy, the modelled Trn1 profile).

    With ``cost_only`` the rules are checked and costs charged but no arithmetic is
    done (outputs are garbage): fast enough for full-size shapes.
    """
    run = core.RunState(compute=not cost_only)
    core.push_state(run)
    try:
        isa._REDUCE_REGS.clear()
        device_args = [_to_device(a, i) for i, a in enumerate(args)]
        device_kwargs = {k: _to_device(v, -1) for k, v in kwargs.items()}
        result = _unwrap(kernel)(*device_args, **device_kwargs)
        return _to_host(result), run.profile
    finally:
        core.pop_state()


def simulate_kernel(kernel: Callable, *args: Any, **kwargs: Any) -> Any:
    """Run `kernel` on NumPy inputs and return its outputs (the SDK's `nki.simulate_kernel`)."""
    return simulate(kernel, *args, **kwargs)[0]


def jit(func=None, mode="auto", **kwargs):
    """`@nki.jit`: in the emulator, calling the kernel on NumPy arrays simulates it."""
    if func is None:
        return functools.partial(jit, mode=mode, **kwargs)

    @functools.wraps(func)
    def wrapper(*args: Any, **kw: Any) -> Any:
        return simulate_kernel(func, *args, **kw)

    wrapper.__nki_func__ = func  # type: ignore[attr-defined]
    return wrapper


# `nki` itself, as one object with .language / .isa like the real package.
nki = sys.modules[__name__]
nl = language
nisa = isa

__all__ = ["NKIRuleError", "Profile", "isa", "jit", "language", "nisa", "nki", "nl", "simulate", "simulate_kernel"]
