"""Selective scan (Mamba-1) and SSD scan (Mamba-2) against naive references written here.

The references are textbook per-step recurrences (plain Python loops over time with
direct indexing) and, for SSD, an independent chunked formula in the style of
``ssd_minimal_discrete`` (segment sums by the masked-cumsum trick, inter-chunk states
by a segment-sum matrix over chunks). Math checks run in float64 with tol 1e-10.
"""

from __future__ import annotations

import contextlib
import sys

import pytest
import torch
import torch.nn.functional as F

import bmojo_neuron.ops.reference.selective_scan  # noqa: F401
from bmojo_neuron.ops.reference.selective_scan import selective_scan, selective_state_update
import bmojo_neuron.ops.reference.ssd as ssd_module
from bmojo_neuron.ops.reference.eager_cpu import fused_kernels_disabled
from bmojo_neuron.ops.reference.ssd import ssd_scan, ssd_state_update

F64 = torch.float64
TOL = 1e-10


# ----------------------------------------------------------------------------- naive references
def naive_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, softplus=False, h0=None):
    """h_t = exp(d_t A) h_{t-1} + d_t B_t u_t ; y_t = <h_t, C_t> + D u_t ; y *= silu(z)."""
    batch, dim, length = u.shape
    d = delta + (delta_bias[:, None] if delta_bias is not None else 0)
    if softplus:
        d = torch.log1p(torch.exp(d))
    h = h0.clone() if h0 is not None else torch.zeros(batch, dim, A.shape[1], dtype=u.dtype)
    ys = []
    for t in range(length):
        h = torch.exp(d[:, :, t, None] * A) * h + d[:, :, t, None] * B[:, None, :, t] * u[:, :, t, None]
        y = (h * C[:, None, :, t]).sum(-1)
        if D is not None:
            y = y + D * u[:, :, t]
        if z is not None:
            y = y * z[:, :, t] * torch.sigmoid(z[:, :, t])
        ys.append(y)
    return torch.stack(ys, dim=-1), h


def naive_ssd(x, dt, A, B, C, D=None, dt_bias=None, softplus=True, h0=None):
    """Per head: h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T ; y_t = h_t C_t + D x_t."""
    batch, length, heads, head_dim = x.shape
    groups, n = B.shape[2:]
    d = dt + (dt_bias if dt_bias is not None else 0)
    if softplus:
        d = torch.log1p(torch.exp(d))
    h = h0.clone() if h0 is not None else torch.zeros(batch, heads, head_dim, n, dtype=x.dtype)
    ys = torch.zeros_like(x)
    for t in range(length):
        for hd in range(heads):
            g = hd // (heads // groups)
            h[:, hd] = torch.exp(d[:, t, hd] * A[hd])[:, None, None] * h[:, hd] + (
                d[:, t, hd, None, None] * x[:, t, hd, :, None] * B[:, t, g, None, :]
            )
            ys[:, t, hd] = (h[:, hd] * C[:, t, g, None, :]).sum(-1)
            if D is not None:
                ys[:, t, hd] += D[hd] * x[:, t, hd]
    return ys, h


def segsum_masked_cumsum(a):
    """out[..., i, j] = sum_{k=j+1..i} a[..., k] for i >= j, -inf above the diagonal."""
    T = a.shape[-1]
    rep = a[..., None].expand(*a.shape, T)  # rep[..., k, j] = a[..., k]
    strictly_lower = torch.ones(T, T, dtype=torch.bool).tril(-1)
    rep = rep.masked_fill(~strictly_lower, 0.0)
    out = torch.cumsum(rep, dim=-2)
    return out.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))


def chunked_ssd_reference(x, dt, A, B, C, chunk, D=None, dt_bias=None, softplus=True, h0=None):
    """Independent SSD: heads-expanded B/C, masked-cumsum segsums, inter-chunk segsum matrix."""
    batch, length, heads, head_dim = x.shape
    groups, n = B.shape[2:]
    d = dt + (dt_bias if dt_bias is not None else 0)
    if softplus:
        d = torch.log1p(torch.exp(d))
    pad = (-length) % chunk
    xp = torch.cat([x, x.new_zeros(batch, pad, heads, head_dim)], 1)
    dp = torch.cat([d, d.new_zeros(batch, pad, heads)], 1)
    Bh = torch.cat([B, B.new_zeros(batch, pad, groups, n)], 1).repeat_interleave(heads // groups, dim=2)
    Ch = torch.cat([C, C.new_zeros(batch, pad, groups, n)], 1).repeat_interleave(heads // groups, dim=2)
    nc = xp.shape[1] // chunk
    # (b, c, l, h, ...) blocks
    X = (xp * dp[..., None]).reshape(batch, nc, chunk, heads, head_dim)
    Bb = Bh.reshape(batch, nc, chunk, heads, n)
    Cb = Ch.reshape(batch, nc, chunk, heads, n)
    Ab = (dp * A).reshape(batch, nc, chunk, heads).permute(0, 3, 1, 2)  # (b, h, c, l)
    A_cs = torch.cumsum(Ab, -1)
    L = torch.exp(segsum_masked_cumsum(Ab))  # (b, h, c, l, s)
    Y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", Cb, Bb, L, X)
    decay_states = torch.exp(A_cs[..., -1:] - A_cs)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", Bb, decay_states, X)
    init = h0 if h0 is not None else torch.zeros(batch, heads, head_dim, n, dtype=x.dtype)
    states = torch.cat([init[:, None], states], dim=1)
    decay_chunk = torch.exp(segsum_masked_cumsum(F.pad(A_cs[..., -1], (1, 0))))  # (b, h, c+1, c+1)
    new_states = torch.einsum("bhzc,bchpn->bzhpn", decay_chunk, states)
    states, final = new_states[:, :-1], new_states[:, -1]
    Y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", Cb, states, torch.exp(A_cs))
    y = (Y_diag + Y_off).reshape(batch, nc * chunk, heads, head_dim)[:, :length]
    if D is not None:
        y = y + D[:, None] * x
    return y, final


# ----------------------------------------------------------------------------- inputs
def mamba1_inputs(batch=2, dim=3, n=4, length=9, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return dict(
        u=r(batch, dim, length),
        delta=r(batch, dim, length) * 0.5,
        A=-torch.rand(dim, n, generator=g, dtype=dtype) * 2 - 0.1,
        B=r(batch, n, length),
        C=r(batch, n, length),
        D=r(dim),
        z=r(batch, dim, length),
        delta_bias=r(dim) * 0.3,
        initial_state=r(batch, dim, n),
    )


def ssd_inputs(batch=2, length=37, heads=4, head_dim=3, groups=1, n=5, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return dict(
        x=r(batch, length, heads, head_dim),
        dt=r(batch, length, heads) * 0.5,
        A=-torch.rand(heads, generator=g, dtype=dtype) * 2 - 0.1,
        B=r(batch, length, groups, n),
        C=r(batch, length, groups, n),
        D=r(heads),
        dt_bias=r(heads) * 0.3,
        initial_state=r(batch, heads, head_dim, n),
    )


# ----------------------------------------------------------------------------- Mamba-1
@pytest.mark.parametrize("length", [1, 2, 9, 37, 64])
@pytest.mark.parametrize("full", [False, True])
def test_selective_scan_matches_recurrence(length, full):
    inp = mamba1_inputs(length=length, seed=length)
    kw = dict(D=inp["D"], z=inp["z"], delta_bias=inp["delta_bias"], initial_state=inp["initial_state"]) if full else {}
    delta = inp["delta"] if full else inp["delta"].abs()  # without softplus keep dt >= 0
    y, last = selective_scan(
        inp["u"], delta, inp["A"], inp["B"], inp["C"], delta_softplus=full, return_last_state=True, **kw
    )
    y_ref, last_ref = naive_selective_scan(
        inp["u"],
        delta,
        inp["A"],
        inp["B"],
        inp["C"],
        D=kw.get("D"),
        z=kw.get("z"),
        delta_bias=kw.get("delta_bias"),
        softplus=full,
        h0=kw.get("initial_state"),
    )
    assert y.dtype == F64 and last.shape == (2, 3, 4)
    torch.testing.assert_close(y, y_ref, atol=TOL, rtol=0)
    torch.testing.assert_close(last, last_ref, atol=TOL, rtol=0)
    y_only = selective_scan(inp["u"], delta, inp["A"], inp["B"], inp["C"], delta_softplus=full, **kw)
    torch.testing.assert_close(y_only, y, atol=0, rtol=0)


def test_selective_scan_strong_decay_does_not_overflow():
    """Sum of dt*A reaches about -1e5: a global exp(-cumsum) would overflow, products only underflow."""
    inp = mamba1_inputs(length=200, seed=3)
    A = inp["A"] * 50
    delta = inp["delta"].abs() + 5.0
    y, last = selective_scan(inp["u"], delta, A, inp["B"], inp["C"], return_last_state=True)
    y_ref, last_ref = naive_selective_scan(inp["u"], delta, A, inp["B"], inp["C"])
    torch.testing.assert_close(y, y_ref, atol=TOL, rtol=0)
    torch.testing.assert_close(last, last_ref, atol=TOL, rtol=0)
    y32 = selective_scan(inp["u"].float(), delta.float(), A.float(), inp["B"].float(), inp["C"].float())
    assert torch.isfinite(y32).all()
    torch.testing.assert_close(y32.double(), y_ref, atol=1e-4, rtol=1e-4)


def test_selective_scan_low_precision_io():
    inp = mamba1_inputs(length=16, seed=5)
    args = [inp[k].bfloat16() for k in ("u", "delta", "A", "B", "C")]
    y, last = selective_scan(*args, D=inp["D"], z=inp["z"].bfloat16(), delta_softplus=True, return_last_state=True)
    assert y.dtype == torch.bfloat16 and last.dtype == torch.float32
    z = inp["z"].bfloat16().double()
    y_ref, _ = naive_selective_scan(*(a.double() for a in args), D=inp["D"], z=z, softplus=True)
    torch.testing.assert_close(y.double(), y_ref, atol=0.05, rtol=0.02)  # bf16 output rounding


def test_selective_state_update_chained_equals_scan():
    inp = mamba1_inputs(length=11, seed=7)
    y_par, last_par = selective_scan(
        inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"], D=inp["D"], z=inp["z"],
        delta_bias=inp["delta_bias"], delta_softplus=True, initial_state=inp["initial_state"], return_last_state=True,
    )  # fmt: skip
    state, ys = inp["initial_state"], []
    state_before = state.clone()
    for t in range(11):
        y, state = selective_state_update(
            state, inp["u"][:, :, t], inp["delta"][:, :, t], inp["A"], inp["B"][:, :, t], inp["C"][:, :, t],
            D=inp["D"], z=inp["z"][:, :, t], dt_bias=inp["delta_bias"], dt_softplus=True,
        )  # fmt: skip
        ys.append(y)
    torch.testing.assert_close(inp["initial_state"], state_before, atol=0, rtol=0)  # functional
    torch.testing.assert_close(torch.stack(ys, -1), y_par, atol=TOL, rtol=0)
    torch.testing.assert_close(state, last_par, atol=TOL, rtol=0)


@pytest.mark.parametrize("two_level", [False, True])
def test_selective_scan_both_scan_paths(monkeypatch, two_level):
    """The plain loop and the two-level scan (picked by size) agree with the recurrence."""
    module = sys.modules["bmojo_neuron.ops.reference.selective_scan"]
    monkeypatch.setattr(module, "_SINGLE_THREAD_NUMEL", 1 << 30 if two_level else 0)
    for length in (1, 16, 37, 50):
        inp = mamba1_inputs(length=length, seed=20 + length)
        y, last = selective_scan(inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"], delta_softplus=True,
                                 initial_state=inp["initial_state"], return_last_state=True)  # fmt: skip
        y_ref, last_ref = naive_selective_scan(
            inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"], softplus=True, h0=inp["initial_state"]
        )
        torch.testing.assert_close(y, y_ref, atol=TOL, rtol=0)
        torch.testing.assert_close(last, last_ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("length", [5, 17])  # 5: plain loop, 17: two-level scan (5 chunks of 4)
def test_selective_scan_gradcheck(length):
    inp = mamba1_inputs(batch=1, dim=2, n=2, length=length, seed=11)
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"]
    tensors = [inp[k].clone().requires_grad_() for k in names]

    def fn(u, delta, A, B, C, D, z, delta_bias, h0):
        y, last = selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=True,
                                 initial_state=h0, return_last_state=True)  # fmt: skip
        return y, last

    assert torch.autograd.gradcheck(fn, tensors, eps=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- Mamba-2 / SSD
def ssd_path(path: str):
    """Run `ssd_scan` on the eager CPU path (`ssd_fused`) or on the traced reference ops (as an XLA graph would)."""
    return fused_kernels_disabled() if path == "reference" else contextlib.nullcontext()


@pytest.mark.parametrize(("length", "chunk"), [(37, 8), (37, 16), (32, 8), (5, 16), (1, 4)])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("path", ["fused", "reference"])
def test_ssd_matches_recurrence_and_chunked_formula(length, chunk, groups, path):
    inp = ssd_inputs(length=length, groups=groups, seed=length + chunk + groups)
    args = (inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"])
    kw = dict(D=inp["D"], dt_bias=inp["dt_bias"])
    with ssd_path(path):
        y, final = ssd_scan(*args, chunk, **kw, initial_state=inp["initial_state"], return_final_state=True)
    y_rec, final_rec = naive_ssd(*args, **kw, h0=inp["initial_state"])
    y_chk, final_chk = chunked_ssd_reference(*args, chunk, **kw, h0=inp["initial_state"])
    assert y.shape == inp["x"].shape and final.shape == (2, 4, 3, 5)
    torch.testing.assert_close(y, y_rec, atol=TOL, rtol=0)
    torch.testing.assert_close(final, final_rec, atol=TOL, rtol=0)
    torch.testing.assert_close(y, y_chk, atol=TOL, rtol=0)
    torch.testing.assert_close(final, final_chk, atol=TOL, rtol=0)


def test_ssd_without_optional_inputs_and_softplus():
    inp = ssd_inputs(length=21, groups=2, seed=4)
    dt = inp["dt"].abs()
    args = (inp["x"], dt, inp["A"], inp["B"], inp["C"])
    y = ssd_scan(*args, 8, dt_softplus=False)
    y_rec, _ = naive_ssd(*args, softplus=False)
    y_chk, _ = chunked_ssd_reference(*args, 8, softplus=False)
    torch.testing.assert_close(y, y_rec, atol=TOL, rtol=0)
    torch.testing.assert_close(y, y_chk, atol=TOL, rtol=0)


def test_ssd_low_precision_io():
    inp = ssd_inputs(length=20, seed=6)
    args = [inp[k].bfloat16() for k in ("x", "dt", "A", "B", "C")]
    y, final = ssd_scan(*args, 8, D=inp["D"], return_final_state=True)
    assert y.dtype == torch.bfloat16 and final.dtype == torch.float32
    y_ref, _ = naive_ssd(*(a.double() for a in args), D=inp["D"])
    torch.testing.assert_close(y.double(), y_ref, atol=0.05, rtol=0.02)  # bf16 output rounding


def test_ssd_state_update_chained_equals_scan():
    inp = ssd_inputs(length=13, groups=2, seed=9)
    y_par, final_par = ssd_scan(
        inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], 4, D=inp["D"], dt_bias=inp["dt_bias"],
        initial_state=inp["initial_state"], return_final_state=True,
    )  # fmt: skip
    state, ys = inp["initial_state"], []
    for t in range(13):
        y, state = ssd_state_update(
            state, inp["x"][:, t], inp["dt"][:, t], inp["A"], inp["B"][:, t], inp["C"][:, t],
            D=inp["D"], dt_bias=inp["dt_bias"],
        )  # fmt: skip
        ys.append(y)
    torch.testing.assert_close(torch.stack(ys, 1), y_par, atol=TOL, rtol=0)
    torch.testing.assert_close(state, final_par, atol=TOL, rtol=0)


def ssd_gradcheck(chunk: int, seed: int, groups: int = 1) -> bool:
    """gradcheck of `ssd_scan` (every input and the final state) on a 7-token float64 problem."""
    inp = ssd_inputs(batch=1, length=7, heads=2, head_dim=2, groups=groups, n=2, seed=seed)
    names = ["x", "dt", "A", "B", "C", "D", "dt_bias", "initial_state"]
    tensors = [inp[k].clone().requires_grad_() for k in names]

    def fn(x, dt, A, B, C, D, dt_bias, h0):
        return ssd_scan(x, dt, A, B, C, chunk, D=D, dt_bias=dt_bias, initial_state=h0, return_final_state=True)

    return torch.autograd.gradcheck(fn, tensors, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("path", ["fused", "reference"])
def test_ssd_gradcheck(path):
    with ssd_path(path):
        assert ssd_gradcheck(chunk=3, seed=12)
        assert ssd_gradcheck(chunk=4, seed=14, groups=2)


def test_fused_chunk_follows_head_and_state_size():
    """The eager CPU chunk is the power of two at or above sqrt(P * N), within 16..64, and divides the model's."""
    target = ssd_module.fused_target
    assert [target(32, 4), target(32, 16), target(64, 64), target(64, 128), target(8, 2)] == [16, 32, 64, 64, 16]
    assert target() == target(None, 16) == 64  # sizes unknown: the cap
    assert ssd_module.fused_chunk(32, 32, 4) == 16 and ssd_module.fused_chunk(256, 32, 16) == 32
    assert ssd_module.fused_chunk(128, 64, 64) == 64 and ssd_module.fused_chunk(48, 32, 4) == 12
    assert ssd_module.fused_chunk(8, 64, 64) == 8 and ssd_module.fused_chunk(40, 32, 4) == 10


def test_ssd_fused_path_in_sub_chunks_matches_reference_and_gradcheck(monkeypatch):
    """The eager CPU path runs a model chunk in shorter chunks (`fused_chunk`); outputs, final state and every
    gradient equal the reference path's, and its hand-written backward passes gradcheck."""
    monkeypatch.setattr(ssd_module, "FUSED_CHUNK", 4)
    assert ssd_module.fused_chunk(16) == 4 and ssd_module.fused_chunk(6) == 3 and ssd_module.fused_chunk(5) == 5
    assert ssd_module.fused_chunk(16, head_dim=8, state_size=4) == 4  # the cap wins over the size rule
    inp = ssd_inputs(length=48, groups=2, seed=31)  # whole chunks: no padding copies the strided B and C
    names = ["x", "dt", "A", "bc", "D", "dt_bias", "initial_state"]
    inp["bc"] = torch.stack([inp["B"], inp["C"]], dim=-2)  # (batch, L, groups, 2, N), as the mixer projects them
    weights = torch.Generator()

    def run(path):
        t = {k: inp[k].clone().requires_grad_() for k in names}
        B, C = t["bc"].unbind(-2)  # strided slices, as the mixer passes them
        assert not B.is_contiguous()
        with ssd_path(path):
            y, final = ssd_scan(t["x"], t["dt"], t["A"], B, C, 16, D=t["D"], dt_bias=t["dt_bias"],
                                initial_state=t["initial_state"], return_final_state=True)
        gy = torch.randn(y.shape, generator=weights.manual_seed(3), dtype=F64)
        gh = torch.randn(final.shape, generator=weights, dtype=F64)
        ((y * gy).sum() + (final * gh).sum()).backward()
        return [y, final] + [t[k].grad for k in names]

    for fused, ref in zip(run("fused"), run("reference")):
        torch.testing.assert_close(fused, ref, atol=TOL, rtol=0)
    assert ssd_gradcheck(chunk=8, seed=15)  # runs in chunks of 4


@pytest.mark.parametrize("per_slice", [1, 2, 3])
@pytest.mark.parametrize("path", ["fused", "reference"])
def test_ssd_in_slices_of_chunks_matches_recurrence_and_gradcheck(monkeypatch, per_slice, path):
    """Chunks taken a few at a time (the carried state links the slices): same outputs, state and gradients."""
    monkeypatch.setattr(ssd_module, "chunks_per_slice", lambda *shape: per_slice)
    monkeypatch.setattr(ssd_module, "cpu_cache_slicing", lambda x: True)  # the traced path slices too, here
    inp = ssd_inputs(length=37, groups=2, seed=20 + per_slice)  # 5 chunks of 8, the last padded
    args = (inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"])
    kw = dict(D=inp["D"], dt_bias=inp["dt_bias"])
    with ssd_path(path):
        y, final = ssd_scan(*args, 8, **kw, initial_state=inp["initial_state"], return_final_state=True)
        assert ssd_gradcheck(chunk=2, seed=13)  # 4 chunks, so 2-4 slices
    y_rec, final_rec = naive_ssd(*args, **kw, h0=inp["initial_state"])
    torch.testing.assert_close(y, y_rec, atol=TOL, rtol=0)
    torch.testing.assert_close(final, final_rec, atol=TOL, rtol=0)


def test_ssd_slices_only_on_a_cpu_outside_traced_device_code(monkeypatch):
    """Slicing is a CPU cache measure: the code an XLA device traces (`fused_kernels_disabled`, as the Neuron
    backend's CPU stand-in and `plan --check-graph` run it) takes every chunk in one slice, so its graph holds
    one copy of the chunk code, not one per slice; CPU code on the plain path (as `torch.compile` traces it)
    still slices."""
    calls = []
    scan_slice = ssd_module._scan_slice
    monkeypatch.setattr(ssd_module, "_scan_slice", lambda *a: calls.append(a[0].shape[1]) or scan_slice(*a))
    monkeypatch.setattr(ssd_module, "chunks_per_slice", lambda *shape: 1)
    inp = ssd_inputs(length=32, groups=2, seed=5)  # 4 chunks of 8
    args = [inp[k] for k in ("x", "dt", "A", "B", "C")]
    with fused_kernels_disabled():
        traced = ssd_scan(*args, 8, D=inp["D"])
    assert calls == [4]
    calls.clear()
    monkeypatch.setattr(ssd_module, "fused_kernel_available", lambda *tensors: False)  # the plain path on CPU
    sliced = ssd_scan(*args, 8, D=inp["D"])
    assert calls == [1, 1, 1, 1]
    torch.testing.assert_close(sliced, traced, atol=TOL, rtol=0)


def test_ssd_slices_keep_chunk_by_chunk_tensors_within_budget():
    """The slice size follows the (chunk x chunk x heads) tensor size, at least one chunk."""
    per_chunk = 4 * 128 * 128 * 8 * 4  # batch 4, chunk 128, 8 heads, fp32
    assert ssd_module.chunks_per_slice(4, 128, 8, 4) == max(1, ssd_module.SLICE_BYTES // per_chunk)
    assert ssd_module.chunks_per_slice(64, 256, 64, 8) == 1
