"""torch integration: autograd Functions that call the NKI forward and backward kernels.

Two runners execute the same kernel source:
  * ``emulator`` (backend ``nki-sim``): CPU tensors -> NumPy -> the NKI emulator -> torch.
    Slow and exact; for tests and debugging.
  * ``device`` (backend ``nki``): XLA tensors passed straight to the `nki.jit` kernels,
    which the Neuron compiler turns into custom calls in the graph. Only built on
    Trainium (the real NKI 0.2 must import).

The wrappers take the reference ops' exact signatures. Kernels need L a multiple of
128, so other lengths are padded at the end (later steps never change earlier
outputs); returning the final state of a padded sequence, or gradients through
`initial_state`, raises NotImplementedError. The SSD backward kernel is not written
yet: `ssd_scan`'s backward recomputes the reference op under autograd (see
docs/kernels.md, "Missing").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

TILE = 128


# ----------------------------------------------------------------------------- runners
@dataclass(frozen=True)
class Runner:
    """How kernel inputs/outputs cross between torch and the kernel world."""

    name: str
    call: Callable[..., Any]
    to_kernel: Callable[[Tensor | None], Any]
    from_kernel: Callable[[Any, torch.dtype, torch.device], Tensor]


def _np_in(t: Tensor | None) -> np.ndarray | None:
    if t is None:
        return None
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    if t.dtype not in (torch.float32, torch.float16):
        t = t.float()
    return t.numpy()


def _np_out(a: np.ndarray, dtype: torch.dtype, device: torch.device) -> Tensor:
    a = np.ascontiguousarray(a)
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16).to(device=device, dtype=dtype)
    return torch.from_numpy(a.copy()).to(device=device, dtype=dtype)


def emulator_runner() -> Runner:
    from nki_kernels.emulator import simulate_kernel

    return Runner("emulator", simulate_kernel, _np_in, _np_out)


def device_runner() -> Runner:
    """Real NKI on XLA tensors; the kernels are `nki.jit` functions called directly."""
    return Runner("device", lambda kernel, *args: kernel(*args), lambda t: t,
                  lambda a, dtype, device: a.to(dtype))


# ----------------------------------------------------------------------------- helpers
def _pad_time(t: Tensor | None, pad: int, dim: int) -> Tensor | None:
    if t is None or pad == 0:
        return t
    spec = [0, 0] * (t.dim() - 1 - dim) + [0, pad]
    return F.pad(t, spec)


def _kernels():
    from nki_kernels.selective_scan_bwd import selective_scan_bwd
    from nki_kernels.selective_scan_fwd import selective_scan_fwd
    from nki_kernels.ssd_fwd import ssd_fwd

    return selective_scan_fwd, selective_scan_bwd, ssd_fwd


# ----------------------------------------------------------------------------- Mamba-1
class SelectiveScanFn(torch.autograd.Function):
    """y = selective_scan(u, delta, A, B, C, D, z, delta_bias, softplus) via the NKI kernels."""

    @staticmethod
    def forward(ctx, runner, softplus, u, delta, A, B, C, D, z, delta_bias):  # type: ignore[override]
        fwd, _, _ = _kernels()
        r = runner
        args = [r.to_kernel(x) for x in (u, delta, A, B, C, D, z, delta_bias)]
        y, _ = r.call(fwd, *args, softplus, None)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
        ctx.runner, ctx.softplus = runner, softplus
        return r.from_kernel(y, u.dtype, u.device)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        _, bwd, _ = _kernels()
        r = ctx.runner
        u, delta, A, B, C, D, z, delta_bias = ctx.saved_tensors
        dy = dy.to(u.dtype)
        args = [r.to_kernel(x) for x in (dy, u, delta, A, B, C, D, z, delta_bias)]
        du, ddelta, dA, dB, dC, dD, dz, dbias = r.call(bwd, *args, ctx.softplus)
        dev = u.device
        grads = [
            r.from_kernel(du, u.dtype, dev), r.from_kernel(ddelta, delta.dtype, dev), r.from_kernel(dA, A.dtype, dev),
            r.from_kernel(dB, B.dtype, dev), r.from_kernel(dC, C.dtype, dev),
            None if D is None else r.from_kernel(dD, D.dtype, dev).reshape(D.shape),
            None if z is None else r.from_kernel(dz, z.dtype, dev),
            None if delta_bias is None else r.from_kernel(dbias, delta_bias.dtype, dev).reshape(delta_bias.shape),
        ]
        return (None, None, *grads)


def make_selective_scan(runner: Runner) -> Callable[..., Any]:
    """`selective_scan` with the reference signature, running the kernels through `runner`."""

    def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                       z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                       initial_state: Tensor | None = None, return_last_state: bool = False):
        length = u.shape[-1]
        pad = (-length) % TILE
        if initial_state is not None or return_last_state:
            return _selective_scan_with_state(runner, pad, u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                              initial_state, return_last_state)
        padded = [_pad_time(x, pad, 2) for x in (u, delta, B, C, z)]
        y = SelectiveScanFn.apply(runner, bool(delta_softplus), padded[0], padded[1], A, padded[2], padded[3], D,
                                  padded[4], delta_bias)
        return y[..., :length] if pad else y

    return selective_scan


def _selective_scan_with_state(runner, pad, u, delta, A, B, C, D, z, delta_bias, softplus, initial_state, ret):
    """Forward-only path with a state (generation prefill); no gradients through it."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (u, delta, A, B, C, D, z, delta_bias, initial_state)):
        raise NotImplementedError("the NKI selective-scan kernels do not backpropagate through initial_state / "
                                  "return_last_state; use the torch backend for that")
    if pad and ret:
        raise NotImplementedError("return_last_state needs L to be a multiple of 128 with the NKI kernels")
    fwd, _, _ = _kernels()
    args = [runner.to_kernel(_pad_time(x, pad, 2) if x is not None and x.dim() == 3 and x is not A else x)
            for x in (u, delta, A, B, C, D, z, delta_bias)]
    h0 = runner.to_kernel(initial_state.float() if initial_state is not None else None)
    y, last = runner.call(fwd, *args, bool(softplus), h0)
    y = runner.from_kernel(y, u.dtype, u.device)[..., :u.shape[-1]]
    return (y, runner.from_kernel(last, torch.float32, u.device)) if ret else y


# ----------------------------------------------------------------------------- Mamba-2 / SSD
class SsdScanFn(torch.autograd.Function):
    """y = ssd_scan(...) via the NKI forward kernel; backward by reference recompute (no kernel yet)."""

    @staticmethod
    def forward(ctx, runner, softplus, x, dt, A, B, C, D, dt_bias):  # type: ignore[override]
        _, _, fwd = _kernels()
        args = [runner.to_kernel(t) for t in (x, dt, A, B, C, D, dt_bias)]
        y, _ = runner.call(fwd, *args, softplus)
        ctx.save_for_backward(x, dt, A, B, C, D, dt_bias)
        ctx.softplus = softplus
        return runner.from_kernel(y, x.dtype, x.device)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        from bmojo_neuron.ops.reference.ssd import ssd_scan as ssd_ref

        saved = ctx.saved_tensors
        with torch.enable_grad():
            inputs = [t.detach().requires_grad_(t.requires_grad or True) if t is not None else None for t in saved]
            x, dt, A, B, C, D, dt_bias = inputs
            y = ssd_ref(x, dt, A, B, C, TILE, D=D, dt_bias=dt_bias, dt_softplus=ctx.softplus)
            wanted = [t for t in inputs if t is not None]
            grads = iter(torch.autograd.grad(y, wanted, dy, allow_unused=True))
        return (None, None, *[next(grads) if t is not None else None for t in inputs])


def make_ssd_scan(runner: Runner) -> Callable[..., Any]:
    """`ssd_scan` with the reference signature, running the forward kernel through `runner`."""

    def ssd_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int, D: Tensor | None = None,
                 dt_bias: Tensor | None = None, dt_softplus: bool = True, initial_state: Tensor | None = None,
                 return_final_state: bool = False):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if initial_state is not None or return_final_state:
            raise NotImplementedError("the NKI SSD kernels do not take initial_state / return_final_state yet; "
                                      "use the torch backend for generation")
        length = x.shape[1]
        pad = (-length) % TILE  # the kernel's chunk is 128 whatever chunk_size says: same math
        padded = [_pad_time(t, pad, 1) for t in (x, dt, B, C)]
        y = SsdScanFn.apply(runner, bool(dt_softplus), padded[0], padded[1], A, padded[2], padded[3], D, dt_bias)
        return y[:, :length] if pad else y

    return ssd_scan


def emulator_ops() -> dict[str, Callable[..., Any]]:
    """The `nki-sim` backend's ops."""
    runner = emulator_runner()
    return {"selective_scan": make_selective_scan(runner), "ssd_scan": make_ssd_scan(runner)}


def device_ops() -> dict[str, Callable[..., Any]]:
    """The `nki` backend's ops (Trainium only)."""
    runner = device_runner()
    return {"selective_scan": make_selective_scan(runner), "ssd_scan": make_ssd_scan(runner)}
