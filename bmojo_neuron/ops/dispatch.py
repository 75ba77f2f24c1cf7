"""One dispatch point for the hot ops, with interchangeable backends.

Backends:
  * ``torch``   -- the reference implementations in this package (CPU, CUDA).
  * ``nki``     -- NKI kernels on Trainium (needs the Neuron SDK).
  * ``nki-sim`` -- the same NKI kernels executed on CPU by the project's emulator.
  * ``cpu-c``   -- plain-C/OpenMP kernels for eager CPU float32 (`ops.cpu_c`).
  * ``auto``    -- per call, ``cpu-c`` where its kernels can run (eager CPU float32 inputs, the library
                   built), ``torch`` elsewhere, silently (`ops.auto`); `DEFAULT_BACKEND`.

Model code calls the ops (`ops.selective_scan(...)`, `ops.ssd_scan(...)`,
`ops.eidetic_attention(...)`, `ops.rotary(...)`, Mamba-2's conv `ops.causal_conv1d_rows(...)`
and the element-wise chains `ops.rms_norm(...)`, `ops.gated_rms_norm(...)`,
`ops.swiglu_product(...)`); which implementation runs is chosen here, globally or per op,
with `set_backend` / `use_backend` or the ``BMOJO_OPS_BACKEND`` environment variable
(unset: `DEFAULT_BACKEND`). Every backend takes the reference signatures and layouts.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

OP_NAMES = ("selective_scan", "ssd_scan", "eidetic_attention", "causal_conv1d_rows", "rms_norm", "gated_rms_norm",
            "swiglu_product", "rotary")
ENV_VAR = "BMOJO_OPS_BACKEND"
# The backend with BMOJO_OPS_BACKEND unset (or empty): "auto" runs the cpu-c kernels where they can run and the
# torch reference elsewhere; "torch" would make the reference the default everywhere. The one switch.
AUTO = "auto"
DEFAULT_BACKEND = AUTO


@dataclass
class Backend:
    """A named set of op implementations and a check of whether it can run here."""

    name: str
    availability: Callable[[], tuple[bool, str]]
    loader: Callable[[], dict[str, Callable]]
    _impls: dict[str, Callable] | None = field(default=None, repr=False)

    def impls(self) -> dict[str, Callable]:
        if self._impls is None:
            ok, reason = self.availability()
            if not ok:
                raise ValueError(f"ops backend {self.name!r} is not available: {reason}")
            self._impls = self.loader()
        return self._impls


_BACKENDS: dict[str, Backend] = {}
_active: dict[str, str] = {}


def register_backend(name: str, availability: Callable[[], tuple[bool, str]], loader: Callable[[], dict]) -> None:
    """Add a backend. `loader` is called lazily, on first use, so registering imports nothing heavy."""
    _BACKENDS[name] = Backend(name, availability, loader)


def available_backends() -> dict[str, tuple[bool, str]]:
    """Every registered backend -> (available here?, reason)."""
    return {name: backend.availability() for name, backend in _BACKENDS.items()}


def get_backend(op: str = "selective_scan") -> str:
    """Name of the backend that runs `op` now."""
    _check_op(op)
    if op not in _active:
        _active[op] = _from_environment(op)
    return _active[op]


def _from_environment(op: str) -> str:
    """``BMOJO_OPS_BACKEND`` (unset: `DEFAULT_BACKEND`) for `op`, as `set_backend(name)` without ops routes it:
    to the named backend if it implements `op`, else to ``torch`` (``cpu-c`` and ``auto`` have only the ops
    with C kernels). An unknown or unavailable name is kept, so that `resolve` raises its error."""
    name = os.environ.get(ENV_VAR) or DEFAULT_BACKEND
    backend = _BACKENDS.get(name)
    if backend is None:
        return name
    try:
        return name if op in backend.impls() else "torch"
    except ValueError:
        return name


def set_backend(name: str, ops: Sequence[str] | None = None) -> None:
    """Route `ops` to backend `name`; raises ValueError if it cannot run here.

    With no `ops`, every op the backend implements is routed to it (the others keep
    their backend); an op named explicitly that the backend lacks raises ValueError.
    """
    if name not in _BACKENDS:
        raise ValueError(f"unknown ops backend {name!r}; choose one of {sorted(_BACKENDS)}")
    impls = _BACKENDS[name].impls()
    if ops is None:
        ops = [op for op in OP_NAMES if op in impls]
    for op in ops:
        _check_op(op)
        if op not in impls:
            raise ValueError(f"ops backend {name!r} has no implementation of {op!r}")
        _active[op] = name


@contextlib.contextmanager
def use_backend(name: str, ops: Sequence[str] | None = None) -> Iterator[None]:
    """Run the block with `ops` (default: all the backend implements) routed to backend `name`."""
    previous = {op: get_backend(op) for op in OP_NAMES}
    set_backend(name, ops)
    try:
        yield
    finally:
        _active.update(previous)


def resolve(op: str) -> Callable:
    """The implementation of `op` on its active backend."""
    name = get_backend(op)
    if name not in _BACKENDS:
        raise ValueError(f"{ENV_VAR} or set_backend named unknown ops backend {name!r}; choose one of {sorted(_BACKENDS)}")
    impl = _BACKENDS[name].impls()[op]
    # Compiling first: under a trace Dynamo would otherwise read `_recorders` and guard on it, and a graph
    # compiled outside a `recording` block would recompile inside one (a timed bench step).
    if not torch.compiler.is_compiling() and _recorders and name != AUTO:
        note_ran(op, name)  # `auto` notes the backend it picks, per call
    return impl


def implementations(name: str) -> dict[str, Callable]:
    """Backend `name`'s op implementations (loaded on first use; ValueError if it cannot run here)."""
    return _BACKENDS[name].impls()


# What ran, for a report that says so (`recording`): one dict per open `recording` block, op -> backends.
_recorders: list[dict[str, set[str]]] = []


@contextlib.contextmanager
def recording() -> Iterator[dict[str, set[str]]]:
    """Collect, for the block, which backend ran each op called eagerly (``auto`` notes ``cpu-c`` or
    ``torch`` per call). Calls traced into a compiled graph are not seen."""
    ran: dict[str, set[str]] = {}
    _recorders.append(ran)
    try:
        yield ran
    finally:
        _recorders.remove(ran)


def note_ran(op: str, backend: str) -> None:
    for ran in _recorders:
        ran.setdefault(op, set()).add(backend)


def _check_op(op: str) -> None:
    if op not in OP_NAMES:
        raise ValueError(f"unknown op {op!r}; ops are {list(OP_NAMES)}")
