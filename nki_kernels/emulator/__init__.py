"""A CPU emulator of NKI 0.2.0 (`nki`, `nki.language`, `nki.isa`) on a Trn1 NeuronCore-v2.

    from nki_kernels.emulator import nki, nl, nisa
    outputs = nki.simulate_kernel(kernel, *numpy_arrays)            # like the SDK's simulator
    outputs, profile = nki.simulate(kernel, *arrays, cost_only=False)  # + the Trn1 cost model
    outputs = kernel(*numpy_arrays)          # an @nki.jit kernel; kernel[1](...) launches a grid of 1

Kernels written against NKI 0.2.0 run unchanged: `nki_kernels.compat` hands them this
module when the real `nki` is absent, and `as_nki()` installs it under the name `nki`
for code that imports `nki` itself. Before a kernel runs, its source is checked against
the 0.2.0 language (`frontend`); while it runs, every instruction checks its rules
(`isa`, `core`; `loops` for dependencies between `affine_range` iterations) and is
placed on the contention-aware timeline (`costmodel`). NumPy
arrays passed in become HBM tensors; HBM tensors returned come back as NumPy arrays.
See docs/kernels.md.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from typing import Any, Callable, Iterator

import numpy as np

from . import collectives, core, costmodel, frontend, isa, isa_constants, language, launch, target, tensor
from .core import NKILoopDependencyWarning, NKIRuleError, NKISpillWarning, NkiTensor, Profile
from .frontend import NKILanguageError, NKILanguageWarning

__version__ = "0.2.0-emulated"


def _unwrap(kernel: Callable) -> Callable:
    return getattr(kernel, "__nki_func__", kernel)


def _to_device(value: Any, index: int) -> Any:
    if isinstance(value, np.ndarray):
        if value.dtype not in core.NKI_DTYPES and value.dtype != np.bool_:  # a float64/int64 tensor has no NKI dtype to be traced as
            raise TypeError(f"kernel argument {index} has dtype {value.dtype}, which is not a nki.language data "
                            "type (nki/api/nki/language: int8/16/32, uint8/16/32, float8, float16, bfloat16, "
                            "float32, bool); cast it before the call")
        return core.wrap_hbm(value, name=f"arg{index}")
    return value


def _to_host(value: Any) -> Any:
    if isinstance(value, NkiTensor):
        return value.numpy()
    if isinstance(value, (tuple, list)):
        return type(value)(_to_host(v) for v in value)
    return value


def simulate(kernel: Callable, *args: Any, cost_only: bool = False, record_timeline: bool = False,
             **kwargs: Any) -> tuple[Any, Profile]:
    """Run `kernel` on NumPy inputs; returns (outputs as NumPy, the modelled Trn1 profile).

    The kernel's source is checked first (`frontend.check_kernel`). With ``cost_only``
    the rules are checked and costs charged but no arithmetic is done (outputs are
    garbage): fast enough for full-size shapes. ``record_timeline`` keeps every
    instruction's (resource, name, start, end) in ``profile.timeline.events``. A launched
    kernel (``kernel[n]``) runs with its grid; a Trn1 allows only ``n = 1`` (`launch`).
    """
    # @nki.jit(platform_target=...) and NEURON_PLATFORM_TARGET_OVERRIDE, read when the kernel is compiled
    target.require_emulated_target(getattr(kernel, "__nki_platform_target__", None))
    func = _unwrap(kernel)
    grid = getattr(kernel, "__nki_grid__", ())
    frontend.check_kernel(func, args, kwargs)
    run = core.RunState(compute=not cost_only, record_timeline=record_timeline, grid=grid)
    core.push_state(run)
    try:
        device_args = [_to_device(a, i) for i, a in enumerate(args)]
        device_kwargs = {k: _to_device(v, -1) for k, v in kwargs.items()}
        result = func(*device_args, **device_kwargs)
        frontend.check_io(func, tuple(device_args), device_kwargs, result, run)
        return _to_host(result), run.profile
    finally:
        core.pop_state()


def simulate_kernel(kernel: Callable, *args: Any, **kwargs: Any) -> Any:
    """Run `kernel` on NumPy inputs and return its outputs (the SDK's `nki.simulate_kernel`)."""
    return simulate(kernel, *args, **kwargs)[0]


class Kernel:
    """What `@nki.jit` makes of a function: `kernel(*arrays)` simulates it on one logical core,
    `kernel[n](*arrays)` launches it on `n` (the launch rules are in `launch`)."""

    __nki_jit__ = True

    def __init__(self, func: Callable, grid: tuple[int, ...] = (), platform_target: str | None = None) -> None:
        functools.update_wrapper(self, func)
        self.__nki_func__ = func
        self.__nki_grid__ = grid
        self.__nki_platform_target__ = platform_target

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if core.kernel_running():  # called from a kernel's body: a sub-kernel
            raise TypeError(f"{self.__name__} is an @nki.jit kernel called from inside another kernel; NKI 0.2 "
                            "compiles only top-level kernels (nki-migration-guide.rst 'Remove nki.jit decorator "
                            "on sub-kernels'): call the undecorated function instead")
        return simulate_kernel(self, *args, **kwargs)

    def __getitem__(self, subscript: Any) -> "Kernel":
        if self.__nki_grid__:
            raise TypeError(f"{self.__name__}{list(self.__nki_grid__)} is already launched with a grid")
        return Kernel(self.__nki_func__, launch.launch_grid(self.__name__, subscript), self.__nki_platform_target__)

    def __repr__(self) -> str:
        grid = list(self.__nki_grid__) if self.__nki_grid__ else ""
        return f"<nki.jit kernel {self.__name__}{grid}>"


JIT_MODES = ("jax", "torchxla", "auto")  # nki/api/nki/__init__.py `jit`: "Supported values are ..."
# Beta 1's mode for sub-kernels. The 0.2.0 docstring does not list it, but nki-library 0759719 decorates
# top-level kernels with it (`core/moe/moe_cte/moe_cte.py` line 252, `bwmm_shard_on_block.py` line 67,
# `bwmm_shard_on_I.py` line 87) and its tests import and run them, so 0.2.0 accepts it; the migration
# guide's error for it comes from a decorated sub-kernel's call site (nki-migration-guide.rst line 383),
# which `Kernel.__call__` refuses.
ACCEPTED_MODES = (*JIT_MODES, "trace")


def jit(func=None, mode="auto", **kwargs):
    """`@nki.jit`: in the emulator, calling the kernel (or `kernel[n]`) on NumPy arrays simulates it.

    `mode` must be one NKI 0.2.0 supports (or Beta 1's "trace", which AWS's 0.2 kernels still
    pass; "baremetal" and "simulation" are gone); whatever the mode, the emulator runs the
    kernel on NumPy arrays. ``platform_target`` (nki-library's "trn2"/"trn3") names the
    kernel's target: a value that is not one is refused here, a target other than trn1 when
    the kernel is called, as ``NEURON_PLATFORM_TARGET_OVERRIDE``'s is (`target`). Other keyword
    arguments are accepted, as the 0.2.0 signature's ``**kwargs`` does, and ignored.
    """
    if mode not in ACCEPTED_MODES:
        raise ValueError(f"nki.jit: mode must be one of {list(JIT_MODES)} in NKI 0.2.0, got {mode!r}")
    platform_target = kwargs.get("platform_target")
    if platform_target is not None:
        target.platform_target_gen(platform_target)
    if func is None:
        return functools.partial(jit, mode=mode, **kwargs)
    return Kernel(func, platform_target=platform_target)


@contextlib.contextmanager
def as_nki() -> Iterator[Any]:
    """Install the emulator as `nki`, `nki.language`, `nki.isa`, `nki.isa.constants`, `nki.tensor`
    and `nki.collectives` while the block runs.

    For code written against the real package (`import nki.isa as nisa`), e.g. AWS's
    kernels run from a checkout; the previous modules (if any) come back afterwards.
    """
    modules = {"nki": nki, "nki.language": language, "nki.isa": isa, "nki.isa.constants": isa_constants,
               "nki.tensor": tensor, "nki.collectives": collectives}
    saved = {n: sys.modules.get(n) for n in modules}
    sys.modules.update(modules)
    try:
        yield nki
    finally:
        for n, module in saved.items():
            if module is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = module


# `nki` itself, as one object with .language / .isa like the real package.
nki = sys.modules[__name__]
isa.constants = isa_constants  # `nisa.constants.engine.tensor` (trainium2_arch.rst line 209)
# `nki.dtype`: the type of a dtype, which nki-library's signatures annotate with
# (`dtype: nki.dtype = nl.bfloat16`; SDK `nki/library/api/cross-entropy.rst` line 57). The
# emulator's dtypes are NumPy dtypes.
dtype = np.dtype
nl = language
nisa = isa

__all__ = ["Kernel", "NKILanguageError", "NKILanguageWarning", "NKILoopDependencyWarning", "NKIRuleError",
           "NKISpillWarning", "Profile", "as_nki",
           "collectives", "costmodel", "dtype", "frontend", "isa", "isa_constants", "jit", "language", "launch", "nisa",
           "nki", "nl", "simulate", "simulate_kernel", "target", "tensor"]
