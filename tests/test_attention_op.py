"""The reference eidetic-window attention op against an explicit per-query loop.

Both implementations are checked: the fused one (what `eidetic_attention` runs on
CPU) and the blocked one in plain torch ops (other devices, tracing).
"""

from __future__ import annotations

import math

import pytest
import torch

from bmojo_neuron import ops
from bmojo_neuron.ops.reference import eager_cpu
from bmojo_neuron.ops.reference import eidetic_attention_fused as fused_module
from bmojo_neuron.ops.reference.eidetic_attention import eidetic_attention, eidetic_attention_blocked
from bmojo_neuron.ops.reference.eidetic_attention_fused import eidetic_attention_fused

IMPLEMENTATIONS = {"fused": eidetic_attention_fused, "blocked": eidetic_attention_blocked}


def loop_attention(q, k, v, kf, vf, mem_k, mem_v, mem_valid, window, fading_window, chunk):
    """For each query, gather its keys as docs/design.md defines them ("The model", step 5), then one softmax."""
    batch, q_heads, length, head_dim = q.shape
    group = q_heads // k.shape[1]
    out = torch.zeros_like(q)
    lse = torch.zeros(batch, q_heads, length, dtype=q.dtype)
    for b in range(batch):
        for h in range(q_heads):
            kv = h // group
            for i in range(length):
                keys = [k[b, kv, t] for t in range(max(0, i - window + 1), i + 1)]
                vals = [v[b, kv, t] for t in range(max(0, i - window + 1), i + 1)]
                if kf is not None:
                    fading = range(max(0, i - window - fading_window + 1), i - window + 1)
                    keys += [kf[b, kv, t] for t in fading]
                    vals += [vf[b, kv, t] for t in fading]
                if mem_k is not None:
                    j = i // chunk
                    slots = [m for m in range(mem_k.shape[3]) if mem_valid[b, j, m]]
                    keys += [mem_k[b, kv, j, m] for m in slots]
                    vals += [mem_v[b, kv, j, m] for m in slots]
                scores = torch.stack(keys) @ q[b, h, i] / math.sqrt(head_dim)
                lse[b, h, i] = torch.logsumexp(scores, 0)
                out[b, h, i] = torch.softmax(scores, 0) @ torch.stack(vals)
    return out, lse


def make_inputs(length, window, fading_window, chunk, memory, q_heads, kv_heads, dtype=torch.float64, seed=0,
                head_dim=8):
    gen = torch.Generator().manual_seed(seed)
    batch = 2

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    q = rand(batch, q_heads, length, head_dim)
    k, v = rand(batch, kv_heads, length, head_dim), rand(batch, kv_heads, length, head_dim)
    kf = vf = mem_k = mem_v = mem_valid = None
    if fading_window:
        kf, vf = rand(batch, kv_heads, length, head_dim), rand(batch, kv_heads, length, head_dim)
    if memory:
        n_chunks = -(-length // chunk)
        mem_k = rand(batch, kv_heads, n_chunks, memory, head_dim)
        mem_v = rand(batch, kv_heads, n_chunks, memory, head_dim)
        mem_valid = torch.rand(batch, n_chunks, memory, generator=gen) > 0.3
        mem_valid[:, 0] = False  # the first chunk sees an empty memory
        mem_valid[:, -1] = True  # and the last a full one
    return q, k, v, kf, vf, mem_k, mem_v, mem_valid


CASES = [
    # length, window, fading_window, chunk, memory, q_heads, kv_heads, block
    (37, 5, 3, 4, 3, 4, 2, None),  # fading clipped at 0, w != c, GQA 2, tail block
    (20, 8, 8, 8, 2, 2, 1, 4),  # w == c, several blocks per window
    (9, 16, 4, 4, 2, 2, 2, None),  # window longer than the sequence: no fading keys at all
    (33, 4, 0, 6, 0, 4, 1, 8),  # w_f = 0 and M = 0 (plain sliding window), GQA 4
    (24, 3, 5, 7, 4, 4, 4, 5),  # fading wider than window, block not dividing anything
    (30, 8, 8, 8, 3, 2, 2, 4),  # no query groups: lower-triangle pieces run on the kernel's causal flag, tail block
]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", CASES)
def test_matches_per_query_loop(case, impl):
    length, window, fading_window, chunk, memory, q_heads, kv_heads, block = case
    inputs = make_inputs(length, window, fading_window, chunk, memory, q_heads, kv_heads)
    out, lse = IMPLEMENTATIONS[impl](
        *inputs, window=window, fading_window=fading_window, chunk=chunk, scale=None, block=block
    )
    want_out, want_lse = loop_attention(*inputs, window, fading_window, chunk)
    torch.testing.assert_close(out, want_out, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=1e-12)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_float32_inputs_return_float32_lse_and_match(impl):
    inputs = make_inputs(30, 6, 4, 5, 3, 4, 2, dtype=torch.float32)
    out, lse = IMPLEMENTATIONS[impl](*inputs, window=6, fading_window=4, chunk=5, scale=None, block=None)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    doubled = [t.double() if t is not None and t.is_floating_point() else t for t in inputs]
    want_out, _ = loop_attention(*doubled, 6, 4, 5)
    torch.testing.assert_close(out.double(), want_out, rtol=0, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_gradcheck_all_inputs(impl):
    # Every code path of the small case (a tail block, fading keys, memory slots some masked, query groups)
    # with head_dim 2: gradcheck's finite differences cost one forward per input element, and no path
    # depends on head_dim (one slice of query blocks either way).
    q, k, v, kf, vf, mem_k, mem_v, mem_valid = make_inputs(11, 3, 2, 4, 2, 4, 2, head_dim=2)
    mem_valid[1, 1] = torch.tensor([True, False])  # a partly masked memory too
    tensors = [t.requires_grad_() for t in (q, k, v, kf, vf, mem_k, mem_v)]

    def fn(*args):
        return IMPLEMENTATIONS[impl](*args, mem_valid, window=3, fading_window=2, chunk=4, scale=None, block=4)

    assert torch.autograd.gradcheck(fn, tensors, eps=1e-6, atol=1e-8)  # both outputs: out and lse


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("uses", ["out_and_lse", "lse_only"])
@pytest.mark.parametrize("case", [CASES[0], CASES[4], CASES[5]])
def test_gradients_through_out_and_lse_match_per_query_loop(case, uses, impl):
    """A loss on the log-sum-exp too (as the NKI kernels' tests use): every gradient equals the loop's autograd."""
    length, window, fading_window, chunk, memory, q_heads, kv_heads, block = case
    inputs = make_inputs(length, window, fading_window, chunk, memory, q_heads, kv_heads)
    leaves = [t.requires_grad_() for t in inputs if t is not None and t.is_floating_point()]
    gen = torch.Generator().manual_seed(5)
    d_out = torch.randn(inputs[0].shape, generator=gen, dtype=torch.float64)
    d_lse = torch.randn(inputs[0].shape[:3], generator=gen, dtype=torch.float64)

    def loss(out, lse):
        return (lse * d_lse).sum() + (0 if uses == "lse_only" else (out * d_out).sum())

    def grads(out, lse):  # the lse does not depend on v: a missing gradient is a zero one
        found = torch.autograd.grad(loss(out, lse), leaves, allow_unused=True)
        return [torch.zeros_like(t) if g is None else g for g, t in zip(found, leaves)]

    got = grads(*IMPLEMENTATIONS[impl](
        *inputs, window=window, fading_window=fading_window, chunk=chunk, scale=None, block=block))
    want = grads(*loop_attention(*inputs, window, fading_window, chunk))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("key_major", [False, True])
@pytest.mark.parametrize("blocks_per_slice", [1, 2, 3])
@pytest.mark.parametrize("case", CASES)
def test_fused_in_slices_of_query_blocks_equals_blocked(case, blocks_per_slice, key_major, monkeypatch):
    """The fused op runs its pieces a slice of query blocks at a time; with slices of 1-3 blocks (the
    merge, the lse and every gradient cut at slice edges, keys shared across them) outputs and gradients,
    through both outputs, still equal the blocked op's. `key_major`: the backward runs every band of two or
    more pieces key block by key block (`KEY_MAJOR_ROWS` lowered to reach these small blocks)."""
    length, window, fading_window, chunk, memory, q_heads, kv_heads, block = case
    block = block or fused_module.default_block(window, length)
    per_block = 2 * q_heads * block * 8 * 8  # batch 2, head_dim 8, float64: one query block of every head
    monkeypatch.setattr(fused_module, "SLICE_BYTES", blocks_per_slice * per_block)
    monkeypatch.setattr(fused_module, "KEY_MAJOR_ROWS", 1 if key_major else 1 << 30)
    inputs = make_inputs(length, window, fading_window, chunk, memory, q_heads, kv_heads, seed=blocks_per_slice)
    leaves = [t.requires_grad_() for t in inputs if t is not None and t.is_floating_point()]
    gen = torch.Generator().manual_seed(length)
    d_out = torch.randn(inputs[0].shape, generator=gen, dtype=torch.float64)
    d_lse = torch.randn(inputs[0].shape[:3], generator=gen, dtype=torch.float64)
    results = {}
    for name, impl in IMPLEMENTATIONS.items():
        out, lse = impl(*inputs, window=window, fading_window=fading_window, chunk=chunk, scale=None, block=block)
        grads = torch.autograd.grad((out * d_out).sum() + (lse * d_lse).sum(), leaves, allow_unused=True)
        results[name] = (out, lse, *grads)  # None: fading keys no query reaches (window >= length)
    for got, want in zip(results["fused"], results["blocked"]):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("length, window, fading_window, slots, q_heads, seed", [
    (40, 6, 9, 3, 4, 6),  # fading band not on a block edge
    (26, 8, 8, 2, 2, 7),  # w_f a multiple of the block: its first piece is a lower triangle (the causal flag)
    (26, 8, 8, 2, 4, 7),  # the same with query groups (the flag only without)
])
@pytest.mark.parametrize("key_major", [False, True])
def test_fused_equals_blocked_with_overlapping_fading_keys(length, window, fading_window, slots, q_heads, seed,
                                                           key_major, monkeypatch):
    """fading_overlap: the fading keys cover distances [0, w_f - 1], over the window; outputs and gradients,
    with the bands query-major and key-major (`KEY_MAJOR_ROWS` lowered to reach these small blocks)."""
    monkeypatch.setattr(fused_module, "KEY_MAJOR_ROWS", 1 if key_major else 1 << 30)
    inputs = make_inputs(length, window, fading_window, 8, slots, q_heads, 2)
    leaves = [t.requires_grad_() for t in inputs if t is not None and t.is_floating_point()]
    gen = torch.Generator().manual_seed(seed)
    d_out, d_lse = torch.randn(inputs[0].shape, generator=gen, dtype=torch.float64), torch.randn(2, q_heads, length)
    results = {}
    for name, impl in IMPLEMENTATIONS.items():
        out, lse = impl(*inputs, window=window, fading_window=fading_window, chunk=8, scale=None, block=4,
                        fading_overlap=True)
        results[name] = (out, lse, *torch.autograd.grad((out * d_out).sum() + (lse * d_lse).sum(), leaves))
    for got, want in zip(results["fused"], results["blocked"]):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_fused_skips_an_empty_memory_and_reuses_its_pieces(monkeypatch):
    """A memory with no valid slot (the model's, while the sequence is at most `memory_lag` chunks long) costs no
    kernel call: outputs and the other gradients equal those without a memory, its own gradients are zeros.
    The pieces (and their masks) are made once per settings."""
    calls = []
    flash, flash_backward = fused_module._flash, fused_module._flash_backward
    monkeypatch.setattr(fused_module, "_flash", lambda *a, **k: calls.append("forward") or flash(*a, **k))
    monkeypatch.setattr(fused_module, "_flash_backward",
                        lambda *a, **k: calls.append("backward") or flash_backward(*a, **k))
    inputs = list(make_inputs(24, 6, 6, 8, 3, 2, 2))
    inputs[7] = torch.zeros_like(inputs[7])  # no valid slot
    leaves = [t.requires_grad_() for t in inputs if t is not None and t.is_floating_point()]
    results = []
    for memory in (inputs[5:], [None] * 3):
        calls.clear()
        out, lse = eidetic_attention_fused(*inputs[:5], *memory, window=6, fading_window=6, chunk=8, scale=None,
                                           block=4)
        grads = torch.autograd.grad(out.sum() + lse.sum(), leaves, allow_unused=True)
        results.append((out, lse, *grads[:5], list(calls)))
    (out, lse, *grads, with_memory_calls), (want_out, want_lse, *want_grads, without_calls) = results
    assert with_memory_calls == without_calls  # no call for the memory, forward or backward
    torch.testing.assert_close((out, lse, *grads), (want_out, want_lse, *want_grads), rtol=0, atol=1e-12)
    d_mem_k, d_mem_v = torch.autograd.grad(
        eidetic_attention_fused(*inputs, window=6, fading_window=6, chunk=8, scale=None, block=4)[0].sum(),
        leaves[5:])
    assert not d_mem_k.any() and not d_mem_v.any() and d_mem_k.shape == inputs[5].shape
    first = fused_module.call_pieces(24, 6, 6, 4, torch.float64, "cpu")
    again = fused_module.call_pieces(24, 6, 6, 4, torch.float64, "cpu")
    assert any(p.mask is not None for p in first)
    assert all(a.mask is b.mask for a, b in zip(first, again))


def test_lower_triangle_pieces_are_marked_causal():
    """The first in-context offset and the first fading one (when the fading band starts on a block edge)
    are exactly the lower triangle; the edge pieces beyond them are not."""
    pieces = fused_module.band_pieces("ctx", 0, 7, 4, torch.float64, "cpu")
    pieces += fused_module.band_pieces("fading", 8, 15, 4, torch.float64, "cpu")
    assert [(p.keys, p.offset, p.causal) for p in pieces] == [
        ("ctx", 0, True), ("ctx", 1, False), ("ctx", 2, False),
        ("fading", 2, True), ("fading", 3, False), ("fading", 4, False)]
    for p in pieces:
        if p.causal:
            lower = torch.ones(4, 4, dtype=torch.bool).tril()
            torch.testing.assert_close(p.mask, torch.zeros(4, 4, dtype=torch.float64).masked_fill(~lower, -math.inf))


@pytest.mark.parametrize("length, window, fading_window, block, overlap", [
    (37, 8, 8, 4, False), (37, 8, 12, 3, False), (6, 8, 8, 4, False), (37, 8, 5, 4, True), (20, 6, 0, 4, False)])
def test_call_pieces_cover_each_band_pair_once(length, window, fading_window, block, overlap):
    """Laid over the (query, key) grid, a call's pieces cover every pair of the in-context band once and
    every pair of the fading band once (none before the window stops covering the sequence), nothing else."""
    i, t = torch.arange(length)[:, None], torch.arange(length)[None, :]
    d = i - t
    near = 0 if overlap else window
    want = {"ctx": (d >= 0) & (d < window)}
    if fading_window and (overlap or window < length):
        want["fading"] = (d >= near) & (d < near + fading_window)
    n = -(-length // block)
    got = {keys: torch.zeros(n * block, n * block, dtype=torch.int64) for keys in ("ctx", "fading")}
    for p in fused_module.call_pieces(length, window, fading_window, block, torch.float64, "cpu", overlap):
        allowed = torch.ones(block, block, dtype=torch.bool) if p.mask is None else p.mask == 0
        for qb in range(p.offset, n):
            kb = qb - p.offset
            got[p.keys][qb * block:(qb + 1) * block, kb * block:(kb + 1) * block] += allowed.long()
    for keys in ("ctx", "fading"):
        expected = want.get(keys, torch.zeros(length, length, dtype=torch.bool)).long()
        assert torch.equal(got[keys][:length, :length], expected), keys


@pytest.mark.parametrize("length, window, q_heads, seed", [
    (300, 64, 4, 3),  # model sizes: several memory chunks, query groups
    (1100, 512, 2, 8),  # the bench's windows and default block, no query groups, a tail block, the fading band
])
def test_fused_equals_blocked_in_float32(length, window, q_heads, seed):
    """Outputs and every gradient agree to float32 round-off (w = w_f = c, M = 16)."""
    inputs = list(make_inputs(length, window, window, window, 16, q_heads, 2, dtype=torch.float32, seed=seed))
    leaves = [t.requires_grad_() if t is not None and t.is_floating_point() else t for t in inputs]
    grad = torch.randn(2, q_heads, length, 8, generator=torch.Generator().manual_seed(seed + 1))
    results = {}
    for name, impl in IMPLEMENTATIONS.items():
        out, lse = impl(*leaves, window=window, fading_window=window, chunk=window, scale=None, block=None)
        grads = torch.autograd.grad((out * grad).sum(), [t for t in leaves if t is not None and t.requires_grad])
        results[name] = (out, lse, *grads)
    for got, want in zip(results["fused"], results["blocked"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)


def test_cpu_runs_the_fused_op_and_tracing_the_blocked_one():
    inputs = make_inputs(12, 4, 2, 4, 2, 2, 1, dtype=torch.float32)
    assert eager_cpu.fused_kernel_available(*inputs)
    assert not eager_cpu.fused_kernel_available(*inputs[:2], inputs[2].to(torch.bfloat16))
    with eager_cpu.fused_kernels_disabled():  # what the Neuron backend does for a whole run
        assert not eager_cpu.fused_kernel_available(*inputs)
    assert eager_cpu.fused_kernel_available(*inputs)
    graph = torch.fx.experimental.proxy_tensor.make_fx(
        lambda q, k, v: eidetic_attention(q, k, v, window=4)[0], tracing_mode="fake")(*inputs[:3])
    targets = {str(node.target) for node in graph.graph.nodes}
    assert not any("flash" in t for t in targets)


def test_dispatch_routes_to_reference_and_rejects_unavailable_backends():
    inputs = make_inputs(12, 4, 2, 4, 2, 2, 1)
    via_dispatch, _ = ops.eidetic_attention(*inputs, window=4, fading_window=2, chunk=4)
    direct, _ = eidetic_attention(*inputs, window=4, fading_window=2, chunk=4)
    assert torch.equal(via_dispatch, direct)
    available = ops.available_backends()
    assert available["torch"][0] is True
    ok, reason = available["nki"]
    assert not ok and reason
    with pytest.raises(ValueError, match="nki"):
        ops.set_backend("nki")
    assert available["nki-sim"][0] is True  # the NKI emulator runs anywhere
    ssd_backend = ops.get_backend("ssd_scan")  # the default's (auto) unless BMOJO_OPS_BACKEND names one
    with ops.use_backend("nki-sim", ["eidetic_attention"]):
        assert ops.get_backend("eidetic_attention") == "nki-sim"
        assert ops.get_backend("ssd_scan") == ssd_backend  # an op not named keeps its backend
    with pytest.raises(ValueError, match="unknown op"):
        ops.set_backend("torch", ["flash_magic"])
    with pytest.raises(ValueError, match="unknown ops backend"):
        ops.set_backend("cuda-magic")
    assert ops.get_backend("eidetic_attention") == "torch"


def test_shape_errors_name_the_problem():
    q, k, v, kf, vf, mem_k, mem_v, mem_valid = make_inputs(12, 4, 2, 4, 2, 2, 1)
    with pytest.raises(ValueError, match="mem_k"):
        eidetic_attention(q, k, v, kf, vf, mem_k[:, :, :1], mem_v, mem_valid, window=4, fading_window=2, chunk=4)
    with pytest.raises(ValueError, match="kv heads"):
        eidetic_attention(q[:, :1].expand(-1, 3, -1, -1), k.expand(-1, 2, -1, -1), v.expand(-1, 2, -1, -1), window=4)


def test_fused_memory_piece_runs_only_over_the_chunks_that_read_a_memory(monkeypatch):
    """The memory kernel calls cover the chunks from the first to the last with a valid slot (the model's first
    `memory_lag` chunks read an empty memory): here chunks 2-3 of 5, forward and backward; outputs and gradients
    still equal the blocked op's."""
    shapes = []
    flash, flash_backward = fused_module._flash, fused_module._flash_backward
    monkeypatch.setattr(fused_module, "_flash", lambda *a, **k: shapes.append(a[1].shape) or flash(*a, **k))
    monkeypatch.setattr(fused_module, "_flash_backward",
                        lambda *a, **k: shapes.append(a[2].shape) or flash_backward(*a, **k))
    inputs = list(make_inputs(37, 5, 3, 8, 3, 4, 2))
    inputs[7] = inputs[7].clone()
    inputs[7][:, [0, 1, 4]] = False
    inputs[7][:, 2:4, 0] = True
    leaves = [t.requires_grad_() for t in inputs if t is not None and t.is_floating_point()]
    results = {}
    for name, impl in IMPLEMENTATIONS.items():
        shapes.clear()
        out, lse = impl(*inputs, window=5, fading_window=3, chunk=8, scale=None, block=None)
        results[name] = (out, lse, *torch.autograd.grad(out.sum() + lse.sum(), leaves))
        if name == "fused":
            memory_calls = [s for s in shapes if s[-2] == 3]  # the memory's keys: (N, chunks, M = 3, D)
            assert [s[1] for s in memory_calls] == [2, 2]
    for got, want in zip(results["fused"], results["blocked"]):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("uses", ["out", "out_and_lse"])
def test_fused_backward_hands_the_kernel_dense_output_gradients_in_one_block_slices(uses, monkeypatch):
    """With one query block per slice (the train step's shapes), every band piece's kernel call gets an output
    gradient already dense in the kernel's own (N, rows, blocks, D) order, which its backward would otherwise copy
    at every call; the model's gradient arrives strided (the output projection's input, transposed). Outputs and
    gradients, through the output alone and through the lse too, equal the blocked op's."""
    length, window, fading_window, chunk, memory, q_heads, kv_heads, block = 30, 8, 8, 8, 3, 4, 2, 4
    monkeypatch.setattr(fused_module, "SLICE_BYTES", 2 * q_heads * block * 8 * 8)  # one query block of every head
    dense = []
    flash_backward = fused_module._flash_backward
    monkeypatch.setattr(fused_module, "_flash_backward",
                        lambda *a, **k: dense.append(a[0].transpose(1, 2).is_contiguous()) or flash_backward(*a, **k))
    inputs = make_inputs(length, window, fading_window, chunk, memory, q_heads, kv_heads)
    leaves = [t.requires_grad_() for t in inputs if t is not None and t.is_floating_point()]
    gen = torch.Generator().manual_seed(11)
    d_out = torch.randn(2, length, q_heads, 8, generator=gen, dtype=torch.float64).transpose(1, 2)  # strided
    d_lse = torch.randn(2, q_heads, length, generator=gen, dtype=torch.float64) if uses == "out_and_lse" else None
    results = {}
    for name, impl in IMPLEMENTATIONS.items():
        dense.clear()
        out, lse = impl(*inputs, window=window, fading_window=fading_window, chunk=chunk, scale=None, block=block)
        loss = (out * d_out).sum() + (0 if d_lse is None else (lse * d_lse).sum())
        results[name] = (out, lse, *torch.autograd.grad(loss, leaves))
        if name == "fused":
            band_calls = dense[:-1]  # the last call is the memory piece's, over chunks
            assert len(band_calls) > -(-length // block) and all(band_calls)
    for got, want in zip(results["fused"], results["blocked"]):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_fused_runs_a_band_key_block_by_key_block(monkeypatch):
    """Once a key block's query blocks in a band hold `KEY_MAJOR_ROWS` rows, forward and backward make one call
    per key block over all of them (their rows consecutive), not one per offset: here w = w_f = 2 blocks, so
    both bands have three offsets; outputs and gradients equal the blocked op's (the same sums, in another
    order)."""
    length, window, block, q_heads = 30, 8, 4, 2
    n_blocks = -(-length // block)
    monkeypatch.setattr(fused_module, "KEY_MAJOR_ROWS", 3 * block)
    rows = {"forward": [], "backward": []}
    flash, flash_backward = fused_module._flash, fused_module._flash_backward
    monkeypatch.setattr(fused_module, "_flash",
                        lambda *a, **k: rows["forward"].append(a[0].shape[1:3]) or flash(*a, **k))
    monkeypatch.setattr(fused_module, "_flash_backward",
                        lambda *a, **k: rows["backward"].append(a[1].shape[1:3]) or flash_backward(*a, **k))
    inputs = make_inputs(length, window, window, window, 0, q_heads, 2)
    leaves = [t.requires_grad_() for t in inputs if t is not None and t.is_floating_point()]
    results = {}
    for name, impl in IMPLEMENTATIONS.items():
        out, lse = impl(*inputs, window=window, fading_window=window, chunk=window, scale=None, block=block)
        results[name] = (out, lse, *torch.autograd.grad(out.sum() + lse.sum(), leaves))
    # In-context keys j meet query blocks j..j+2, fading keys j query blocks j+2..j+4 (clipped at the last one).
    want = [(1, block * min(3, n_blocks - j)) for j in range(n_blocks)]
    want += [(1, block * min(3, n_blocks - j - 2)) for j in range(n_blocks - 2)]
    assert sorted(rows["forward"]) == sorted(want) and sorted(rows["backward"]) == sorted(want)
    for got, expected in zip(results["fused"], results["blocked"]):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


def test_fused_key_major_runs_are_made_once_per_settings(monkeypatch):
    """The runs' stacked masks are kept with the pieces: a second call with the same settings builds none,
    while other query groups, another `KEY_MAJOR_ROWS` or inference mode each get their own."""
    made = []
    key_major_runs = fused_module._key_major_runs
    monkeypatch.setattr(fused_module, "_PIECES", {})
    monkeypatch.setattr(fused_module, "_key_major_runs", lambda *a: made.append(a) or key_major_runs(*a))
    monkeypatch.setattr(fused_module, "KEY_MAJOR_ROWS", 12)
    length, window, block = 30, 8, 4

    def attend(q_heads):
        inputs = make_inputs(length, window, window, window, 0, q_heads, 2)
        return eidetic_attention_fused(*inputs, window=window, fading_window=window, chunk=window, scale=None,
                                       block=block)

    first = attend(2)
    assert len(made) == 1
    torch.testing.assert_close(attend(2), first, rtol=0, atol=0)
    assert len(made) == 1  # kept
    runs, _ = fused_module.call_runs(length, window, window, block, 1, torch.float64, "cpu")
    again, _ = fused_module.call_runs(length, window, window, block, 1, torch.float64, "cpu")
    assert runs and all(a.masks is b.masks for a, b in zip(runs, again))
    attend(4)
    assert len(made) == 2  # two query heads per kv head: other rows
    monkeypatch.setattr(fused_module, "KEY_MAJOR_ROWS", 1 << 30)
    attend(2)
    assert len(made) == 3
    with torch.inference_mode():
        attend(2)
    assert len(made) == 4
