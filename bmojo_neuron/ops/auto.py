"""The ``auto`` ops backend: per call, the ``cpu-c`` kernels where they can run, the torch reference elsewhere.

It is the default (`dispatch.DEFAULT_BACKEND`), so it must never change what runs where
the C kernels do not apply: every op ``cpu-c`` implements is routed, call by call, to
its C implementation only when

* every tensor argument is an eager CPU tensor outside tracing and
  `fused_kernels_disabled` (`eager_cpu.fused_kernel_available`: the gate every eager-CPU
  fast path asks, so CUDA, XLA, a `torch.compile` or `torch.jit` trace and the Neuron
  backend's CPU stand-in all keep the reference),
* every floating-point tensor argument is float32 (float64, the tests' exact checks, and
  bfloat16 keep the reference) and CPU autocast is off (under autocast the reference runs
  its products in the autocast dtype; the C kernels would run them in float32),
* the op's first tensor has at least `MIN_C_ELEMENTS` elements (not a decoding step's few rows, where a
  C call's fixed cost is more than the op's work),
* and the C library is built and loads (`cpu_c.build.load`).

Otherwise the torch reference runs, exactly as under ``BMOJO_OPS_BACKEND=torch``, and
silently: a machine without a C compiler (or with a read-only cache folder) gets the
speed it had before this default, which is not worth a warning in every process and
rank; `describe` says which backend a run gets and why, and `train`, `bench` and
``bmojo-neuron info`` print it. An explicit ``BMOJO_OPS_BACKEND=cpu-c`` keeps the
``cpu-c`` backend's own warnings.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import torch

from . import dispatch
from .cpu_c import build, common
from .reference.eager_cpu import fused_kernel_available

__all__ = ["availability", "c_runs_here", "describe", "impls"]


def availability() -> tuple[bool, str]:
    """Always selectable: where the C kernels cannot run, the torch reference does."""
    return True, "cpu-c's C kernels on eager CPU float32 inputs where they build, the torch reference elsewhere"


def impls() -> dict[str, Callable]:
    """A router per op that ``cpu-c`` implements (the dispatch sends the other ops to ``torch``)."""
    reference, kernels = dispatch.implementations("torch"), dispatch.implementations("cpu-c")
    return {op: _router(op, reference[op], kernels[op]) for op in kernels}


# Below this many elements in an op's first tensor (a decoding step's rows: batch x 1 token x width) the torch
# reference runs: a C call's fixed cost (ctypes, the autograd Function, this check) is tens of microseconds,
# more than such an op's work, and a decoding step calls dozens of ops. Measured on one thread: an RMS norm of
# (1, 1, 256) 30 us in C against 7 us for SwiGLU's product in torch; a prefill or train step's first tensor
# (batch x L x width) is far above it.
MIN_C_ELEMENTS = 1 << 14


def _router(op: str, reference: Callable, kernel: Callable) -> Callable:
    @functools.wraps(reference)
    def route(*args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():  # first, so that a trace sees only this branch
            return reference(*args, **kwargs)
        if not _c_takes(args, kwargs):
            dispatch.note_ran(op, "torch")
            return reference(*args, **kwargs)
        dispatch.note_ran(op, "cpu-c")
        token = common.silence()  # a kernel that still turns to torch (a shape it does not take) stays silent here
        try:
            return kernel(*args, **kwargs)
        finally:
            common.unsilence(token)

    return route


def _c_takes(args: tuple, kwargs: dict) -> bool:
    """Whether the C kernel should run these arguments (the module docstring's conditions, and at least
    `MIN_C_ELEMENTS` in the first tensor). The ops take their tensors flat, as arguments."""
    tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
    if not tensors or tensors[0].numel() < MIN_C_ELEMENTS:
        return False
    if torch.jit.is_tracing() or not fused_kernel_available(*tensors):
        return False
    if any(t.dtype != torch.float32 for t in tensors if t.is_floating_point()) or torch.is_autocast_enabled("cpu"):
        return False
    return build.load().library is not None


def c_runs_here(device: str = "cpu", precision: str = "fp32") -> str:
    """"" when the default runs the C kernels for a run on `device` at `precision`, else why not (builds the
    library if it is not built yet: about a second, once per machine)."""
    if device != "cpu":
        return "its C kernels are CPU-only"
    if precision not in ("fp32", "float32"):
        return f"its C kernels take float32, the run is {precision}"
    loaded = build.load()
    return "" if loaded.library is not None else f"its C kernels are unavailable: {loaded.reason}"


def describe(device: str = "cpu", precision: str = "fp32") -> str:
    """One short line: which backend runs the hot ops of a run on `device` at `precision`, and why."""
    chosen = {op: dispatch.get_backend(op) for op in dispatch.OP_NAMES}
    if set(chosen.values()) - {dispatch.AUTO, "torch"} or dispatch.AUTO not in chosen.values():
        default = dispatch.DEFAULT_BACKEND == "torch" and not os.environ.get(dispatch.ENV_VAR)
        return f"{_grouped(chosen)} ({'the default' if default else f'{dispatch.ENV_VAR} or set_backend'})"
    why_not = c_runs_here(device, precision)
    if why_not:
        return f"torch (the default, auto: {why_not})"
    chosen = {op: "cpu-c" if name == dispatch.AUTO else name for op, name in chosen.items()}
    single = "" if build.load().openmp else ", one thread: built without OpenMP"
    return f"{_grouped(chosen)} (the default, auto{single}; {dispatch.ENV_VAR}=torch: the reference)"


def _grouped(chosen: dict[str, str]) -> str:
    """"torch", or "cpu-c for ssd_scan, torch for the rest": each backend but torch with its ops."""
    others = {name: [op for op, n in chosen.items() if n == name] for name in chosen.values() if name != "torch"}
    if not others:
        return "torch"
    named = "; ".join(f"{name} for {', '.join(ops)}" for name, ops in others.items())
    return named + ("; torch for the rest" if "torch" in chosen.values() else "")
