"""An optional `torch.compile` of the SSM decode step (off by default).

At one token per step the SSM step is some 40 small ops whose cost is dispatch, not
arithmetic; compiled, its element-wise ops fuse into a few kernels. Compiling takes
tens of seconds on first use (and again for every new batch size), so it is opt-in:
``BMOJO_COMPILE_DECODE=1`` in the environment, or `set_compiled_decode(True)`.

It is never required: a compile that fails (no C++ compiler, an unsupported platform)
warns once and the step runs eagerly from then on. The compiled function is pure (it
returns the new states, the caller stores them), so a failure leaves nothing half
written. docs/benchmark-log.md ("decode on rows, and a compiled SSM step") compares both.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch

ENV_VAR = "BMOJO_COMPILE_DECODE"
_enabled: bool | None = None  # None: read the environment on first use


_backend = "inductor"


def set_compiled_decode(enabled: bool, backend: str = "inductor") -> None:
    """Compile the SSM decode step (True) or run it eagerly (False), whatever the environment says.

    `backend` is torch.compile's; ``"eager"`` captures the graph without generating code
    (what the tests use: it checks the step compiles whole, in seconds).
    """
    global _enabled, _backend
    _enabled, _backend = bool(enabled), backend


def compiled_decode_enabled() -> bool:
    global _enabled
    if _enabled is None:
        _enabled = os.environ.get(ENV_VAR, "") not in ("", "0")
    return _enabled


class CompiledOrEager:
    """Calls `fn` through `torch.compile` when compiled decoding is on, else as it is.

    One compiled function serves every layer (the module is an argument, its parameters
    inputs of the graph). After the first failure to compile or run it, `fn` runs eagerly.
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.compiled: Callable[..., Any] | None = None
        self.failed = False

    def __call__(self, *args: Any) -> Any:
        # Inside a compiled model the step is part of the model's graph (asked first: reading the setting may
        # write it, which the model's graph would take for a changed input).
        if torch.compiler.is_compiling() or self.failed or not compiled_decode_enabled():
            return self.fn(*args)
        try:
            if self.compiled is None:
                self.compiled = torch.compile(self.fn, dynamic=False, fullgraph=True, backend=_backend)
            return self.compiled(*args)
        except Exception as exc:  # noqa: BLE001 - any compiler failure means: run eagerly
            self.failed = True
            warnings.warn(f"compiled decode step unavailable, running it eagerly ({type(exc).__name__}: {exc})",
                          RuntimeWarning, stacklevel=2)
            return self.fn(*args)
