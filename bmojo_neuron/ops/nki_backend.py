"""The ``nki`` and ``nki-sim`` op backends: autograd Functions that call the NKI kernels of `nki_kernels`.

Two runners execute the same kernel source with the same call, `kernel(*args)` on the
`nki.jit` object, every parameter positional (tensors, `None` for an absent one, Python
constants); inputs not in float32/float16/bfloat16 become float32 first in both:
  * ``emulator`` (backend ``nki-sim``): CPU tensors -> NumPy -> the NKI emulator -> torch.
    Slow and exact; for tests and debugging.
  * ``device`` (backend ``nki``): XLA tensors passed straight to the `nki.jit` kernels,
    which the Neuron compiler turns into custom calls in the graph. Only built on
    Trainium (the real NKI 0.2 must import); tensors off the XLA device are refused.

The wrappers take the reference ops' exact signatures. Kernels need L a multiple of
128, so other lengths are padded at the end (later steps never change earlier
outputs); returning the final state of a padded sequence, or gradients through
`initial_state`, raises NotImplementedError. Both scans' backwards are NKI kernels
(`selective_scan_bwd`, `ssd_bwd`), which recompute what they need from the saved inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import ml_dtypes
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from nki_kernels.attention_bwd import eidetic_attention_bwd
from nki_kernels.attention_fwd import eidetic_attention_fwd
from nki_kernels.selective_scan_bwd import selective_scan_bwd
from nki_kernels.selective_scan_fwd import selective_scan_fwd
from nki_kernels.ssd_bwd import ssd_bwd
from nki_kernels.ssd_fwd import ssd_fwd

from .reference.eidetic_attention import check_shapes

TILE = 128


# ----------------------------------------------------------------------------- runners
@dataclass(frozen=True)
class Runner:
    """How kernel inputs/outputs cross between torch and the kernel world."""

    name: str
    call: Callable[..., Any]
    to_kernel: Callable[[Tensor | None], Any]
    from_kernel: Callable[[Any, torch.dtype, torch.device], Tensor]


KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the kernels take; NKI has no float64


def _kernel_input(t: Tensor | None) -> Tensor | None:
    """`t` in a dtype the kernels take (others become float32), so both runners hand a kernel the same dtypes."""
    if t is None or t.dtype in KERNEL_DTYPES:
        return t
    return t.float()


def _np_in(t: Tensor | None) -> np.ndarray | None:
    t = _kernel_input(t)
    if t is None:
        return None
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _np_out(a: np.ndarray, dtype: torch.dtype, device: torch.device) -> Tensor:
    a = np.ascontiguousarray(a)
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16).to(device=device, dtype=dtype)
    return torch.from_numpy(a.copy()).to(device=device, dtype=dtype)


def _call_jit(kernel: Callable[..., Any], *args: Any) -> Any:
    """Call an `nki.jit` kernel as torch code does: positionally, tensors and compile-time constants."""
    return kernel(*args)


def emulator_runner() -> Runner:
    """The emulator's `nki.jit` kernels on NumPy copies of CPU tensors (same call as `device_runner`)."""
    return Runner("emulator", _call_jit, _np_in, _np_out)


def _xla_in(t: Tensor | None) -> Tensor | None:
    """A kernel argument for the real `nki.jit` under torch: a tensor on the XLA device.

    The NKI guide (nki/guides/framework_custom_op.rst) calls kernels on tensors moved to
    `xm.xla_device()`; the kernel becomes a custom call in the XLA graph, which a CPU/CUDA
    tensor is not part of.
    """
    if t is not None and t.device.type != "xla":
        raise ValueError(f"ops backend 'nki' needs tensors on the XLA device, got one on {t.device}; "
                         "move the model and batch to torch_xla.device() or use backend 'nki-sim'")
    return _kernel_input(t)


def device_runner() -> Runner:
    """Real NKI on XLA tensors; the kernels are `nki.jit` functions called directly."""
    return Runner("device", _call_jit, _xla_in,
                  lambda a, dtype, device: a.to(dtype))


# ----------------------------------------------------------------------------- helpers
def _pad_time(t: Tensor | None, pad: int, dim: int) -> Tensor | None:
    if t is None or pad == 0:
        return t
    spec = [0, 0] * (t.dim() - 1 - dim) + [0, pad]
    return F.pad(t, spec)


# ----------------------------------------------------------------------------- Mamba-1
class SelectiveScanFn(torch.autograd.Function):
    """y = selective_scan(u, delta, A, B, C, D, z, delta_bias, softplus) via the NKI kernels."""

    @staticmethod
    def forward(ctx, runner, softplus, u, delta, A, B, C, D, z, delta_bias):  # type: ignore[override]
        r = runner
        args = [r.to_kernel(x) for x in (u, delta, A, B, C, D, z, delta_bias)]
        y, _, snaps, y_pre = r.call(selective_scan_fwd, *args, softplus, None, True)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
        ctx.runner, ctx.softplus = runner, softplus
        ctx.kernel_saved = (snaps, y_pre)  # the states entering each time tile and y before the gate
        return r.from_kernel(y, u.dtype, u.device)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        r = ctx.runner
        u, delta, A, B, C, D, z, delta_bias = ctx.saved_tensors
        dy = dy.to(u.dtype)
        args = [r.to_kernel(x) for x in (dy, u, delta, A, B, C, D, z, delta_bias)]
        du, ddelta, dA, dB, dC, dD, dz, dbias = r.call(selective_scan_bwd, *args, ctx.softplus, *ctx.kernel_saved)
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
    args = [runner.to_kernel(_pad_time(x, pad, 2) if x is not None and x.dim() == 3 and x is not A else x)
            for x in (u, delta, A, B, C, D, z, delta_bias)]
    h0 = runner.to_kernel(initial_state.float() if initial_state is not None else None)
    y, last = runner.call(selective_scan_fwd, *args, bool(softplus), h0)
    y = runner.from_kernel(y, u.dtype, u.device)[..., :u.shape[-1]]
    return (y, runner.from_kernel(last, torch.float32, u.device)) if ret else y


# ----------------------------------------------------------------------------- Mamba-2 / SSD
class SsdScanFn(torch.autograd.Function):
    """y = ssd_scan(...) via the NKI forward kernel; gradients via the NKI backward kernel (`ssd_bwd`).

    Only the inputs are saved: the backward kernel recomputes the chunk states itself.
    """

    @staticmethod
    def forward(ctx, runner, softplus, x, dt, A, B, C, D, dt_bias):  # type: ignore[override]
        args = [runner.to_kernel(t) for t in (x, dt, A, B, C, D, dt_bias)]
        y, _ = runner.call(ssd_fwd, *args, softplus)
        ctx.save_for_backward(x, dt, A, B, C, D, dt_bias)
        ctx.runner, ctx.softplus = runner, softplus
        return runner.from_kernel(y, x.dtype, x.device)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        r = ctx.runner
        x, dt, A, B, C, D, dt_bias = ctx.saved_tensors
        dy = dy.to(x.dtype).contiguous()
        args = [r.to_kernel(t) for t in (dy, x, dt, A, B, C, D, dt_bias)]
        dx, ddt, dA, dB, dC, dD, dbias = r.call(ssd_bwd, *args, ctx.softplus)
        dev = x.device
        grads = [
            r.from_kernel(dx, x.dtype, dev), r.from_kernel(ddt, dt.dtype, dev),
            r.from_kernel(dA, A.dtype, dev).reshape(A.shape), r.from_kernel(dB, B.dtype, dev),
            r.from_kernel(dC, C.dtype, dev),
            None if D is None else r.from_kernel(dD, D.dtype, dev).reshape(D.shape),
            None if dt_bias is None else r.from_kernel(dbias, dt_bias.dtype, dev).reshape(dt_bias.shape),
        ]
        return (None, None, *grads)


def make_ssd_scan(runner: Runner) -> Callable[..., Any]:
    """`ssd_scan` with the reference signature, running the forward and backward kernels through `runner`."""

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


# ----------------------------------------------------------------------------- eidetic attention
ATTN_NEG = -1.0e30  # additive bias of an empty memory slot (finite: no inf - inf in the kernels)


def _kernel_dtype(q: Tensor) -> torch.dtype:
    """Matmul dtype of the attention kernels: bf16/fp16 stay, everything else runs in fp32."""
    return q.dtype if q.dtype in (torch.bfloat16, torch.float16) else torch.float32


def _tr(t: Tensor | None) -> Tensor | None:
    """Last two axes swapped, contiguous (head dim onto the partitions)."""
    return None if t is None else t.transpose(-1, -2).contiguous()


class EideticAttentionFn(torch.autograd.Function):
    """(out, lse) = eidetic_attention(...) via the NKI forward and backward kernels.

    Tensors arrive padded (L a multiple of 128) with unused streams as None.
    """

    @staticmethod
    def forward(ctx, runner, window, fading_window, chunk, scale, fading_overlap, q, k, v, kf, vf, mem_k,  # type: ignore
                mem_v, mem_bias):
        r = runner
        kd = _kernel_dtype(q)
        c = lambda t: None if t is None else t.to(kd).contiguous()  # noqa: E731
        args = [r.to_kernel(x) for x in (_tr(c(q)), _tr(c(k)), c(v), _tr(c(kf)), c(vf), _tr(c(mem_k)), c(mem_v),
                                         mem_bias)]
        out, lse = r.call(eidetic_attention_fwd, *args, window, fading_window, chunk, scale, fading_overlap)
        out_t = r.from_kernel(out, kd, q.device)
        lse_t = r.from_kernel(lse, torch.float32, q.device)
        ctx.save_for_backward(q, k, v, kf, vf, mem_k, mem_v, mem_bias, out_t, lse_t)
        ctx.runner, ctx.cfg = runner, (window, fading_window, chunk, scale, fading_overlap)
        return out_t.to(q.dtype), lse_t

    @staticmethod
    def backward(ctx, dout, dlse):  # type: ignore[override]
        r = ctx.runner
        q, k, v, kf, vf, mem_k, mem_v, mem_bias, out, lse = ctx.saved_tensors
        kd = _kernel_dtype(q)
        c = lambda t: None if t is None else t.to(kd).contiguous()  # noqa: E731
        dout = c(dout if dout is not None else torch.zeros_like(out))
        dlse = None if dlse is None else dlse.float().contiguous()
        tensors = (c(q), _tr(c(q)), c(k), _tr(c(k)), _tr(c(v)), c(kf), _tr(c(kf)), _tr(c(vf)), c(mem_k), _tr(c(mem_k)),
                   _tr(c(mem_v)), mem_bias, out, dout, _tr(dout), lse, dlse)
        grads = r.call(eidetic_attention_bwd, *[r.to_kernel(t) for t in tensors], *ctx.cfg)
        dev = q.device
        like = (q, k, v, kf, vf, mem_k, mem_v)
        result = [None if g is None or t is None else r.from_kernel(g, t.dtype, dev) for g, t in zip(grads, like)]
        return (None, None, None, None, None, None, *result, None)


def make_eidetic_attention(runner: Runner) -> Callable[..., Any]:
    """`eidetic_attention` with the reference signature, running the NKI kernels through `runner`.

    Any L (padded at the end to a multiple of 128: later keys never reach earlier queries),
    any chunk, window and memory size, the fading keys behind the window or over it
    (`fading_overlap`); head_dim <= 128; scale > 0. `block` is the reference's blocking
    knob and is ignored.
    """

    def eidetic_attention(q: Tensor, k: Tensor, v: Tensor, k_fading: Tensor | None = None,
                          v_fading: Tensor | None = None, mem_k: Tensor | None = None, mem_v: Tensor | None = None,
                          mem_valid: Tensor | None = None, *, window: int, fading_window: int = 0, chunk: int = 1,
                          scale: float | None = None, block: int | None = None, fading_overlap: bool = False):
        check_shapes(q, k, v, k_fading, v_fading, mem_k, mem_v, mem_valid, window, fading_window, chunk)
        batch, _, length, head_dim = q.shape
        if head_dim > TILE:
            raise ValueError(f"eidetic_attention (NKI): head_dim must be <= {TILE}, got {head_dim}")
        scale = 1.0 / head_dim ** 0.5 if scale is None else float(scale)
        if scale <= 0:
            raise ValueError(f"eidetic_attention (NKI): scale must be > 0, got {scale}")
        window = min(window, length)
        use_fading = k_fading is not None and fading_window > 0 and (fading_overlap or window < length)
        use_memory = mem_k is not None and mem_k.shape[3] > 0
        pad = (-length) % TILE
        padded = length + pad
        q_p, k_p, v_p = (_pad_time(t, pad, 2) for t in (q, k, v))
        kf_p = _pad_time(k_fading, pad, 2) if use_fading else None
        vf_p = _pad_time(v_fading, pad, 2) if use_fading else None
        mk = mv = bias = None
        if use_memory:
            extra = -(-padded // chunk) - mem_k.shape[2]  # chunks that hold only padding
            mk, mv = _pad_time(mem_k, extra, 2), _pad_time(mem_v, extra, 2)
            valid = mem_valid if not extra else torch.cat(
                [mem_valid, mem_valid.new_zeros(batch, extra, mem_valid.shape[2])], 1)
            bias = torch.zeros(valid.shape, dtype=torch.float32, device=q.device).masked_fill(~valid, ATTN_NEG)
        out, lse = EideticAttentionFn.apply(runner, window, fading_window if use_fading else 0, chunk, scale,
                                            fading_overlap, q_p, k_p, v_p, kf_p, vf_p, mk, mv, bias)
        if pad:
            out, lse = out[:, :, :length], lse[:, :, :length]
        return out, lse

    return eidetic_attention


def attention_emulator_ops() -> dict[str, Callable[..., Any]]:
    """The `nki-sim` backend's attention op."""
    return {"eidetic_attention": make_eidetic_attention(emulator_runner())}


def attention_device_ops() -> dict[str, Callable[..., Any]]:
    """The `nki` backend's attention op (Trainium only)."""
    return {"eidetic_attention": make_eidetic_attention(device_runner())}
