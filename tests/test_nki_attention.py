"""The fused eidetic-attention NKI kernels, run through the emulator (`nki-sim`), against the reference op.

Checked: output, log-sum-exp and the gradients of q, k, v, k_fading, v_fading, mem_k,
mem_v, from a loss that uses both the output and the lse (so the lse path of the
backward is exercised too).
fp32: every tensor within 1e-4 relative to its max magnitude (observed ~1e-6).
bf16: within 2e-2: the kernels round P (and dS) to bf16 before the P.V (dS.K, dS^T.Q)
matmuls, as flash attention does on the Tensor engine, while the reference works in fp32
throughout; observed <= 7e-3 (2^-8 = 3.9e-3 is one bf16 rounding).
Memory validity per chunk: chunk 0 empty (the first chunk, whose fading window is clipped
at 0), the middle chunks partly filled, the last chunk full.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from nki_checks import assert_model_matches_on_nki_sim, rel_err

from bmojo_neuron.ops.reference.eidetic_attention import eidetic_attention as attention_ref
from nki_kernels.attention_fwd import eidetic_attention_fwd, plan_tile
from nki_kernels.emulator import simulate
from bmojo_neuron.ops.nki_backend import attention_emulator_ops

SIM = attention_emulator_ops()["eidetic_attention"]


def make_inputs(length, q_heads, kv_heads, head_dim, chunk, slots, batch=1, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype).requires_grad_()  # noqa: E731
    n_chunks = -(-length // chunk)
    tensors = [r(batch, q_heads, length, head_dim)] + [r(batch, kv_heads, length, head_dim) for _ in range(4)]
    tensors += [r(batch, kv_heads, n_chunks, slots, head_dim), r(batch, kv_heads, n_chunks, slots, head_dim)]
    valid = torch.rand(batch, n_chunks, slots, generator=g) > 0.5
    valid[:, 0] = False  # first chunk: empty memory
    valid[:, -1] = True  # last chunk: full memory
    return tensors, valid


def run_both(tensors, valid, dtype=torch.float32, fading=True, memory=True, **cfg):
    """(out, lse, grads) of the reference and of the nki-sim op, for the same random cotangents."""
    q, k, v, kf, vf, mk, mv = tensors
    g = torch.Generator().manual_seed(7)
    d_out = torch.randn(q.shape, generator=g).to(dtype)
    d_lse = torch.randn(q.shape[:3], generator=g)
    results = []
    for fn in (attention_ref, SIM):
        out, lse = fn(q, k, v, kf if fading else None, vf if fading else None, mk if memory else None,
                      mv if memory else None, valid if memory else None, **cfg)
        loss = (out.float() * d_out.float()).sum() + (lse * d_lse).sum()
        grads = torch.autograd.grad(loss, tensors, allow_unused=True)
        results.append((out.detach(), lse.detach(), grads))
    return results


def assert_close(results, tol):
    (out_r, lse_r, g_r), (out_s, lse_s, g_s) = results
    assert out_s.dtype == out_r.dtype and lse_s.dtype == torch.float32
    assert rel_err(out_s, out_r) <= tol, "out"
    assert rel_err(lse_s, lse_r) <= tol, "lse"
    for name, a, b in zip(("q", "k", "v", "k_fading", "v_fading", "mem_k", "mem_v"), g_s, g_r):
        if b is None or b.numel() == 0 or float(b.abs().max()) == 0:  # path unused: no (or zero) gradient
            assert a is None or float(a.abs().max()) == 0, name
        else:
            assert a is not None and a.dtype == b.dtype and rel_err(a, b) <= tol, name


# (length, q_heads, kv_heads, head_dim, window, fading_window, chunk, slots): every masking edge
CASES = {
    "gqa2_w_eq_c": (256, 4, 2, 16, 64, 64, 64, 8),  # memory partly filled / full, 2 query tiles
    "gqa1_w_ne_c_straddle": (256, 2, 2, 16, 100, 50, 96, 5),  # chunks straddle query tiles, odd windows
    "gqa4_big_memory": (256, 4, 1, 8, 128, 128, 128, 130),  # M > 128: two slot blocks
    "no_fading": (384, 2, 1, 16, 96, 0, 64, 6),  # w_f = 0, 3 query tiles
    "window_beyond_length": (128, 2, 2, 16, 300, 64, 32, 4),  # w >= L: no fading keys at all
    # > 1024 keys per query tile: the forward's row max in three PSUM pieces, three S^T banks, a short
    # memory block; 3 query heads per kv head, so a unit of two heads can span two kv heads
    "gqa3_long_tiles": (640, 6, 2, 16, 256, 256, 256, 300),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_lse_and_all_gradients_fp32(case):
    length, hq, hkv, d, w, wf, c, m = CASES[case]
    tensors, valid = make_inputs(length, hq, hkv, d, c, m)
    assert_close(run_both(tensors, valid, window=w, fading_window=wf, chunk=c), 1e-4)


@pytest.mark.parametrize("length, window, fading_window, chunk", [
    (256, 64, 96, 64),  # fading keys reach past the window, one edge per tile straddles
    (200, 150, 40, 48),  # fading window inside the window; L padded to 256 inside
])
def test_fading_keys_over_the_window_fp32(length, window, fading_window, chunk):
    """fading_overlap: the fading keys cover lags 0 .. w_f - 1, as in the reference."""
    tensors, valid = make_inputs(length, 4, 2, 16, chunk, 5, seed=4)
    assert_close(run_both(tensors, valid, window=window, fading_window=fading_window, chunk=chunk,
                          fading_overlap=True), 1e-4)


def test_no_memory_and_unpadded_length_fp32():
    """M = 0 (mem given, no slots), and no memory at all with L = 200 (padded to 256 inside)."""
    tensors, valid = make_inputs(256, 2, 1, 16, 64, 0)
    assert_close(run_both(tensors, valid, window=64, fading_window=32, chunk=64), 1e-4)
    tensors, valid = make_inputs(200, 4, 2, 16, 48, 3, seed=1)
    assert_close(run_both(tensors, valid, memory=False, window=48, fading_window=40, chunk=48), 1e-4)
    tensors, valid = make_inputs(200, 2, 2, 16, 48, 3, batch=2, seed=2)  # chunk count grows with padding
    assert_close(run_both(tensors, valid, window=40, fading_window=40, chunk=48), 1e-4)


def test_forward_sbuf_does_not_grow_with_length():
    """Memory chunks that are no multiple of 128 give every query tile its own chunk-edge masks and bias
    rows; the forward keeps those of two query tiles only, so its peak SBUF does not grow with L."""
    import ml_dtypes

    z = lambda *s, dt=ml_dtypes.bfloat16: np.broadcast_to(np.zeros((), dt), s)  # noqa: E731
    peaks = []
    for length in (2048, 4096):
        nc = -(-length // 100)
        _, prof = simulate(eidetic_attention_fwd, z(1, 2, 128, length), z(1, 2, 128, length), z(1, 2, length, 128),
                           z(1, 2, 128, length), z(1, 2, length, 128), z(1, 2, nc, 128, 256), z(1, 2, nc, 256, 128),
                           z(1, nc, 256, dt=np.float32), 512, 512, 100, 1 / math.sqrt(128), cost_only=True)
        peaks.append(prof.peak_sbuf_bytes)
    assert peaks[1] <= peaks[0] + 4096 and peaks[0] < 96 * 1024  # tile-to-tile variation only


def test_forward_one_lane_per_unit_fp32(monkeypatch):
    """Where the K/V of three two-head units would not fit in SBUF the forward runs one head per unit."""
    import nki_kernels.attention_fwd as fwd

    monkeypatch.setattr(fwd, "KV_SBUF_BUDGET", 0)
    cfg = {"length": 256, "window": 64, "fading_window": 64, "chunk": 64, "n_slots": 8, "use_fading": True,
           "use_memory": True, "fading_overlap": False, "groups": 2, "d": 16}
    assert fwd.unit_lanes(cfg, np.float32) == 1
    tensors, valid = make_inputs(256, 4, 2, 16, 64, 8, seed=5)
    assert_close(run_both(tensors, valid, window=64, fading_window=64, chunk=64), 1e-4)


def test_bf16():
    tensors, valid = make_inputs(256, 4, 2, 32, 64, 8, dtype=torch.bfloat16, seed=3)
    results = run_both(tensors, valid, dtype=torch.bfloat16, window=64, fading_window=64, chunk=64)
    assert results[1][0].dtype == torch.bfloat16
    assert_close(results, 2e-2)


def test_plan_skips_tiles_outside_both_windows():
    """Trace-time plan of one query tile: only keys inside a window; masks only where an edge cuts."""
    plan = plan_tile(q0=1024, length=2048, window=256, fading_window=256, chunk=256, n_slots=64,
                     use_fading=True, use_memory=True)
    ctx = [s for s in plan if s.stream == "ctx"]
    fad = [s for s in plan if s.stream == "fad"]
    assert plan[0].stream == "ctx" and plan[0].k0 + plan[0].n == 1024 + 128  # diagonal first
    assert min(s.k0 for s in ctx) == 1024 - 256 and sum(s.n for s in ctx) == 256 + 128
    assert min(s.k0 for s in fad) == 1024 - 512 and max(s.k0 + s.n for s in fad) == 1024 + 128 - 256
    assert [bool(s.conds) for s in ctx] == [True, False, True]  # edge blocks alone and masked, the middle not
    mem = [s for s in plan if s.stream == "mem"]
    assert len(mem) == 1 and mem[0].chunk == 4 and mem[0].conds == ()  # tile inside one chunk: unmasked
    long = plan_tile(q0=4096, length=8192, window=2048, fading_window=2048, chunk=2048, n_slots=256,
                     use_fading=True, use_memory=True)
    assert sum(1 for s in long if not s.conds) >= 6  # interior segments need no mask


def test_model_forward_backward_nki_sim_attention_equals_torch():
    from bmojo_neuron import BMojoConfig, BMojoForCausalLM

    torch.manual_seed(0)
    config = BMojoConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, layer_pattern="BF",
                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=32, ssm_state_size=4,
                         ssm_head_dim=16, window_size=32, fading_window=32, memory_chunk=32, memory_picks=2,
                         memory_size=4)
    model = BMojoForCausalLM(config)
    ids = torch.randint(0, 64, (1, 256), generator=torch.Generator().manual_seed(1))
    # every op on nki-sim: attention, and the SSD scan of the fading path
    assert_model_matches_on_nki_sim(model, ids, ("eidetic_attention", "ssd_scan"))


def test_forward_cost_model_small_shape():
    """Cost-only run: rules hold at head_dim 128 with bf16, and the Tensor engine does the matmul FLOPs."""
    import ml_dtypes

    z = lambda *s, dt=ml_dtypes.bfloat16: np.broadcast_to(np.zeros((), dt), s)  # noqa: E731
    length, heads, d, w, m, c = 1024, 2, 128, 256, 128, 256
    nc = length // c
    _, prof = simulate(eidetic_attention_fwd, z(1, heads, d, length), z(1, 1, d, length), z(1, 1, length, d),
                       z(1, 1, d, length), z(1, 1, length, d), z(1, 1, nc, d, m), z(1, 1, nc, m, d),
                       z(1, nc, m, dt=np.float32), w, w, c, 1 / math.sqrt(d), cost_only=True)
    assert prof.cycles["tensor"] > 0 and prof.peak_share("tensor") > 0.5
    assert prof.peak_sbuf_bytes < 192 * 1024
