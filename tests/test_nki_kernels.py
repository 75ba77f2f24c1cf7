"""The selective-scan NKI kernels, run through the emulator (`nki-sim`), against the reference ops.

fp32: outputs and every gradient within 1e-4 relative (to the tensor's max magnitude).
bf16: inputs and outputs bf16, math fp32 in both paths; the only differences are the
final bf16 rounding of the output (relative 2^-8 = 3.9e-3) and fp32 summation order, so
we allow 1e-2 relative to the tensor's max.
Shapes have a channel tail (160 = 128 + 32 channels) and several time tiles.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nki_checks import assert_model_matches_on_nki_sim, rel_err

from bmojo_neuron.ops.reference.selective_scan import selective_scan as scan_ref
from bmojo_neuron.ops.reference.ssd import ssd_scan as ssd_ref
from nki_kernels.emulator import nki
from nki_kernels.emulator.core import bound_of
from nki_kernels.selective_scan_bwd import selective_scan_bwd
from nki_kernels.selective_scan_fwd import selective_scan_fwd
from nki_kernels.ssd_fwd import ssd_fwd
from nki_kernels.tutorial_mamba_v3 import tutorial_mamba_v3
from bmojo_neuron.ops.nki_backend import emulator_ops

SIM = emulator_ops()


def scan_inputs(batch=1, dim=160, length=640, n=3, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    tensors = dict(u=r(batch, dim, length), delta=r(batch, dim, length) * 0.5, A=-torch.rand(dim, n, generator=g) - 0.3,
                   B=r(batch, n, length), C=r(batch, n, length), D=r(dim), z=r(batch, dim, length),
                   delta_bias=r(dim) * 0.1)
    out = {}
    for k, v in tensors.items():
        v = v if k in ("A",) else v.to(dtype)
        out[k] = v.requires_grad_()
    return out


def ssd_inputs(batch=2, length=256, heads=4, head_dim=16, groups=2, n=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    t = dict(x=r(batch, length, heads, head_dim), dt=r(batch, length, heads), A=-torch.rand(heads, generator=g) - 0.3,
             B=r(batch, length, groups, n), C=r(batch, length, groups, n), D=r(heads), dt_bias=r(heads) * 0.1)
    return {k: (v if k == "A" else v.to(dtype)).requires_grad_() for k, v in t.items()}


def _grads(fn, inputs, **kw):
    y = fn(**inputs, **kw)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
    for v in inputs.values():
        v.grad = None
    y.backward(dy)
    return y.detach(), {k: v.grad.clone() for k, v in inputs.items()}


def test_selective_scan_forward_and_all_gradients_fp32():
    inputs = scan_inputs()
    y_ref, g_ref = _grads(scan_ref, inputs, delta_softplus=True)
    y, g = _grads(SIM["selective_scan"], inputs, delta_softplus=True)
    assert rel_err(y, y_ref) <= 1e-4
    for name in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias"):
        assert rel_err(g[name], g_ref[name]) <= 1e-4, name


def test_selective_scan_without_optional_inputs_and_no_softplus():
    inputs = scan_inputs(batch=2, dim=96, length=256, n=2, seed=3)
    for k in ("D", "z", "delta_bias"):
        inputs.pop(k)
    y_ref, g_ref = _grads(scan_ref, inputs)
    y, g = _grads(SIM["selective_scan"], inputs)
    assert rel_err(y, y_ref) <= 1e-4
    for name in g:
        assert rel_err(g[name], g_ref[name]) <= 1e-4, name


def test_selective_scan_backward_from_saved_equals_recompute():
    """selective_scan_bwd with the forward's saved tile states and pre-gate y equals the kernel that
    recomputes them (the bridge uses the saved ones); three time tiles, two channel tiles."""
    rng = np.random.default_rng(2)
    b, d, length, n = 1, 136, 1152, 3
    u, dy, z = (rng.standard_normal((b, d, length)).astype(np.float32) for _ in range(3))
    delta = (0.5 * rng.standard_normal((b, d, length))).astype(np.float32)
    A = -rng.uniform(0.3, 1.3, (d, n)).astype(np.float32)
    B, C = (rng.standard_normal((b, n, length)).astype(np.float32) for _ in range(2))
    D, bias = rng.standard_normal(d).astype(np.float32), (0.1 * rng.standard_normal(d)).astype(np.float32)
    _, _, snaps, y_pre = nki.simulate_kernel(selective_scan_fwd, u, delta, A, B, C, D, z, bias, True, None, True)
    recomputed = nki.simulate_kernel(selective_scan_bwd, dy, u, delta, A, B, C, D, z, bias, True)
    from_saved = nki.simulate_kernel(selective_scan_bwd, dy, u, delta, A, B, C, D, z, bias, True, snaps, y_pre)
    for a, b_ in zip(recomputed, from_saved):
        np.testing.assert_allclose(b_, a, rtol=1e-6, atol=1e-6 * np.abs(a).max())


def test_selective_scan_bf16():
    inputs = scan_inputs(dim=136, length=256, n=2, dtype=torch.bfloat16, seed=5)
    y_ref, g_ref = _grads(scan_ref, inputs, delta_softplus=True)
    y, g = _grads(SIM["selective_scan"], inputs, delta_softplus=True)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, y_ref) <= 1e-2
    for name in ("u", "delta", "B", "C", "z"):
        assert g[name].dtype == torch.bfloat16
        assert rel_err(g[name], g_ref[name]) <= 1e-2, name


def test_selective_scan_state_and_padding_forward():
    inputs = {k: v.detach() for k, v in scan_inputs(batch=1, dim=40, length=256, n=2, seed=7).items()}
    h0 = torch.randn(1, 40, 2)
    y_ref, last_ref = scan_ref(**inputs, delta_softplus=True, initial_state=h0, return_last_state=True)
    y, last = SIM["selective_scan"](**inputs, delta_softplus=True, initial_state=h0, return_last_state=True)
    assert rel_err(y, y_ref) <= 1e-4 and rel_err(last, last_ref) <= 1e-4
    short = {k: (v[..., :200] if v.dim() == 3 else v) for k, v in inputs.items()}  # L not a multiple of 128
    assert rel_err(SIM["selective_scan"](**short), scan_ref(**short)) <= 1e-4


def test_ssd_forward_and_gradients_fp32():
    inputs = ssd_inputs()
    y_ref, g_ref = _grads(ssd_ref, inputs, chunk_size=128)
    y, g = _grads(SIM["ssd_scan"], inputs, chunk_size=128)
    assert rel_err(y, y_ref) <= 1e-4
    for name in g:
        assert rel_err(g[name], g_ref[name]) <= 1e-4, name


def test_ssd_forward_bf16_and_final_state_kernel():
    inputs = {k: v.detach() for k, v in ssd_inputs(batch=1, length=256, heads=2, dtype=torch.bfloat16, seed=2).items()}
    y_ref = ssd_ref(**inputs, chunk_size=128)
    y = SIM["ssd_scan"](**inputs, chunk_size=128)
    assert y.dtype == torch.bfloat16 and rel_err(y, y_ref) <= 1e-2
    f32 = {k: v.float().numpy() for k, v in inputs.items()}
    (_, final), _ = nki.simulate(ssd_fwd, f32["x"], f32["dt"], f32["A"], f32["B"], f32["C"], f32["D"], f32["dt_bias"], True)
    _, final_ref = ssd_ref(**{k: v.float() for k, v in inputs.items()}, chunk_size=128, return_final_state=True)
    assert rel_err(torch.from_numpy(final), final_ref) <= 1e-4


def test_tutorial_kernel_numerics():
    """The calibration kernel (the tutorial's mamba_v3 instruction mix) computes the selective scan."""
    rng = np.random.default_rng(0)
    b, d, length, n = 1, 128, 1024, 4
    delta = rng.uniform(0.01, 0.2, (b, d, length)).astype(np.float32)
    u = rng.standard_normal((b, d, length)).astype(np.float32)
    A = -rng.uniform(0.5, 2.0, (d, n)).astype(np.float32)
    B, C = (rng.standard_normal((b, n, length)).astype(np.float32) for _ in range(2))
    y = nki.simulate_kernel(tutorial_mamba_v3, delta, u, A, B, C)
    h, ref = np.zeros((b, d, n)), np.zeros((b, d, length))
    for t in range(length):
        h = np.exp(delta[:, :, t, None] * A[None]) * h + (delta[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
        ref[:, :, t] = (h * C[:, None, :, t]).sum(-1)
    assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()


def _figures(profile) -> dict[str, float]:
    """The figures the calibration asserts on, each a sum over the kernel's instructions or the timeline's
    makespan: seconds per engine and of HBM traffic (the perfect-overlap time is their max), seconds busy per
    timeline resource (what bounds the kernel) and the makespan."""
    return {"time": profile.time_s, "hbm": profile.hbm_seconds,
            **{f"engine {e}": s for e, s in profile.engine_seconds().items()},
            **{f"busy {r}": s for r, s in profile.busy_s.items()}}


def _at_full_size(run, sizes, full) -> dict[str, float]:
    """`_figures(run(full))` from cost-only runs at evenly spaced smaller sizes of the kernel's outermost loop.

    Each step of that loop (a channel tile of the scans, a chunk of SSD) repeats the same instructions, and
    once the schedule is periodic every figure grows by the same amount per step, the makespan included.
    With three sizes the test checks that growth is constant; run at the full calibration shape, the
    extrapolation equals the figures of the full run to 1e-12 relative (docs/kernels.md, "Calibration")."""
    runs = [_figures(run(size)) for size in sizes]
    step = sizes[1] - sizes[0]
    assert all(b - a == step for a, b in zip(sizes, sizes[1:])) and (full - sizes[-1]) % step == 0
    steps = (full - sizes[-1]) // step
    out = {}
    for key, last in runs[-1].items():
        growth = [b[key] - a[key] for a, b in zip(runs, runs[1:])]
        assert all(abs(g - growth[0]) <= 1e-9 * abs(last) for g in growth), (key, sizes, growth)
        out[key] = last + steps * growth[-1]
    return out


def _overlapped(figures: dict[str, float]) -> float:
    """`Profile.time_overlapped_s`: the busiest engine (or HBM) alone."""
    return max(v for k, v in figures.items() if k == "hbm" or k.startswith("engine "))


def test_calibration_mamba1_forward_and_ssd_speedup():
    """The timeline, with its one fitted constant (two-input Vector cycles per element), reproduces the
    tutorial's measured 27.8 ms for its own mamba_v3 instruction mix (batch 1, 4096 channels, L 8192,
    16 states) within 3 %, and 1.6 ms at L 512 (not fitted) within 15 %; our Mamba-1 forward is faster than
    the tutorial's; SSD >= 4x faster than Mamba-1 with perfect overlap (docs/kernels.md, Calibration).
    The figures at 4096 channels (64 chunks for SSD) come from runs of 1-2 channel tiles (chunks),
    extrapolated along the loop that repeats (`_at_full_size`), so a change of the cost model moves them."""
    zeros = lambda *s: np.broadcast_to(np.float32(0), s)  # noqa: E731
    b, d, length, n = 1, 4096, 8192, 16

    def tutorial_at(seq):
        return lambda c: nki.simulate(tutorial_mamba_v3, zeros(b, c, seq), zeros(b, c, seq), zeros(c, n),
                                      zeros(b, n, seq), zeros(b, n, seq), cost_only=True)[1]

    def mamba1_at(seq):
        return lambda c: nki.simulate(selective_scan_fwd, zeros(b, c, seq), zeros(b, c, seq), zeros(c, n),
                                      zeros(b, n, seq), zeros(b, n, seq), None, None, None, False, cost_only=True)[1]

    # The L 8192 runs take two sizes; three at L 512 (a few ms each) check both scans' growth per tile is constant.
    for seq, measured, tolerance, sizes in ((length, 27.8e-3, 0.03, (128, 256)), (512, 1.6e-3, 0.15, (128, 256, 384))):
        tutorial_time = _at_full_size(tutorial_at(seq), sizes, d)["time"]
        assert abs(tutorial_time / measured - 1) <= tolerance, (seq, tutorial_time)
    _at_full_size(mamba1_at(512), (128, 256, 384), d)
    mamba1 = _at_full_size(mamba1_at(length), (128, 256), d)
    heads, head_dim = 64, 64
    ssd = _at_full_size(lambda seq: nki.simulate(
        ssd_fwd, zeros(b, seq, heads, head_dim), zeros(b, seq, heads), zeros(heads), zeros(b, seq, 1, n),
        zeros(b, seq, 1, n), None, None, True, cost_only=True)[1], (128, 256), length)
    assert bound_of({k[5:]: v for k, v in mamba1.items() if k.startswith("busy ")}) == "vector"
    assert _overlapped(mamba1) <= mamba1["time"] < 27.8e-3
    assert _overlapped(mamba1) >= 4 * _overlapped(ssd)


def test_model_forward_backward_nki_sim_equals_torch():
    from bmojo_neuron import BMojoConfig, BMojoForCausalLM

    for mixer in ("mamba2", "mamba1"):
        torch.manual_seed(0)
        config = BMojoConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, layer_pattern="BM",
                             num_attention_heads=2, intermediate_size=32, ssm_mixer=mixer, ssm_state_size=4,
                             ssm_head_dim=16, window_size=16, fading_window=16, memory_chunk=16, memory_picks=2,
                             memory_size=4)
        model = BMojoForCausalLM(config)
        ids = torch.randint(0, 64, (1, 128), generator=torch.Generator().manual_seed(1))
        assert_model_matches_on_nki_sim(model, ids, ("eidetic_attention",), label=mixer)


# ----------------------------------------------------------------------------- SSD backward kernel
# Norm: rel_err = max |kernel - reference| / max |reference| over the whole tensor, per gradient.
# fp32: <= 1e-4 (observed ~1e-6..3e-5; the largest are dA / dt_bias, sums over batch and time with
# cancellation, where the fp32 reference itself is that far from an fp64 run).
# bf16: inputs, dy and gradients bf16; both paths compute in fp32 from the same bf16 values, so the
# difference is the final bf16 rounding of each gradient (each side within 2^-9 of the fp32 value,
# so at most 2^-8 = 3.9e-3 of the max apart) plus fp32 summation order: 1e-2.
SSD_GRADS = ("x", "dt", "A", "B", "C", "D", "dt_bias")


def _ssd_grads_both(inputs, **kw):
    _, g_ref = _grads(ssd_ref, inputs, chunk_size=128, **kw)
    _, g = _grads(SIM["ssd_scan"], inputs, chunk_size=128, **kw)
    return g, g_ref


@pytest.mark.parametrize("groups,length", [(2, 384), (1, 300)])  # 3 chunks; 300 exercises the bridge's padding
def test_ssd_backward_kernel_all_gradients_fp32(groups, length):
    inputs = ssd_inputs(batch=2, length=length, heads=4, head_dim=16, groups=groups, n=8, seed=11 + groups)
    g, g_ref = _ssd_grads_both(inputs)
    for name in SSD_GRADS:
        assert g[name].shape == g_ref[name].shape and g[name].dtype == g_ref[name].dtype, name
        assert rel_err(g[name], g_ref[name]) <= 1e-4, (name, rel_err(g[name], g_ref[name]))


def test_ssd_backward_kernel_without_optional_inputs_no_softplus():
    inputs = ssd_inputs(batch=1, length=256, heads=2, head_dim=8, groups=1, n=4, seed=4)
    for k in ("D", "dt_bias"):
        inputs.pop(k)
    with torch.no_grad():
        inputs["dt"].abs_().add_(0.05)  # positive steps without the softplus
    g, g_ref = _ssd_grads_both(inputs, dt_softplus=False)
    for name in ("x", "dt", "A", "B", "C"):
        assert rel_err(g[name], g_ref[name]) <= 1e-4, name


def test_ssd_backward_kernel_bf16():
    inputs = ssd_inputs(batch=2, length=256, heads=4, head_dim=16, groups=2, n=8, dtype=torch.bfloat16, seed=9)
    g, g_ref = _ssd_grads_both(inputs)
    for name in SSD_GRADS:
        assert g[name].dtype == g_ref[name].dtype, name
        assert rel_err(g[name], g_ref[name]) <= 1e-2, (name, rel_err(g[name], g_ref[name]))


def test_ssd_backward_calls_the_kernel_not_the_reference(monkeypatch):
    import bmojo_neuron.ops.reference.ssd as ref_mod
    import nki_kernels.ssd_bwd as bwd_mod

    inputs = ssd_inputs(batch=1, length=256, heads=2, head_dim=8, groups=1, n=4, seed=1)
    chunks = []
    real = bwd_mod._reverse_chunk  # pass 2 of the backward kernel, once per chunk

    def counting(k, b, c, scratch, gam, s_next_t):
        chunks.append(c)
        return real(k, b, c, scratch, gam, s_next_t)

    def no_reference(*args, **kw):
        raise AssertionError("the reference op ran inside the nki-sim backward")

    monkeypatch.setattr(bwd_mod, "_reverse_chunk", counting)
    y = SIM["ssd_scan"](**inputs, chunk_size=128)
    monkeypatch.setattr(ref_mod, "ssd_scan", no_reference)
    y.sum().backward()
    assert chunks == [1, 0]
    assert all(v.grad is not None for v in inputs.values())
