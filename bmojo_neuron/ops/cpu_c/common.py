"""What every ``cpu-c`` kernel module shares: when a C kernel may run, the one warning per reason when it
cannot, and the thread count.

A C kernel takes eager CPU float32 tensors from a library that built and loaded; anything
else (another device, tracing, `fused_kernels_disabled`, another dtype, no compiler, a
failed build, ``BMOJO_CPU_C=0``) runs the op's torch implementation instead, with one
`RuntimeWarning` per op and reason (none for the off switch, which is a choice, nor inside
a `torch.compile` trace).
"""

from __future__ import annotations

import contextvars
import warnings

import torch
from torch import Tensor

from ..reference.eager_cpu import fused_kernel_available
from . import build

__all__ = ["NOT_EAGER", "c_unavailable", "ptr", "silence", "threads", "unsilence", "warn_once", "warned"]

NOT_EAGER = "inputs that are not eager CPU tensors (another device, tracing or fused_kernels_disabled)"

warned: set[tuple[str, str]] = set()  # (op, reason) pairs already warned about in this process

# Set while the default backend (`ops.auto`) calls a kernel: the default is silent where C cannot run, so a
# kernel that still turns to its torch path (a shape or argument it does not take) says nothing there.
_silenced: contextvars.ContextVar[bool] = contextvars.ContextVar("bmojo_cpu_c_silenced", default=False)


def silence() -> contextvars.Token:
    """No `warn_once` warnings until `unsilence` (the default backend's calls; an explicit ``cpu-c`` keeps
    them). Two plain calls rather than a context manager: the default backend pays this on every op call."""
    return _silenced.set(True)


def unsilence(token: contextvars.Token) -> None:
    _silenced.reset(token)


def c_unavailable(*tensors: Tensor | None) -> str:
    """Why a C kernel cannot take these inputs (None entries skipped); "" when it can."""
    if not fused_kernel_available(*tensors):
        return NOT_EAGER
    for t in tensors:
        if t is not None and t.dtype != torch.float32:
            return f"{str(t.dtype).removeprefix('torch.')} inputs (the C kernels take float32)"
    loaded = build.load()
    return "" if loaded.library is not None else loaded.reason


def warn_once(op: str, reason: str, stacklevel: int = 4) -> None:
    """Warn that `op` runs its torch path because of `reason`, once per process and pair.

    Not while `torch.compile` traces: the graph holds the torch expressions by design, and a
    warning there is a call Dynamo cannot trace (a `fullgraph` compile would fail on it).
    """
    if torch.compiler.is_compiling() or _silenced.get():
        return
    if (op, reason) not in warned and not build.turned_off():
        warned.add((op, reason))
        warnings.warn(f"ops backend 'cpu-c': {op} runs the torch path: {reason}", RuntimeWarning,
                      stacklevel=stacklevel)


def ptr(t: Tensor | None) -> int | None:
    """The address a C kernel reads `t` at (NULL for None, an absent optional operand)."""
    return None if t is None else t.data_ptr()


def threads() -> int:
    """The C kernels use as many threads as torch's intra-op pool (the bench sets it to 1)."""
    return max(1, torch.get_num_threads())
