"""Attention layers and eidetic-memory selection against naive code written here (dense masks, loops)."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from naive import naive_attention, naive_memory_selection, naive_rope, tiny_config

from bmojo_neuron.layers.attention import BMojoAttention
from bmojo_neuron.layers import eidetic_memory
from bmojo_neuron.layers.eidetic_memory import MemoryState, memory_after_each_chunk, update_memory, visible_memory
from bmojo_neuron.layers.rope import RotaryEmbedding, apply_rotary, apply_rotary_rolled
from bmojo_neuron.ops.reference.eager_cpu import fused_kernels_disabled


def make_layer(**overrides) -> BMojoAttention:
    torch.manual_seed(0)
    return BMojoAttention(tiny_config(**overrides), 0).double().eval()


def project(layer: BMojoAttention, x: torch.Tensor):
    heads = lambda t, n: t.view(*t.shape[:-1], n, layer.head_dim)  # noqa: E731
    return (
        heads(layer.q_proj(x), layer.q_heads),
        heads(layer.k_proj(x), layer.kv_heads),
        heads(layer.v_proj(x), layer.kv_heads),
    )


def naive_layer(layer: BMojoAttention, x: torch.Tensor, keys_for_query) -> torch.Tensor:
    """Per-query loop; `keys_for_query(b, i, kv_head)` returns the (keys, values) lists of query i."""
    q, _, _ = project(layer, x)
    batch, length = x.shape[:2]
    theta = layer.rotary.theta
    group = layer.q_heads // layer.kv_heads
    out = torch.zeros(batch, length, layer.q_heads, layer.head_dim, dtype=x.dtype)
    for b in range(batch):
        for i in range(length):
            for h in range(layer.q_heads):
                keys, values = keys_for_query(b, i, h // group)
                out[b, i, h] = naive_attention(naive_rope(q[b, i, h], i, theta), torch.stack(keys), torch.stack(values))
    return layer.o_proj(out.reshape(batch, length, -1))


def test_rope_matches_the_pairwise_rotation():
    rotary = RotaryEmbedding(8, 10000.0)
    x = torch.randn(3, 8, dtype=torch.float64)
    positions = torch.tensor([0, 5, 123])
    cos, sin = rotary(positions, torch.float64)
    got = apply_rotary(x, cos, sin)
    for row, p in enumerate(positions.tolist()):
        torch.testing.assert_close(got[row], naive_rope(x[row], p, 10000.0), rtol=0, atol=1e-6)


def test_rotation_on_cpu_equals_the_plain_expression_with_its_gradient():
    """`apply_rotary` on eager CPU (`_Rotary`) gives the plain expression's numbers bit for bit and, in float64,
    its gradient (and passes gradcheck); the plain expression is what traced graphs run."""
    from bmojo_neuron.ops.reference.eager_cpu import fused_kernels_disabled

    rotary = RotaryEmbedding(8, 10000.0)
    cos, sin = rotary(torch.arange(6), torch.float64)
    x = torch.randn(2, 3, 8, 6, dtype=torch.float64).transpose(-1, -2)  # strided, as queries arrive
    grad = torch.randn(2, 3, 6, 8, dtype=torch.float64)
    results = []
    for disabled in (False, True):
        leaf = x.clone().requires_grad_()
        with fused_kernels_disabled() if disabled else contextlib.nullcontext():
            out = apply_rotary(leaf, cos, sin)
        out.backward(grad)
        results.append((out, leaf.grad))
    assert torch.equal(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=1e-15)
    leaf = x.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: apply_rotary(t, cos, sin), (leaf,))


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("scaling", [None, {"rope_type": "linear", "factor": 4.0}, LLAMA3])
def test_rolled_rotation_of_one_position_equals_the_rotation(dtype, scaling):
    """Decoding rotates by `at_position`'s tables with a roll; the parallel forward by `forward`'s tables with
    negated, concatenated halves. Same products and sums, so the same numbers bit for bit."""
    rotary = RotaryEmbedding(16, 10000.0, scaling)
    x = torch.randn(2, 3, 1, 16, generator=torch.Generator().manual_seed(0)).to(dtype)  # (batch, heads, 1, D)
    for position in (0, 1, 7, 511, 16383, 100_000):
        cos, sin = rotary(torch.tensor([position]), dtype)
        cos_1, signed_sin = rotary.at_position(position, dtype, x.device)
        assert cos_1.shape == signed_sin.shape == (16,) and cos_1.dtype == signed_sin.dtype == dtype
        torch.testing.assert_close(apply_rotary_rolled(x, cos_1, signed_sin), apply_rotary(x, cos, sin), rtol=0, atol=0)


def test_tables_of_one_position_are_shared_only_between_equal_settings():
    """Layers ask for the same position in turn and share its tables; other settings get their own."""
    a, b, other = RotaryEmbedding(8, 10000.0), RotaryEmbedding(8, 10000.0), RotaryEmbedding(8, 500.0)
    x = torch.randn(1, 8, dtype=torch.float64)
    for position in (3, 3, 4, 3):
        tables = a.at_position(position, torch.float64, x.device)
        assert b.at_position(position, torch.float64, x.device)[0] is tables[0]
        for rotary, theta in ((a, 10000.0), (other, 500.0)):
            got = apply_rotary_rolled(x, *rotary.at_position(position, torch.float64, x.device))
            torch.testing.assert_close(got[0], naive_rope(x[0], position, theta), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tables_for_heads_rotate_some_heads_and_leave_the_others_exactly(dtype):
    """One rotation over keys, values and queries side by side: the rotated heads get `at_position`'s rotation bit
    for bit, the others come back unchanged."""
    rotary = RotaryEmbedding(16, 10000.0)
    layout = ((2, True), (2, False), (3, True))
    x = torch.randn(2, 1, 7, 16, generator=torch.Generator().manual_seed(1)).to(dtype)  # (rows, batch, heads, D)
    for position in (0, 5, 5, 4096):
        cos, sin = rotary.at_position_for_heads(position, dtype, x.device, layout)
        assert cos.shape == sin.shape == (7, 16)
        got = apply_rotary_rolled(x, cos, sin)
        expected = apply_rotary_rolled(x, *rotary.at_position(position, dtype, x.device))
        for heads in (slice(0, 2), slice(4, 7)):
            torch.testing.assert_close(got[:, :, heads], expected[:, :, heads], rtol=0, atol=0)
        assert torch.equal(got[:, :, 2:4], x[:, :, 2:4])


def test_tables_of_a_forward_are_kept_on_eager_runs_only_and_equal_the_made_ones():
    """`prefix` (positions 0..L-1, asked by every attention layer at every step) hands out `forward`'s tables bit
    for bit; eager runs keep them, shared between equal settings, at most `_PREFIX_TABLES_KEPT` of them; a traced
    graph (here its stand-in, `fused_kernels_disabled`) and a fake tensor get new ones at every call. Tables first
    made under inference mode serve a later training step."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    kept = RotaryEmbedding._prefix_tables
    kept.clear()
    a, b, other = RotaryEmbedding(8, 10000.0), RotaryEmbedding(8, 10000.0), RotaryEmbedding(8, 500.0, LLAMA3)
    for rotary in (a, other):
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            like = torch.zeros(1, dtype=dtype)
            made = rotary(torch.arange(13), dtype)
            with torch.inference_mode():
                first = rotary.prefix(13, like)
            assert all(torch.equal(got, want) and got.dtype == dtype for got, want in zip(first, made))
            again = (b if rotary is a else rotary).prefix(13, like)
            assert again[0] is first[0] and again[1] is first[1]
            with fused_kernels_disabled():
                traced = rotary.prefix(13, like)
            assert traced[0] is not first[0] and all(torch.equal(t, m) for t, m in zip(traced, made))
    assert len(kept) == RotaryEmbedding._PREFIX_TABLES_KEPT
    with FakeTensorMode() as mode:
        fake = a.prefix(13, mode.from_tensor(torch.zeros(1)))
    assert type(fake[0]) is not torch.Tensor and len(kept) == RotaryEmbedding._PREFIX_TABLES_KEPT
    a.prefix(13, torch.zeros(1, dtype=torch.float64))  # kept: the trace below must make its own anyway
    graph = make_fx(lambda t: a.prefix(13, t)[0])(torch.zeros(1, dtype=torch.float64))  # real tensors, a mode
    assert torch.ops.aten.cos.default in {node.target for node in graph.graph.nodes}
    x = torch.randn(1, 2, 13, 8, requires_grad=True)  # training on tables made under inference mode
    with torch.inference_mode():
        tables = a.prefix(13, x)
    apply_rotary(x, *a.prefix(13, x)).sum().backward()
    assert a.prefix(13, x)[0] is tables[0] and x.grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_norm_rows_equal_the_norms(dtype):
    """The decode step's fused norms (`rows`) give the modules' outputs; other dtypes and groups fall back."""
    from bmojo_neuron.layers.norms import GatedRMSNorm, RMSNorm, norm_rows

    gen = torch.Generator().manual_seed(2)
    x, z = (torch.randn(3, 24, generator=gen).to(dtype) for _ in range(2))
    norm, gated, grouped = RMSNorm(24).to(dtype), GatedRMSNorm(24).to(dtype), GatedRMSNorm(24, group_size=8).to(dtype)
    with torch.no_grad():
        for module in (norm, gated, grouped):
            module.weight.normal_(generator=gen)
        tol = 1e-6 if dtype == torch.float32 else 0
        torch.testing.assert_close(norm_rows(norm, x), norm(x), rtol=tol, atol=tol)
        torch.testing.assert_close(gated.rows(x, z), gated(x, z), rtol=tol, atol=tol)
        torch.testing.assert_close(grouped.rows(x, z), grouped(x, z), rtol=0, atol=0)


def test_swa_layer_equals_dense_sliding_window_mask():
    layer = make_layer(layer_pattern="S", window_size=5)
    x = torch.randn(2, 23, 32, dtype=torch.float64)
    q, k, v = project(layer, x)
    positions = torch.arange(23)
    cos, sin = layer.rotary(positions, x.dtype)
    qr = apply_rotary(q.transpose(1, 2), cos, sin)
    kr = apply_rotary(k.transpose(1, 2), cos, sin).repeat_interleave(2, dim=1)
    dist = positions[:, None] - positions[None, :]
    mask = (dist >= 0) & (dist < 5)
    scores = (qr @ kr.transpose(-1, -2)) / layer.head_dim**0.5
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    dense = probs @ v.transpose(1, 2).repeat_interleave(2, dim=1)
    want = layer.o_proj(dense.transpose(1, 2).reshape(2, 23, -1))
    got, innovation = layer(x)
    assert innovation is None
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("mixer", ["mamba2", "mamba1"])
def test_bmojo_layer_with_window_covering_the_sequence_is_full_causal_attention(mixer):
    layer = make_layer(window_size=32, fading_window=32, memory_chunk=8, ssm_mixer=mixer)
    x = torch.randn(1, 20, 32, dtype=torch.float64)
    _, k, v = project(layer, x)
    theta = layer.rotary.theta
    want = naive_layer(
        layer, x, lambda b, i, h: ([naive_rope(k[b, t, h], t, theta) for t in range(i + 1)], [v[b, t, h] for t in range(i + 1)])
    )
    torch.testing.assert_close(layer(x)[0], want, rtol=0, atol=1e-10)


OPTIONS = {  # the design options of how S enters the layer (docs/design.md), each tested alone and together
    "spec": {"ssm_residual": False},  # the definition without the options
    "fading_norm": {"fading_norm": True, "ssm_residual": False},
    "ssm_residual": {"ssm_residual": True},  # the default
    "fading_overlap": {"fading_overlap": True, "ssm_residual": False},
    "all": {"fading_norm": True, "ssm_residual": True, "fading_overlap": True},
}


DEFINITION_CASES = [(tie, decay, "spec") for tie in (True, False) for decay in (0.0, 0.7, 1.0)]
DEFINITION_CASES += [(True, 0.7, option) for option in OPTIONS if option != "spec"]


@pytest.mark.parametrize(("tie", "decay", "option"), DEFINITION_CASES)
def test_bmojo_layer_equals_the_definition(tie, decay, option):
    """Windows, fading keys, innovation, selection, lag and memory rotation, all from docs/design.md ("The model")."""
    window, fading, chunk, size, picks = 4, 3, 5, 3, 2
    layer = make_layer(
        window_size=window, fading_window=fading, memory_chunk=chunk, memory_size=size,
        memory_picks=picks, memory_decay=decay, tie_fading_projections=tie, **OPTIONS[option],
    )
    overlap = layer.fading_overlap
    horizon = max(window, fading) if overlap else window + fading  # how far back the two windows reach
    lag = 1 + -(-horizon // chunk)
    assert layer.lag == lag == (2 if overlap else 3)
    x = torch.randn(2, 41, 32, dtype=torch.float64)
    theta = layer.rotary.theta
    _, k, v = project(layer, x)
    s_out = layer.ssm(x)
    s = s_out
    if layer.ssm_norm is not None:  # RMSNorm with a non-trivial weight
        with torch.no_grad():
            layer.ssm_norm.weight.uniform_(0.5, 1.5)
        s = s_out * torch.rsqrt(s_out.pow(2).mean(-1, keepdim=True) + layer.ssm_norm.eps) * layer.ssm_norm.weight
    if layer.ssm_residual_gain is not None:
        with torch.no_grad():
            layer.ssm_residual_gain.normal_()
    kf_proj = layer.k_proj if tie else layer.k_fading_proj
    vf_proj = layer.v_proj if tie else layer.v_fading_proj
    kf = kf_proj(s).view(2, 41, layer.kv_heads, -1)
    vf = vf_proj(s).view(2, 41, layer.kv_heads, -1)
    s_prev = torch.cat([torch.zeros_like(s[:, :1]), s[:, :-1]], dim=1)
    k_hat = layer.innovation_proj(s_prev).view_as(k)
    innovation = (k - k_hat).pow(2).mean(dim=(-2, -1))
    memory = [naive_memory_selection(innovation[b].tolist(), chunk, picks, size, decay) for b in range(2)]

    def keys_for_query(b, i, h):
        ctx = range(max(0, i - window + 1), i + 1)
        fade = range(max(0, i - fading + 1), i + 1) if overlap else range(max(0, i - window - fading + 1), i - window + 1)
        keys = [naive_rope(k[b, t, h], t, theta) for t in ctx] + [naive_rope(kf[b, t, h], t, theta) for t in fade]
        values = [v[b, t, h] for t in ctx] + [vf[b, t, h] for t in fade]
        j = i // chunk
        if j - lag >= 0:
            at = max(0, j * chunk - horizon)
            for p in memory[b][j - lag]:
                assert p // chunk + lag <= j and i - p > horizon  # the lag rule
                keys.append(naive_rope(k[b, p, h], at, theta))
                values.append(v[b, p, h])
        return keys, values

    got, mean_innovation = layer(x)
    want = naive_layer(layer, x, keys_for_query)
    if layer.ssm_residual_gain is not None:
        want = want + layer.ssm_residual_gain * s_out
    torch.testing.assert_close(mean_innovation, innovation.mean(), rtol=0, atol=1e-12)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


class _FixedOutput(torch.nn.Module):
    """Stands in for a layer's SSM: returns a given output, so gradients with respect to it can be read."""

    def __init__(self, s: torch.Tensor) -> None:
        super().__init__()
        self.s = s

    def forward(self, x: torch.Tensor, state=None) -> torch.Tensor:
        return self.s


@pytest.mark.parametrize("option", ["spec", "fading_overlap", "ssm_residual"])
def test_which_ssm_outputs_reach_a_query(option):
    """In the definition, query i reads the SSM output S_t only for t in (i - w - w_f, i - w]: never S_i, the
    one state that has read the query token, so a B layer cannot pass on its SSM's recall as an M layer does.
    Overlapping fading keys read S_t for t in (i - w_f, i]; the residual gain passes S_i straight on."""
    window, fading = 4, 3
    layer = make_layer(window_size=window, fading_window=fading, memory_chunk=5, **OPTIONS[option])
    if layer.ssm_residual_gain is not None:
        with torch.no_grad():
            layer.ssm_residual_gain.fill_(1.0)  # as it is once training has moved it off 0
    x = torch.randn(1, 30, 32, dtype=torch.float64)
    s = layer.ssm(x).detach().requires_grad_()
    layer.ssm = _FixedOutput(s)
    out, _ = layer(x)
    i = 25
    grad = torch.autograd.grad(out[0, i].sum(), s)[0][0]
    reached = set(torch.nonzero(grad.abs().amax(-1) > 0).flatten().tolist())
    want = {
        "spec": set(range(i - window - fading + 1, i - window + 1)),
        "fading_overlap": set(range(i - fading + 1, i + 1)),
        "ssm_residual": set(range(i - window - fading + 1, i - window + 1)) | {i},
    }[option]
    assert reached == want


def _states(innovation: torch.Tensor, chunk: int, picks: int, size: int, decay: float) -> list[MemoryState]:
    batch, length = innovation.shape
    k = torch.arange(length, dtype=torch.float64).view(1, length, 1, 1).expand(batch, length, 1, 2).clone()
    stacked = memory_after_each_chunk(k, k.clone(), innovation, chunk=chunk, picks=picks, size=size, decay=decay)
    return [stacked.at(j) for j in range(length // chunk)]


def _sequential_states(k, v, innovation, chunk, picks, size, decay) -> list[MemoryState]:
    """The memory after each chunk by merging one chunk at a time (what the decode cache does)."""
    memory = MemoryState.empty(k.shape[0], size, k.shape[2], k.shape[3], k)
    states = []
    for j in range(k.shape[1] // chunk):
        part = slice(j * chunk, (j + 1) * chunk)
        memory = update_memory(memory, k[:, part], v[:, part], innovation[:, part], j * chunk, j, picks, decay)
        states.append(memory)
    return states


@pytest.mark.parametrize("decay", [0.0, 0.5, 0.99, 1.0])
@pytest.mark.parametrize("block_elements", [None, 40])  # 40: blocks of one or two chunks
def test_all_chunks_at_once_equal_merging_chunk_by_chunk(decay, block_elements, monkeypatch):
    """The batched selection keeps the same tokens, in the same slots, with the same vectors."""
    if block_elements:
        monkeypatch.setattr(eidetic_memory, "BLOCK_ELEMENTS", block_elements)
    gen = torch.Generator().manual_seed(11)
    batch, length, chunk, picks, size = 3, 83, 4, 3, 7
    k = torch.randn(batch, length, 2, 4, generator=gen)
    v = torch.randn(batch, length, 2, 4, generator=gen)
    innovation = torch.rand(batch, length, generator=gen)
    innovation[1] = (innovation[1] * 3).floor()  # exact ties, and zeros (which still beat empty slots)
    stacked = memory_after_each_chunk(k, v, innovation, chunk=chunk, picks=picks, size=size, decay=decay)
    want = _sequential_states(k, v, innovation, chunk, picks, size, decay)
    assert stacked.position.shape == (batch, length // chunk, size)
    for j, state in enumerate(want):
        got = stacked.at(j)
        for name in ("position", "pick_chunk", "innovation", "k", "v"):
            assert torch.equal(getattr(got, name), getattr(state, name)), (j, name)


@pytest.mark.parametrize("decay", [0.0, 0.3, 0.9, 1.0])
@pytest.mark.parametrize("levels", [None, 3])  # 3 levels: many exact ties
def test_retention_keeps_exactly_the_entries_of_the_scoring_rule(decay, levels):
    gen = torch.Generator().manual_seed(7)
    innovation = torch.rand(3, 64, generator=gen, dtype=torch.float64)
    if levels:
        innovation = (innovation * levels).floor() / levels + 0.1
    chunk, picks, size = 6, 2, 5
    states = _states(innovation, chunk, picks, size, decay)
    for b in range(3):
        want = naive_memory_selection(innovation[b].tolist(), chunk, picks, size, decay)
        got = [sorted(p for p in s.position[b].tolist() if p >= 0) for s in states]
        assert got == want
        for s in states:  # the stored vectors are those of the stored positions
            valid = s.position[b] >= 0
            assert torch.equal(s.k[b, valid, 0, 0], s.position[b, valid].double())


def test_zero_decay_is_a_fifo_of_the_most_recent_picks():
    innovation = torch.rand(2, 50, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    chunk, picks, size = 5, 2, 5
    states = _states(innovation, chunk, picks, size, 0.0)
    for b in range(2):
        all_picks: list[int] = []
        for j, state in enumerate(states):
            in_chunk = range(j * chunk, (j + 1) * chunk)
            all_picks += sorted(in_chunk, key=lambda t: (-innovation[b, t].item(), t))[:picks]
            most_recent = sorted(all_picks)[-size:]
            assert sorted(p for p in state.position[b].tolist() if p >= 0) == most_recent


@pytest.mark.parametrize("length", [12, 40])  # 12: more slots than tokens (gathered heads-first); 40: fewer
def test_memory_gathered_heads_first_equals_the_gathered_memory_transposed(length):
    """`gather_memory_by_head` returns `gather_memory`'s keys and values (zero for empty slots) as
    (batch, kv_heads, n_chunks, M, D), and passes the same gradients back to the sequence."""
    g = torch.Generator().manual_seed(4)
    batch, kv_heads, head_dim, chunks, size = 2, 3, 4, 3, 5
    k = torch.randn(batch, length, kv_heads, head_dim, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(batch, length, kv_heads, head_dim, generator=g, dtype=torch.float64, requires_grad=True)
    position = torch.randint(0, length, (batch, chunks, size), generator=g)
    position[0, 0] = -1  # a chunk with an empty memory
    position[1, 2, :2] = -1  # and a partly filled one
    selection = eidetic_memory.Selection(position, torch.rand(batch, chunks, size, generator=g), position.clone())
    mem_k, mem_v = eidetic_memory.gather_memory_by_head(k, v, selection)
    seen = eidetic_memory.gather_memory(k, v, selection)
    expected_k, expected_v = seen.k.permute(0, 3, 1, 2, 4), seen.v.permute(0, 3, 1, 2, 4)
    assert mem_k.shape == (batch, kv_heads, chunks, size, head_dim)
    assert torch.equal(mem_k, expected_k) and torch.equal(mem_v, expected_v)
    assert not mem_k[0, :, 0].any() and not mem_v[1, :, 2, :2].any()
    weights = torch.randn(2, *mem_k.shape, generator=g, dtype=torch.float64)
    ours = torch.autograd.grad((mem_k * weights[0]).sum() + (mem_v * weights[1]).sum(), (k, v))
    reference = torch.autograd.grad((expected_k * weights[0]).sum() + (expected_v * weights[1]).sum(), (k, v))
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_visible_memory_follows_the_lag():
    innovation = torch.rand(1, 40, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    states = _states(innovation, 4, 2, 3, 0.5)
    stacked = MemoryState(*(torch.stack(parts, dim=1) for parts in zip(*(s._tensors() for s in states))))
    seen = visible_memory(stacked, n_chunks=10, lag=3)
    for j in range(10):
        if j < 3:
            assert not seen.valid[0, j].any()
        else:
            assert torch.equal(seen.position[0, j], states[j - 3].position[0])
            assert all(p // 4 + 3 <= j for p in seen.position[0, j].tolist())


def test_innovation_is_zero_prediction_at_the_first_token():
    layer = make_layer()
    x = torch.randn(1, 1, 32, dtype=torch.float64)
    _, k, _ = project(layer, x)
    _, mean_innovation = layer(x)
    torch.testing.assert_close(mean_innovation, k.pow(2).mean(), rtol=0, atol=1e-12)


class _FullSizeOps(TorchDispatchMode):
    """Names of the ops that make a tensor of `numel` elements, forward and backward."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.names = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        made = isinstance(out, torch.Tensor) and out.numel() == self.numel and not out._is_view()
        if made and func is not torch.ops.aten.detach.default:
            self.names.append(func.overloadpacket.__name__)
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_next_token_innovation_scores_shifted_keys_without_copying_them(dtype):
    """``e_t = mean((P(S_{t-1}) - K_t)^2)``, ``e_0 = mean(K_0^2)``: an eager run gives the plain formula's bits,
    scores and predictor gradient (row L - 1 predicts past the sequence: zero), but makes no shifted copy of the
    keys forward and writes the gradient in one product backward."""
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(3, 37, 2, 8, generator=gen, dtype=dtype)
    predicted = torch.randn(3, 37, 2, 8, generator=gen, dtype=dtype, requires_grad=True)
    weights = torch.randn(3, 37, generator=gen, dtype=dtype)
    with fused_kernels_disabled():  # the ops a traced graph keeps
        want = eidetic_memory.next_token_innovation(keys, predicted)
        (want_grad,) = torch.autograd.grad(want, predicted, weights)
    with _FullSizeOps(keys.numel()) as made:
        got = eidetic_memory.next_token_innovation(keys, predicted)
        forward = list(made.names)
        (got_grad,) = torch.autograd.grad(got, predicted, weights)
    assert torch.equal(got, want) and torch.equal(got_grad, want_grad)
    shifted = torch.cat([torch.zeros_like(predicted[:, :1]), predicted[:, :-1]], dim=1)
    torch.testing.assert_close(got, (shifted - keys).pow(2).mean(dim=(-2, -1)), rtol=0, atol=1e-6)
    assert not got_grad[:, -1].any()
    assert "cat" not in forward, forward
    assert len(made.names) - len(forward) == 1, made.names  # the gradient, written by one product


def test_padded_blocks_do_not_leak_into_short_sequences():
    layer = make_layer(layer_pattern="F", window_size=16, fading_window=8)
    x = torch.randn(1, 37, 32, dtype=torch.float64)
    full, _ = layer(x)
    prefix, _ = layer(x[:, :21])
    torch.testing.assert_close(full[:, :21], prefix, rtol=0, atol=1e-12)
    assert F.mse_loss(full, torch.zeros_like(full)) > 0


def _output_and_gradients(layer: BMojoAttention, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The layer's output and the gradients of every parameter and of `x` (zeros where none reaches them) of a
    loss reading the output and the mean innovation."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    out, mean_innovation = layer(x)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    ((out * weights).sum() + mean_innovation).backward()
    grads = {name: p.grad if p.grad is not None else torch.zeros_like(p) for name, p in layer.named_parameters()}
    return out.detach(), {**grads, "x": x.grad}


@pytest.mark.parametrize(("tie", "overlap", "qk_norm"), [(True, False, False), (False, False, True), (True, True, False)])
def test_fading_keys_are_projected_only_where_read_with_the_same_output_and_gradients(tie, overlap, qk_norm,
                                                                                        monkeypatch):
    """Without a decode cache the fading keys of the last `window` positions are never read (without
    fading_overlap): they are not projected, and the output and every gradient equal those of projecting every
    position. Lengths: under the window (no fading band), equal to it, inside the fading band's first reach,
    and not a multiple of the attention's block (16) over several memory chunks."""
    from bmojo_neuron.layers import attention

    window = 4
    layer = make_layer(window_size=window, fading_window=3, tie_fading_projections=tie, fading_overlap=overlap,
                       qk_norm=qk_norm).train()
    fading_proj = layer.k_proj if tie else layer.k_fading_proj
    rows_seen = []
    fading_proj.register_forward_hook(lambda module, args, out: rows_seen.append(args[0].shape[1]))
    for length in (3, 4, 6, 41):
        x = torch.randn(2, length, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(length))
        rows_seen.clear()
        got, got_grads = _output_and_gradients(layer, x)
        read = length if overlap else max(0, length - window)
        assert rows_seen == ([length] if tie else []) + ([read] if read else []), (length, rows_seen)
        with monkeypatch.context() as every_position:
            every_position.setattr(attention, "eager_untraced", lambda *tensors: False)
            want, want_grads = _output_and_gradients(layer, x)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
        for name, grad in want_grads.items():
            torch.testing.assert_close(got_grads[name], grad, rtol=0, atol=1e-12, msg=lambda m: f"{name}, L={length}: {m}")


@pytest.mark.parametrize("tie", [True, False])
def test_cut_fading_keys_reach_the_attention_in_its_layout_from_one_copy_of_the_read_rows(tie, monkeypatch):
    """The cut fading path copies the rows it reads once (both projections read that copy, not each a strided
    slice of its own), and pads keys and values heads first: the attention op gets contiguous (batch, kv_heads,
    L, D) tensors, which it reads without copying them again."""
    from bmojo_neuron.layers import attention

    layer = make_layer(window_size=4, fading_window=3, tie_fading_projections=tie)
    inputs, handed = [], {}
    fading_proj = layer.k_proj if tie else layer.k_fading_proj
    fading_proj.register_forward_hook(lambda module, args, out: inputs.append(args[0]))
    op = attention.ops.eidetic_attention

    def spy(q, k, v, k_fading, v_fading, *rest, **kwargs):
        handed.update(k_fading=k_fading, v_fading=v_fading)
        return op(q, k, v, k_fading, v_fading, *rest, **kwargs)

    monkeypatch.setattr(attention.ops, "eidetic_attention", spy)
    layer(torch.randn(2, 11, 32, dtype=torch.float64))
    cut = inputs[-1]
    assert cut.shape[1] == 11 - 4 and cut.is_contiguous()
    for name, t in handed.items():
        assert t.shape == (2, layer.kv_heads, 11, layer.head_dim) and t.is_contiguous(), name


def test_a_sequence_no_chunk_of_which_reads_a_memory_selects_none(monkeypatch):
    """Chunk j reads the memory after chunk j - lag: with at most `lag` chunks (15 tokens, chunks of 5, lag 3) no
    chunk reads one, so nothing is selected or gathered; the outputs equal the first 15 of a 16-token sequence's
    (whose fourth chunk reads a memory), and the innovation predictor's gradient equals the definition's
    (``K_hat_t = P(S_{t-1})``, zero at t = 0) at both lengths. A traced graph keeps the selection at every length
    (`fused_kernels_disabled` runs the ops it is traced from)."""
    layer = make_layer(window_size=4, fading_window=3, memory_chunk=5, memory_size=3, memory_picks=2)
    assert layer.lag == 3
    selected = []
    select = eidetic_memory.select_memory
    monkeypatch.setattr("bmojo_neuron.layers.attention.select_memory", lambda *a, **k: selected.append(1) or select(*a, **k))
    x = torch.randn(2, 16, 32, dtype=torch.float64)
    weight = layer.innovation_proj.weight
    outputs = {}
    for length in (15, 16):
        selected.clear()
        got, mean_innovation = layer(x[:, :length])
        assert len(selected) == (length > 15)
        s = layer.ssm(x[:, :length])
        s_prev = torch.cat([torch.zeros_like(s[:, :1]), s[:, :-1]], dim=1).detach()
        _, k, _ = project(layer, x[:, :length])
        want = (k.detach() - layer.innovation_proj(s_prev).view_as(k)).pow(2).mean()
        torch.testing.assert_close(mean_innovation, want, rtol=0, atol=1e-12)
        (grad,) = torch.autograd.grad(mean_innovation, weight)
        torch.testing.assert_close(grad, torch.autograd.grad(want, weight)[0], rtol=0, atol=1e-12)
        outputs[length] = got
    torch.testing.assert_close(outputs[15], outputs[16][:, :15], rtol=0, atol=1e-12)
    selected.clear()
    with fused_kernels_disabled():
        traced, _ = layer(x[:, :15])
    assert len(selected) == 1
    torch.testing.assert_close(traced, outputs[15], rtol=0, atol=1e-12)
