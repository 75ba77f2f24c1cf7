"""Mamba-1 / Mamba-2 mixers: naive per-step re-implementations, decode-vs-parallel, init, norms."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bmojo_neuron import ops
from bmojo_neuron.configuration_bmojo import BMojoConfig
from bmojo_neuron.layers.factory import LayerFactory, use_layer_factory
from bmojo_neuron.layers.mamba1 import Mamba1Mixer
from bmojo_neuron.layers.mamba2 import Mamba2Mixer
from bmojo_neuron.layers.norms import GatedRMSNorm, RMSNorm
from bmojo_neuron.layers.ssm_state import SSMState

DECODE_TOL = 1e-4  # float32 decode vs parallel
MATH_TOL = 1e-10  # float64 mixer vs naive


def make_config(mixer: str, **kw) -> BMojoConfig:
    base = dict(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, layer_pattern="M", ssm_mixer=mixer,
        ssm_state_size=8, ssm_head_dim=8, ssm_chunk_size=8, num_attention_heads=4,
        ssm_dt_min=0.01, ssm_dt_max=0.5,  # larger steps than the default so the recurrence matters
    )  # fmt: skip
    base.update(kw)
    return BMojoConfig(**base)


MIXERS = {
    "mamba1": lambda: Mamba1Mixer(make_config("mamba1"), layer_idx=0),
    "mamba2": lambda: Mamba2Mixer(make_config("mamba2"), layer_idx=0),
    "mamba2-g2": lambda: Mamba2Mixer(make_config("mamba2", ssm_n_groups=2), layer_idx=0),
}


def build(name: str, seed: int = 0, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    mixer = MIXERS[name]().to(dtype)
    with torch.no_grad():  # non-trivial D and norm weight, biases
        mixer.D.add_(torch.randn_like(mixer.D) * 0.5)
        if hasattr(mixer, "norm"):
            mixer.norm.weight.add_(torch.randn_like(mixer.norm.weight) * 0.2)
    return mixer.eval()


def inputs(batch: int, length: int, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(batch, length, 32, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ----------------------------------------------------------------------------- naive mixers (float64)
def naive_conv(x, weight, bias):
    """x (b, L, c): out_t = sum_k w[k] x_{t-K+1+k} (zeros before the start) + bias."""
    K = weight.shape[-1]
    w = weight[:, 0, :]
    out = torch.zeros_like(x)
    for t in range(x.shape[1]):
        for k in range(K):
            s = t - (K - 1) + k
            if s >= 0:
                out[:, t] += w[:, k] * x[:, s]
    return out + (bias if bias is not None else 0)


def naive_mamba1(m: Mamba1Mixer, h: torch.Tensor) -> torch.Tensor:
    x = F.silu(naive_conv(m.in_proj_x(h), m.conv_x.weight, m.conv_x.bias))
    z = m.in_proj_z(h)
    dbl = x @ m.x_proj.weight.T
    R, N = m.dt_rank, m.state_size
    dt = F.softplus(dbl[..., :R] @ m.dt_proj.weight.T + m.dt_bias)
    Bm, Cm = dbl[..., R : R + N], dbl[..., R + N :]
    A = -torch.exp(m.A_log)
    state = torch.zeros(h.shape[0], m.d_inner, N, dtype=h.dtype)
    ys = []
    for t in range(h.shape[1]):
        state = torch.exp(dt[:, t, :, None] * A) * state + (dt[:, t] * x[:, t])[..., None] * Bm[:, t, None, :]
        y = (state * Cm[:, t, None, :]).sum(-1) + m.D * x[:, t]
        ys.append(y * z[:, t] * torch.sigmoid(z[:, t]))
    return m.out_proj(torch.stack(ys, 1))


def naive_mamba2(m: Mamba2Mixer, h: torch.Tensor) -> torch.Tensor:
    cfg = m.config
    H, P, G, N = cfg.ssm_num_heads, cfg.ssm_head_dim, cfg.ssm_n_groups, cfg.ssm_state_size
    x = F.silu(naive_conv(m.in_proj_x(h), m.conv_x.weight, m.conv_x.bias))
    bc = F.silu(naive_conv(m.in_proj_bc(h), m.conv_bc.weight, m.conv_bc.bias))
    z = m.in_proj_z(h)
    dt = F.softplus(m.in_proj_dt(h) + m.dt_bias)
    A = -torch.exp(m.A_log)
    b, L = h.shape[:2]
    state = torch.zeros(b, H, P, N, dtype=h.dtype)
    y = torch.zeros(b, L, H, P, dtype=h.dtype)
    for t in range(L):
        for hd in range(H):
            g = hd // (H // G)
            Bv = bc[:, t, g * 2 * N : g * 2 * N + N]  # group-major [B_g, C_g]
            Cv = bc[:, t, g * 2 * N + N : (g + 1) * 2 * N]
            xv = x[:, t, hd * P : (hd + 1) * P]
            state[:, hd] = torch.exp(dt[:, t, hd] * A[hd])[:, None, None] * state[:, hd] + (
                dt[:, t, hd, None, None] * xv[:, :, None] * Bv[:, None, :]
            )
            y[:, t, hd] = (state[:, hd] * Cv[:, None, :]).sum(-1) + m.D[hd] * xv
    gated = y.reshape(b, L, H * P) * F.silu(z)
    size = m.d_inner // G
    parts = [gated[..., i * size : (i + 1) * size] for i in range(G)]
    normed = torch.cat([p / torch.sqrt(p.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps) for p in parts], dim=-1)
    return m.out_proj(normed * m.norm.weight)


@pytest.mark.parametrize("name", list(MIXERS))
def test_mixer_matches_naive_float64(name):
    m = build(name, dtype=torch.float64)
    h = inputs(2, 13, dtype=torch.float64)
    with torch.no_grad():
        out = m(h)
        ref = naive_mamba1(m, h) if name == "mamba1" else naive_mamba2(m, h)
    assert out.shape == h.shape
    torch.testing.assert_close(out, ref, atol=MATH_TOL, rtol=0)


# ----------------------------------------------------------------------------- decoding
def decode(m, h, prefill: int) -> tuple[torch.Tensor, SSMState]:
    """Prefill `prefill` tokens in parallel (0: none), then one token at a time."""
    state = m.init_state(h.shape[0], device=h.device, dtype=h.dtype)
    outs = []
    if prefill:
        outs.append(m(h[:, :prefill], state))
        assert state.seen_tokens == prefill
    for t in range(prefill, h.shape[1]):
        outs.append(m(h[:, t : t + 1], state))
        assert state.seen_tokens == t + 1
    return torch.cat(outs, 1), state


@pytest.mark.parametrize("name", list(MIXERS))
@pytest.mark.parametrize(("length", "prefill"), [(2, 0), (3, 0), (11, 0), (11, 2), (11, 3), (13, 9)])
def test_decode_matches_parallel(name, length, prefill):
    """Prompts shorter and longer than conv_kernel (4), token-by-token or prefill + steps."""
    m = build(name)
    h = inputs(2, length, seed=length + prefill)
    with torch.no_grad():
        ref = m(h)
        out, _ = decode(m, h, prefill)
    assert (out - ref).abs().max().item() <= DECODE_TOL


@pytest.mark.parametrize("name", list(MIXERS))
def test_multi_token_continuation_matches_parallel(name):
    """A state that has seen tokens, fed several at once (chunked prefill), then single steps."""
    m = build(name)
    h = inputs(2, 20, seed=5)
    state = m.init_state(2, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        ref = m(h)
        out = torch.cat([m(h[:, :2], state), m(h[:, 2:13], state), m(h[:, 13:14], state), m(h[:, 14:], state)], 1)
    assert state.seen_tokens == 20
    assert (out - ref).abs().max().item() <= DECODE_TOL


@pytest.mark.parametrize("name", ["mamba1", "mamba2"])
def test_state_contents_for_short_prompt(name):
    """Conv state = last K-1 conv inputs, zero-padded on the left for prompts shorter than K-1."""
    m = build(name)
    h = inputs(3, 2, seed=8)
    state = m.init_state(3, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        m(h, state)
        x_in = m.in_proj_x(h).transpose(1, 2)
    conv = state.conv_states["x" if name == "mamba1" else "xbc"][:, : m.conv_x.in_channels]  # mamba2: x, then B/C
    assert conv.shape == (3, m.conv_x.in_channels, m.conv_kernel - 1)
    assert torch.equal(conv[..., 0], torch.zeros_like(conv[..., 0]))
    torch.testing.assert_close(conv[..., 1:], x_in, atol=1e-6, rtol=0)
    assert state.ssm_state.dtype == torch.float32 and state.seen_tokens == 2


@pytest.mark.parametrize("name", ["mamba1", "mamba2"])
def test_reorder_for_beam_search(name):
    m = build(name)
    h = inputs(3, 9, seed=9)
    index = torch.tensor([2, 0, 0])
    with torch.no_grad():
        ref = m(h[index])
        state = m.init_state(3, device="cpu", dtype=torch.float32)
        first = m(h[:, :6], state)
        assert state.reorder(index) is state
        rest = torch.cat([m(h[index, t : t + 1], state) for t in range(6, 9)], 1)
    assert (torch.cat([first[index], rest], 1) - ref).abs().max().item() <= DECODE_TOL


# ----------------------------------------------------------------------------- parameters
@pytest.mark.parametrize("name", ["mamba1", "mamba2"])
def test_reset_ssm_parameters(name):
    m = MIXERS[name]()
    cfg = m.config
    with torch.no_grad():
        for p in (m.dt_bias, m.A_log, m.D):
            p.zero_()
        m.reset_ssm_parameters()
        m.reset_ssm_parameters()  # idempotent, works under no_grad
    dt = F.softplus(m.dt_bias.detach())
    assert dt.min().item() >= cfg.ssm_dt_min * (1 - 1e-6) and dt.max().item() <= cfg.ssm_dt_max * (1 + 1e-6)
    assert dt.std().item() > 0  # sampled, not constant
    assert torch.equal(m.D.detach(), torch.ones_like(m.D))
    if name == "mamba1":
        expected = torch.log(torch.arange(1, cfg.ssm_state_size + 1, dtype=torch.float64)).float().expand(m.d_inner, -1)
        torch.testing.assert_close(m.A_log.detach(), expected, atol=0, rtol=0)  # S4D-real, exactly
        bound = cfg.ssm_dt_rank**-0.5
        assert m.dt_proj.weight.abs().max().item() <= bound
    else:
        A = -torch.exp(m.A_log.detach())
        low, high = cfg.ssm_A_init_range
        assert A.shape == (cfg.ssm_num_heads,)
        assert ((-A >= low * (1 - 1e-6)) & (-A <= high * (1 + 1e-6))).all()
    for p in (m.dt_bias, m.A_log, m.D):
        assert p.requires_grad and getattr(p, "_no_weight_decay", False)
    names = {n for n, _ in m.named_parameters()}
    assert {"A_log", "D", "dt_bias"} <= names


def test_dt_floor_applies():
    m = Mamba2Mixer(make_config("mamba2", ssm_dt_min=1e-6, ssm_dt_max=1e-5, ssm_dt_init_floor=1e-3), 0)
    dt = F.softplus(m.dt_bias.detach().double())
    torch.testing.assert_close(dt, torch.full((8,), 1e-3, dtype=torch.float64), atol=1e-9, rtol=1e-5)


@pytest.mark.parametrize("name", ["mamba1", "mamba2"])
def test_scan_receives_A_from_A_log(name, monkeypatch):
    """The op gets A = -exp(A_log), dt_bias as the dt bias with softplus, and D."""
    m = build(name)
    seen = {}
    op_name = "selective_scan" if name == "mamba1" else "ssd_scan"
    real = getattr(ops, op_name)

    def spy(*args, **kwargs):
        seen["A"], seen["kw"] = args[2], kwargs
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, op_name, spy)
    with torch.no_grad():
        m(inputs(1, 5))
    torch.testing.assert_close(seen["A"], -torch.exp(m.A_log.detach()), atol=0, rtol=0)
    kw = seen["kw"]
    bias = kw["delta_bias"] if name == "mamba1" else kw["dt_bias"]
    assert bias is m.dt_bias and kw["D"] is m.D
    assert kw["delta_softplus" if name == "mamba1" else "dt_softplus"] is True


@pytest.mark.parametrize("name", ["mamba1", "mamba2"])
def test_linears_come_from_factory_and_gradients_flow(name):
    calls = []

    class Recording(LayerFactory):
        def column_linear(self, i, o, bias=False, sequence_parallel=True):
            calls.append(("column", i, o))
            return super().column_linear(i, o, bias, sequence_parallel)

        def row_linear(self, i, o, bias=False, sequence_parallel=True):
            calls.append(("row", i, o))
            return super().row_linear(i, o, bias, sequence_parallel)

        def replicated_linear(self, i, o, bias=False):
            calls.append(("replicated", i, o))
            return super().replicated_linear(i, o, bias)

    with use_layer_factory(Recording()):
        m = MIXERS[name]()
    n_linear = sum(isinstance(mod, nn.Linear) for mod in m.modules())
    assert len(calls) == n_linear == 5  # four input-side projections + out_proj
    assert ("row", m.d_inner, 32) in calls  # out_proj
    m(inputs(2, 10)).square().mean().backward()
    for pname in ("A_log", "D", "dt_bias"):
        grad = getattr(m, pname).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


# ----------------------------------------------------------------------------- norms
def test_rms_norm():
    norm = RMSNorm(6, eps=1e-5).double()
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 7.0))
    x = torch.randn(3, 4, 6, dtype=torch.float64)
    ref = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-5) * torch.arange(1.0, 7.0, dtype=torch.float64)
    torch.testing.assert_close(norm(x), ref, atol=MATH_TOL, rtol=0)
    assert norm(x.bfloat16()).dtype == torch.bfloat16


def test_gated_rms_norm_groups():
    """Each group is normalised alone: same as separate norms on the halves (tensor-parallel invariance)."""
    full = GatedRMSNorm(8, group_size=4, eps=1e-6).double()
    with torch.no_grad():
        full.weight.copy_(torch.randn(8))
    x, z = torch.randn(2, 3, 8, dtype=torch.float64), torch.randn(2, 3, 8, dtype=torch.float64)
    g = x * z * torch.sigmoid(z)
    halves = [g[..., :4], g[..., 4:]]
    ref = torch.cat([h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) for h in halves], -1) * full.weight
    torch.testing.assert_close(full(x, z), ref, atol=MATH_TOL, rtol=0)
    ungated = GatedRMSNorm(8, eps=1e-6).double()
    ref_ungated = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(ungated(x), ref_ungated, atol=MATH_TOL, rtol=0)
    with pytest.raises(ValueError, match="group_size"):
        GatedRMSNorm(8, group_size=3)
    assert math.isclose(full.eps, 1e-6)


@pytest.mark.parametrize("path", ["rows", "conv1d"])
@pytest.mark.parametrize(("length", "with_prefix", "with_bias"), [(9, True, True), (2, False, True), (7, False, False)])
def test_causal_conv_on_rows_matches_conv1d(path, length, with_prefix, with_bias):
    """`causal_conv1d_rows` (time-major, K shifted multiply-adds on eager CPU; `conv1d` between transposes
    while tracing) equals `causal_conv1d` in outputs, returned state and every gradient (float64)."""
    from bmojo_neuron.ops.reference.eager_cpu import fused_kernels_disabled
    from bmojo_neuron.layers.ssm_state import causal_conv1d, causal_conv1d_rows

    g = torch.Generator().manual_seed(length)
    x = torch.randn(2, length, 5, generator=g, dtype=torch.float64)
    weight = torch.randn(5, 1, 4, generator=g, dtype=torch.float64)
    bias = torch.randn(5, generator=g, dtype=torch.float64) if with_bias else None
    prefix = torch.randn(2, 5, 3, generator=g, dtype=torch.float64) if with_prefix else None
    grad_out = torch.randn(2, length, 5, generator=g, dtype=torch.float64)
    grad_tail = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    leaves = [t for t in (x, weight, bias, prefix) if t is not None]

    def run(rows: bool):
        ins = [t.clone().requires_grad_() for t in leaves]
        xi, wi = ins[0], ins[1]
        bi = ins[2] if with_bias else None
        pi = ins[-1] if with_prefix else None
        if rows:
            with fused_kernels_disabled() if path == "conv1d" else contextlib.nullcontext():
                out, tail = causal_conv1d_rows(xi, wi, bi, pi)
        else:
            out, tail = causal_conv1d(xi.transpose(1, 2), wi, bi, pi)
            out = out.transpose(1, 2)
        ((out * grad_out).sum() + (tail * grad_tail).sum()).backward()
        return [out, tail] + [t.grad for t in ins]

    for got, want in zip(run(True), run(False)):
        torch.testing.assert_close(got, want, atol=MATH_TOL, rtol=0)
    if path == "rows":
        inputs_ = [t.clone().requires_grad_() for t in leaves]

        def fn(*ts):
            xi, wi = ts[0], ts[1]
            return causal_conv1d_rows(xi, wi, ts[2] if with_bias else None, ts[-1] if with_prefix else None)

        assert torch.autograd.gradcheck(fn, inputs_, eps=1e-6, atol=1e-7)
