"""AWS's own NKI 0.2 kernels, run unchanged in the emulator (standing in for `nki`) from a checkout.

Sources: aws-neuron/aws-neuron-sdk at 3c46990d (the 0.2-API examples) and aws-neuron/nki-library
at 0759719 (the release matching SDK 2.28). Nothing of theirs is copied here: the tests export the
files from a local git clone named by an environment variable and import them from there; without
one (CI has no network) they skip, saying which variable to set:

    BMOJO_AWS_NEURON_SDK=/path/to/aws-neuron-sdk.git BMOJO_NKI_LIBRARY=/path/to/nki-library.git pytest ...

docs/kernels.md ("Conformance") records which kernels ran, which matched their references, and why
the others cannot run on NeuronCore-v2. The emulator fixes these kernels needed are tested by our
own small kernels in test_nki_rules.py / test_nki_language.py.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from nki_kernels.emulator import NKILanguageWarning, NKILoopDependencyWarning, NKIRuleError, as_nki, frontend, nki

SDK_COMMIT = "3c46990de45d2ed76e22fe5990f8dcb6a7763f00"
LIBRARY_COMMIT = "0759719"
BF16 = ml_dtypes.bfloat16


def _export(env: str, commit: str, paths: list[str], dest: Path) -> Path:
    """`git archive` `paths` of `commit` from the clone named by $env into dest (or skip)."""
    repo = os.environ.get(env)
    if not repo:
        pytest.skip(f"AWS kernel sources not available: set {env} to a git clone of the repository "
                    f"(commit {commit}); CI has no network")
    try:
        blob = subprocess.run(["git", "-C", repo, "archive", commit, *paths], check=True, capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"{env}={repo}: cannot export {commit}: {exc}")
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def _import(root: Path, module: str):
    """Import `module` from the checkout at `root` with the emulator installed as `nki`."""
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    with as_nki():
        return importlib.import_module(module)


@pytest.fixture(scope="module")
def sdk(tmp_path_factory) -> Path:
    out = _export("BMOJO_AWS_NEURON_SDK", SDK_COMMIT, ["nki/examples"], tmp_path_factory.mktemp("sdk"))
    return out / "nki" / "examples"


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> Path:
    return _export("BMOJO_NKI_LIBRARY", LIBRARY_COMMIT, ["src"], tmp_path_factory.mktemp("nkilib")) / "src"


@contextlib.contextmanager
def _no_language_warning():
    """A kernel run whose front-end check (done before every run) must find no error and no warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", NKILanguageWarning)
        yield


def _kernels(module) -> list:
    return [v for v in vars(module).values() if getattr(v, "__nki_jit__", False)]


def _on_trn1(kernel):
    """`kernel`'s function jitted for trn1. nki-library decorates kernels that run on v2 with
    `platform_target="trn2"`, which the emulator refuses; its own harness compiles a kernel for the target it
    is given (`test/utils/kernel_tracer.py` lines 134-136, 154-158 at 0759719; `--platform_target`, trn1
    among its `Platforms`), which this stands for."""
    assert kernel.__nki_platform_target__ in ("trn2", "trn3"), kernel
    return nki.jit(kernel.__nki_func__, platform_target="trn1")


RNG = np.random.default_rng(0)


# ----------------------------------------------------------------------------- aws-neuron-sdk examples
def test_tensor_addition_example(sdk):
    mod = _import(sdk, "tensor_addition.tensor_addition_nki_kernels")
    a, b = RNG.random((256, 1024)).astype(BF16), RNG.random((256, 1024)).astype(BF16)
    out = mod.nki_tensor_add(a, b)
    expected = (a.astype(np.float32) + b.astype(np.float32)).astype(BF16)
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("name,shape", [
    ("nki_matmul_basic_", (64, 128, 512)), ("nki_matmul_tiled_", (256, 256, 1024)),
    ("nki_matmul_hoist_load_", (256, 256, 1024)), ("nki_matmul_block_free_dimension_", (256, 256, 1024)),
    ("nki_matmul_fully_optimized_", (2048, 1024, 1024)),  # its smallest legal shape (blocks of 16x2x8 tiles)
])
def test_matrix_multiplication_examples(sdk, name, shape):
    """All five kernels of the tutorial, bf16 as its torch driver runs them, checked as it checks them:
    allclose(torch.matmul, out, atol=1e-4, rtol=1e-2) (matrix_multiplication_torch.py)."""
    mod = _import(sdk, "matrix_multiplication.matrix_multiplication_nki_kernels")
    m, k, n = shape
    lhs, rhs = RNG.random((m, k)).astype(BF16), RNG.random((k, n)).astype(BF16)
    out = getattr(mod, name)(np.ascontiguousarray(lhs.T), rhs).astype(np.float64)
    expected = lhs.astype(np.float64) @ rhs.astype(np.float64)
    assert np.allclose(expected, out, atol=1e-4, rtol=1e-2)


# ----------------------------------------------------------------------------- nki-library
def test_cumsum(library):
    """Reference and tolerances of nki-library's test_cumsum.py: fp32 cumsum cast to the input dtype,
    absolute 1e-3, relative 1e-3 (fp32) / 1e-2 (bf16); shapes from its fast set (two partition tiles)."""
    mod = _import(library, "nkilib_src.nkilib.core.cumsum.cumsum")
    for shape, dtype, rtol in (((64, 4, 2048), BF16, 1e-2), ((130, 1024), np.float32, 1e-3)):
        x = RNG.standard_normal(shape).astype(dtype)
        out = mod.cumsum(x)
        golden = np.cumsum(x.astype(np.float32), axis=-1).astype(dtype)
        assert out.dtype == golden.dtype
        assert np.allclose(out.astype(np.float32), golden.astype(np.float32), atol=1e-3, rtol=rtol)


def test_cascaded_max(library):
    """nki-library's test_cascaded_max.py: inputs randn(batch, seqlen, vocab) with seed 42, reference
    torch.max(dim=-1, keepdim=True) (values, int32 indices), tolerance 1e-5 (here exact). Shapes from its
    LNC-1 unit set: one partition tile, several, the Llama-3 vocab slices, and an odd vocab."""
    mod = _import(library, "nkilib_src.nkilib.core.max.cascaded_max")
    for batch, seqlen, vocab in ((1, 1, 3168), (8, 5, 4058), (4, 5, 8192), (1, 1, 16000), (65, 1, 3168),
                                 (1, 127, 3999)):
        np.random.seed(42)
        x = np.random.randn(batch, seqlen, vocab).astype(np.float32)
        values, indices = mod.cascaded_max(x)
        np.testing.assert_array_equal(values, x.max(axis=-1, keepdims=True))
        np.testing.assert_array_equal(indices.astype(np.int64), x.argmax(axis=-1)[..., None])


def test_cascaded_max_bf16_needs_neuroncore_v4(library):
    """Its bf16 sweep cases write nc_matmul results in bf16 to PSUM, which [isa] nc_matmul allows from
    NeuronCore-v4 on; on v2 the emulator rejects them as neuronx-cc would."""
    mod = _import(library, "nkilib_src.nkilib.core.max.cascaded_max")
    with pytest.raises(NKIRuleError, match="nc_matmul: dst must be a float32 PSUM tile on NeuronCore-v2"):
        mod.cascaded_max(RNG.standard_normal((2, 1, 256)).astype(BF16))


def _rotate_half(x: np.ndarray, sign: int) -> np.ndarray:
    half = x.shape[-1] // 2
    return np.concatenate((-sign * x[..., half:], sign * x[..., :half]), axis=-1)


@pytest.mark.parametrize("dtype,backward,packed", [
    (np.float32, False, False), (BF16, False, False), (np.float32, True, False), (np.float32, False, True),
])
def test_rope_hf(library, dtype, backward, packed):
    """nki-library's test_rope_hf.py golden, computed in the input dtype: forward q·cos + rotate_half(q)·sin,
    backward q·cos + rotate_half⁻¹(q·sin); cos/sin separate (batch, seq, d) or one packed rope_cache
    (seq, 2d); abs and rel tolerance 1e-6. Shapes: its GQA case (32/8 heads) cut to 4/2 heads, and d 64."""
    mod = _import(library, "nkilib_src.nkilib.core.embeddings.rope_hf")
    for batch, q_heads, kv_heads, seq, d in ((1, 4, 2, 256, 128), (2, 2, 1, 128, 64)):
        q = RNG.standard_normal((batch, q_heads, seq, d)).astype(dtype)
        k = RNG.standard_normal((batch, kv_heads, seq, d)).astype(dtype)
        if packed:
            cache = RNG.standard_normal((seq, 2 * d)).astype(dtype)
            tables, cos, sin = {"rope_cache": cache}, cache[None, :, :d], cache[None, :, d:]
        else:
            cos, sin = (RNG.standard_normal((batch, seq, d)).astype(dtype) for _ in range(2))
            tables = {"cos": cos, "sin": sin}
        q_out, k_out = mod.rope_hf(q, k, np.zeros_like(q), np.zeros_like(k), backward=backward, **tables)
        cos, sin = cos[:, None], sin[:, None]
        for out, x in ((q_out, q), (k_out, k)):
            golden = x * cos + _rotate_half(x * sin, -1) if backward else x * cos + _rotate_half(x, 1) * sin
            assert out.dtype == golden.dtype
            assert np.allclose(out.astype(np.float64), golden.astype(np.float64), atol=1e-6, rtol=1e-6)


def _run_subkernel(kernel, *args, **kwargs):
    """nki-library's test framework jits a sub-kernel (no @nki.jit of its own) itself: simulate it."""
    with as_nki():
        return nki.simulate_kernel(kernel, *args, **kwargs)


@pytest.mark.parametrize("batch,seqlen,hidden,hidden_actual,dtype", [
    (1, 1, 8192, None, np.float16), (1, 8, 8192, None, np.float16), (1, 1, 4096, 3072, np.float16),
    (2, 8, 8192, None, np.float16), (128, 1, 8192, None, np.float16), (4, 8, 8192, None, np.float32),
])
def test_rmsnorm_tkg(library, batch, seqlen, hidden, hidden_actual, dtype):
    """nki-library's test_rmsnorm_tkg.py: inputs randn with seed 42, its own torch reference for the
    single-core output layout (rmsnorm_torch.rmsnorm_tkg_torch_ref_lnc1: fp32 RMSNorm, (128, B·S, H/128)),
    rtol 2e-2, atol 1e-5. Shapes: its LNC-1 unit cases that take the v2 path, and its larger batches."""
    import torch

    mod = _import(library, "nkilib_src.nkilib.core.subkernels.rmsnorm_tkg")
    reference = importlib.import_module("nkilib_src.nkilib.core.subkernels.rmsnorm_torch")
    np.random.seed(42)
    x = np.random.randn(batch, seqlen, hidden).astype(dtype)
    gamma = np.random.randn(1, hidden).astype(dtype)
    out = np.zeros((128, batch * seqlen, hidden // 128), dtype=dtype)
    result = _run_subkernel(mod.rmsnorm_tkg, x, gamma, out, hidden_actual=hidden_actual)
    golden = reference.rmsnorm_tkg_torch_ref_lnc1(torch.from_numpy(x), torch.from_numpy(gamma), torch.from_numpy(out),
                                                  hidden_actual=hidden_actual)["out"].float().numpy()
    assert result.dtype == dtype and result.shape == golden.shape
    assert np.allclose(result.astype(np.float32), golden, rtol=2e-2, atol=1e-5)


def test_rmsnorm_tkg_hidden_dim_tp(library):
    """Its hidden_dim_tp layout loads the input with nisa.dma_transpose; checked against the same torch
    reference with hidden_dim_tp=True, rtol 2e-2, atol 1e-5 (its test's tolerances)."""
    import torch

    mod = _import(library, "nkilib_src.nkilib.core.subkernels.rmsnorm_tkg")
    reference = importlib.import_module("nkilib_src.nkilib.core.subkernels.rmsnorm_torch")
    np.random.seed(42)
    x, gamma = np.random.randn(1, 8, 4096).astype(np.float16), np.random.randn(1, 4096).astype(np.float16)
    out = np.zeros((128, 8, 32), dtype=np.float16)
    result = _run_subkernel(mod.rmsnorm_tkg, x, gamma, out, hidden_dim_tp=True)
    golden = reference.rmsnorm_tkg_torch_ref_lnc1(torch.from_numpy(x), torch.from_numpy(gamma), torch.from_numpy(out),
                                                  hidden_dim_tp=True)["out"].float().numpy()
    assert np.allclose(result.astype(np.float32), golden, rtol=2e-2, atol=1e-5)


def test_rmsnorm_tkg_path_that_needs_a_later_neuroncore(library):
    """Its few-token path for H <= 2048 transposes fp16 on the PE array into an fp16 PSUM tile (bf16/fp16
    transpose mode is NeuronCore-v3 on: [lib] qkv_cte_utils.py; v2 writes fp32)."""
    mod = _import(library, "nkilib_src.nkilib.core.subkernels.rmsnorm_tkg")
    x, gamma = RNG.standard_normal((1, 4, 2048)).astype(np.float16), RNG.standard_normal((1, 2048)).astype(np.float16)
    with pytest.raises(NKIRuleError, match="nc_transpose: a Tensor-engine transpose writes a float32 PSUM tile"):
        _run_subkernel(mod.rmsnorm_tkg, x, gamma, np.zeros((128, 4, 16), np.float16))


def test_rope(library):
    """nki-library's RoPE (x (d, B, N, S), cos/sin (d/2, B, S), contiguous halves): out = x·cos + rotate_half(x)·sin,
    written here in NumPy; its test's tolerances (test_rope.py: rtol bf16 eps, atol 1e-3). d 64, 2 heads, S 128."""
    mod = _import(library, "nkilib_src.nkilib.core.embeddings.rope")
    x = RNG.standard_normal((64, 1, 2, 128)).astype(np.float32)
    cos, sin = (RNG.standard_normal((32, 1, 128)).astype(np.float32) for _ in range(2))
    with _no_language_warning():
        out = mod.RoPE(x, cos, sin)
    c, s_ = cos[:, :, None, :], sin[:, :, None, :]
    golden = np.concatenate((x[:32] * c - x[32:] * s_, x[32:] * c + x[:32] * s_))
    assert np.allclose(out, golden, rtol=2 ** -7, atol=1e-3)


def test_qkv_and_output_projection_tkg(library):
    """Two token-generation projections, bf16 inputs uniform in [0, 1) as their tests draw them (np_random_sample),
    against x @ W in float64 with their tests' tolerances (rtol 2e-2, atol 1e-5; test_qkv_tkg.py,
    test_output_proj_tkg.py). qkv: input (B, S, H), fused weights (H, (Nq + 2 Nkv)·d), layout BSD (no norm, bias or
    RoPE). output_projection_tkg: attention (d, B, N, S), weight (N·d, H)."""
    qkv = _import(library, "nkilib_src.nkilib.core.qkv.qkv")
    x, w = RNG.random((1, 4, 512)).astype(BF16), RNG.random((512, 384)).astype(BF16)
    golden = x.astype(np.float64) @ w.astype(np.float64)
    with _no_language_warning():
        out = qkv.qkv(x, w).astype(np.float64)
    assert np.allclose(out, golden, rtol=2e-2, atol=1e-5)

    proj = _import(library, "nkilib_src.nkilib.core.output_projection.output_projection_tkg")
    attention, weight = RNG.random((64, 1, 2, 4)).astype(BF16), RNG.random((128, 256)).astype(BF16)
    flat = attention.astype(np.float64).transpose(1, 3, 2, 0).reshape(4, 128)
    with _no_language_warning():
        out = proj.output_projection_tkg(attention, weight).astype(np.float64)
    assert np.allclose(out.reshape(4, 256), flat @ weight.astype(np.float64), rtol=2e-2, atol=1e-5)


def test_attention_cte(library):
    """nki-library's context-encoding attention, causal, scale 0.5, fp32 inputs uniform in [0, 1) as its test draws
    them (np_random_sample), its default layouts q (B, S, d), k (B, d, S), v (B, S, d), against softmax(q·k·scale)·v
    in float64 with its test's tolerances (rtol 2e-2, atol 1e-5). S 512, d 128: one section of its K/V loop."""
    mod = _import(library, "nkilib_src.nkilib.core.attention.attention_cte")
    q, k, v = (RNG.random(shape, dtype=np.float32) for shape in ((1, 512, 128), (1, 128, 512), (1, 512, 128)))
    with _no_language_warning():
        out = mod.attention_cte(q, k, v, scale=0.5)
    scores = np.where(np.tril(np.ones((512, 512), bool)), q[0].astype(np.float64) @ k[0] * 0.5, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    golden = (weights / weights.sum(-1, keepdims=True)) @ v[0]
    assert np.allclose(out[0], golden, rtol=2e-2, atol=1e-5)


def test_attention_bwd_needs_neuroncore_v3(library):
    """nki-library's attention_bwd (its smallest fast-test shape cut to L 512, fp32, causal; inputs o and lse
    from its own torch helper compute_o_lse) parses and runs until it copies PSUM to SBUF on the Scalar
    engine (`transpose_tiles(..., engine=nisa.scalar_engine)`, unconditional), which [isa] tensor_copy
    does not support on NeuronCore-v2. It targets v3 and later; on v2 it cannot run."""
    import torch

    mod = _import(library, "nkilib_src.nkilib.core.attention.attention_bwd")
    reference = importlib.import_module("nkilib_src.nkilib.core.attention.attention_bwd_torch")
    q, dy = (RNG.standard_normal((1, 1, 128, 512)).astype(np.float32) for _ in range(2))
    k, v = (RNG.standard_normal((1, 1, 128, 512)).astype(np.float32) for _ in range(2))
    o, lse, _ = reference.compute_o_lse(*(torch.from_numpy(t) for t in (q, k, v)), True, True)
    with pytest.raises(NKIRuleError, match="tensor_copy: runs on vector/gpsimd only \\(NeuronCore-v2\\) "
                                           "\\(engine=scalar\\)"):
        mod.attention_bwd(q, k, v, o.float().numpy(), dy, lse.float().numpy(), use_causal_mask=True,
                          mixed_precision=True)


def test_moe_token_gather_and_scatter(library):
    """nki-library's blockwise MoE moves each block's tokens with `.ap(vector_offset=...)` DMAs: its
    `load_hidden_states` and `load_old_block` gather rows of the (T, H) hidden states and output, and
    `store_block_output_shard_over_block_size` scatters the block back (`core/moe/moe_cte/bwmm_shard_on_I.py`
    lines 697-733, 1435-1507, 1830-1891), all with `SkipMode(skip_token=True)`: a -1 token index is out of
    bounds and skipped (oob_mode.skip; the gathered row keeps the memset 0). Run unchanged inside a small
    driver kernel, bf16 (the bits move), against NumPy indexing. The whole kernels cannot run on v2
    (test_moe_kernels_need_neuroncore_v3)."""
    mod = _import(library, "nkilib_src.nkilib.core.moe.moe_cte.bwmm_shard_on_I")
    utils = importlib.import_module("nkilib_src.nkilib.core.moe.moe_cte.moe_cte_utils")
    tokens, hidden_size, n_tiles = 300, 256, 2
    hidden, previous = (RNG.standard_normal((tokens, hidden_size)).astype(BF16) for _ in range(2))
    order = RNG.permutation(tokens)[:128 * n_tiles].astype(np.int32)
    order[[3, 200, 255]] = -1  # padding slots of the block
    token_indices = order.reshape(n_tiles, 128).T.copy()  # (128, tiles): tile t holds order[128 t: 128 (t + 1)]

    def driver(hidden, previous, token_indices):
        idx = nl.ndarray((128, n_tiles), dtype=nl.int32, buffer=nl.sbuf)
        nisa.dma_copy(dst=idx, src=token_indices)
        skip = utils.SkipMode(skip_token=True)
        block = [nl.ndarray((128, hidden_size), dtype=hidden.dtype, buffer=nl.sbuf) for _ in range(n_tiles)]
        mod.load_hidden_states(hidden, block, idx, n_tiles, hidden.dtype, skip)
        old = mod.load_old_block(previous, idx, n_tiles, previous.dtype, skip)
        out = nl.ndarray((tokens, hidden_size), dtype=previous.dtype, buffer=nl.shared_hbm)
        nisa.dma_copy(dst=out, src=previous)
        dims = mod.DimensionSizes(B=128 * n_tiles, H=hidden_size, T=tokens, E=1, N=1, I_TP=128)
        dims.derive_all_dims()
        mod.store_block_output_shard_over_block_size(out, block, idx, dims, 0, skip)
        gathered = nl.ndarray((n_tiles, 2, 128, hidden_size), dtype=hidden.dtype, buffer=nl.shared_hbm)
        for t in range(n_tiles):
            nisa.dma_copy(dst=gathered[t, 0], src=block[t])
            nisa.dma_copy(dst=gathered[t, 1], src=old[t])
        return out, gathered

    nl, nisa = mod.nl, mod.nisa
    with _no_language_warning():
        out, gathered = _run_subkernel(driver, hidden, previous, token_indices)
    valid = order >= 0
    expected_hidden = np.where(valid[:, None], hidden[order], 0).reshape(n_tiles, 128, hidden_size)
    expected_old = np.where(valid[:, None], previous[order], 0).reshape(n_tiles, 128, hidden_size)
    np.testing.assert_array_equal(gathered[:, 0], expected_hidden)
    np.testing.assert_array_equal(gathered[:, 1], expected_old)
    expected_out = previous.copy()
    expected_out[order[valid]] = hidden[order[valid]]
    np.testing.assert_array_equal(out, expected_out)


def test_moe_tkg_affinity_masking_runs_its_carried_offset_in_order(library):
    """moe_tkg's `mask_expert_affinities` (core/moe/moe_tkg/moe_tkg_affinity_masking.py) compares each local
    expert's index with `expert_offset_f` and adds 1 to it "for next iteration" inside an affine_range (lines
    259-292): a loop-carried dependency, which neuronx-cc accepts (docs/kernels.md, "Loop-carried
    dependencies"). Top-1 (T 32, E 8, 4 local experts at rank 1): it runs in order with one warning for that loop
    and matches its test's golden (moe_tkg test utils: the rank's slice, zeroed where a token chose none of
    those experts). Top-2 then stops where v2 differs: an odd k copies on the Scalar engine (line 252)."""
    mod = _import(library, "nkilib_src.nkilib.core.moe.moe_tkg.moe_tkg_affinity_masking")
    nl, nisa = mod.nl, mod.nisa
    tokens, experts, e_local, rank = 32, 8, 4, 1

    def driver(affinities, index, rank_id):
        top_k = index.shape[1]
        index_sbuf = nl.ndarray((tokens, top_k), dtype=index.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=index_sbuf, src=index)
        masked = mod.mask_expert_affinities(affinities, index_sbuf, rank_id, e_local, tokens, top_k, affinities.dtype,
                                            mask_unselected_experts=True, output_in_sbuf=True)
        out = nl.ndarray((tokens, e_local), dtype=affinities.dtype, buffer=nl.shared_hbm)
        nisa.dma_copy(dst=out, src=masked)
        return out

    affinities = RNG.random((tokens, experts)).astype(np.float32)
    rank_id = np.full((1, 1), rank, np.uint32)
    top1 = RNG.integers(0, experts, (tokens, 1)).astype(np.int32)
    with pytest.warns(NKILoopDependencyWarning, match="nisa.tensor_tensor: a loop-carried dependency in "
                                                      "affine_range: an iteration reads what another") as record:
        out = _run_subkernel(driver, affinities, top1, rank_id)
    assert [(w.filename.endswith("moe_tkg_affinity_masking.py"), w.lineno) for w in record] == [(True, 262)]
    local = slice(rank * e_local, (rank + 1) * e_local)
    expected = affinities[:, local] * (top1 == np.arange(experts)[local][None, :])
    np.testing.assert_array_equal(out, expected)
    top2 = np.stack([RNG.permutation(experts)[:2] for _ in range(tokens)]).astype(np.int32)
    with pytest.raises(NKIRuleError, match="tensor_copy: runs on vector/gpsimd only \\(NeuronCore-v2\\)"):
        _run_subkernel(driver, affinities, top2, rank_id)


def test_moe_kernels_need_neuroncore_v3(library):
    """The blockwise MoE kernels (`@nki.jit(platform_target="trn2")`), T 256, H 512, one expert, I 128, one
    block of 256 (their validation's smallest), run their gathers, then stop where NeuronCore-v2 differs: `blockwise_mm_baseline_shard_intermediate` copies PSUM
    to SBUF on the Scalar engine (bwmm_shard_on_I.py line 1676, [isa] tensor_copy: not on v2), and
    `blockwise_mm_baseline_shard_hidden` transposes bf16 on the PE array into a bf16 PSUM tile
    (experimental/moe/forward/bwmm_shard_on_H.py line 177; v2's Tensor engine writes fp32)."""
    t, h, e, i, block = 256, 512, 1, 128, 256  # one block; H 512 and blocks of 256 are its smallest legal
    hidden = RNG.standard_normal((t, h)).astype(BF16)
    affinities = RNG.random(((t + 1) * e, 1)).astype(BF16)
    gate_up = (RNG.standard_normal((e, h, 2, i)) * 0.05).astype(BF16)
    down = (RNG.standard_normal((e, i, h)) * 0.05).astype(BF16)
    args = (hidden, affinities, gate_up, down, block, np.arange(block, dtype=np.int32), np.zeros((1, 1), np.int32))
    for module, kernel, match in (
            ("core.moe.moe_cte.bwmm_shard_on_I", "blockwise_mm_baseline_shard_intermediate",
             "tensor_copy: runs on vector/gpsimd only \\(NeuronCore-v2\\) \\(engine=scalar\\)"),
            ("experimental.moe.forward.bwmm_shard_on_H", "blockwise_mm_baseline_shard_hidden",
             "nc_transpose: a Tensor-engine transpose writes a float32 PSUM tile on NeuronCore-v2")):
        mod = _import(library, "nkilib_src.nkilib." + module)
        with pytest.raises(NKIRuleError, match=r"error: @nki.jit\(platform_target='trn2'\) compiles for NeuronCore-v3"):
            getattr(mod, kernel)(*args)
        with pytest.raises(NKIRuleError, match=match):
            _on_trn1(getattr(mod, kernel))(*args)


def test_cross_entropy_forward(library):
    """nki-library's cross-entropy forward (online log-sum-exp over vocabulary chunks; its index loads use
    `.ap(scalar_offset=...)`): fp32 randn logits, its torch reference cross_entropy_forward_torch_ref (loss, lse),
    its fp32 tolerances (atol = rtol = 1e-5, test_cross_entropy_forward.py). 8 positions, V 2048 in one chunk."""
    import torch

    mod = _import(library, "nkilib_src.nkilib.experimental.loss.cross_entropy")
    reference = importlib.import_module("nkilib_src.nkilib.experimental.loss.cross_entropy_torch")
    logits = RNG.standard_normal((8, 2048)).astype(np.float32)
    targets = RNG.integers(0, 2048, 8).astype(np.int32)
    with _no_language_warning():
        loss, lse = _on_trn1(mod.cross_entropy_forward)(logits, targets, positions_per_batch=8, chunk_size=2048,
                                                         dtype=np.float32)
    golden = reference.cross_entropy_forward_torch_ref(torch.from_numpy(logits), torch.from_numpy(targets).long())
    for out, gold in zip((loss, lse), golden):
        assert np.allclose(out, gold.float().numpy(), atol=1e-5, rtol=1e-5)


def test_depthwise_conv1d(library):
    """nki-library's depthwise conv1d (implicit GEMM): img (N, C, 1, W), filter (C, 1, 1, S), feature_group_count C;
    out[n, c, 0, q] = sum_s img[n, c, 0, q + s] · filter[c, 0, 0, s], in NumPy; its test's tolerances (1e-2)."""
    mod = _import(library, "nkilib_src.nkilib.experimental.conv.depthwise_conv1d")
    img, filt = RNG.standard_normal((1, 128, 1, 256)).astype(np.float32), RNG.standard_normal((128, 1, 1, 4)).astype(
        np.float32)
    with _no_language_warning():
        out = _on_trn1(mod.depthwise_conv1d_implicit_gemm)(img, filt, feature_group_count=128)
    w = filt[:, 0, 0, :]
    golden = sum(img[..., s:s + 253] * w[None, :, None, s:s + 1] for s in range(4))
    assert np.allclose(out, golden, atol=1e-2, rtol=1e-2)


def test_rmsnorm_quant(library):
    """nki-library's RMSNorm + row fp8 quantisation: each row of (B, S, H + 4) fp8e4m3 is H quantised values then the
    4 bytes of its fp32 dequantisation scale. Reference and tolerances of its test (test_rmsnorm_quant.py,
    rmsnorm_quant_ref written here in NumPy): RMSNorm in fp32 (eps 1e-6) times gamma, scale = max|row| / 240,
    values cast to float8_e4m3; compared as its maxAllClose does, |a - b| <= rtol · max|b|, rtol 0.072 (values)
    and 0.007 (scales). bf16, 4 rows, H 512."""
    mod = _import(library, "nkilib_src.nkilib.core.rmsnorm.rmsnorm_quant")
    x, gamma = RNG.standard_normal((1, 4, 512)).astype(BF16), RNG.standard_normal((1, 512)).astype(BF16)
    with _no_language_warning():
        out = mod.rmsnorm_quant_kernel(x, gamma, mod.RmsNormQuantKernelArgs())
    assert out.shape == (1, 4, 516) and out.dtype == ml_dtypes.float8_e4m3
    values, scales = out[..., :512].astype(np.float32), np.ascontiguousarray(out[..., 512:]).view(np.float32)
    xf = x.astype(np.float32)
    norm = xf / (np.sqrt(np.mean(np.square(xf), axis=-1, keepdims=True)) + 1e-6) * gamma.astype(np.float32)
    golden_scales = np.abs(norm).max(axis=-1, keepdims=True) / 240.0
    golden = (norm / golden_scales).astype(ml_dtypes.float8_e4m3).astype(np.float32)
    assert np.abs(values - golden).max() <= 0.072 * np.abs(golden).max()
    assert np.abs(scales - golden_scales).max() <= 0.007 * np.abs(golden_scales).max()


# ----------------------------------------------------------------------------- the front end accepts them
FRONT_END_MODULES = [
    ("sdk", "tensor_addition.tensor_addition_nki_kernels"),
    ("sdk", "matrix_multiplication.matrix_multiplication_nki_kernels"),
    ("library", "nkilib_src.nkilib.core.cumsum.cumsum"),
    ("library", "nkilib_src.nkilib.core.embeddings.rope_hf"),
    ("library", "nkilib_src.nkilib.core.max.cascaded_max"),
    ("library", "nkilib_src.nkilib.core.attention.attention_bwd"),
    ("library", "nkilib_src.nkilib.core.subkernels.rmsnorm_tkg"),  # a sub-kernel: its test framework jits it
]
# The kernels tested since (RoPE, qkv, output_projection_tkg, attention_cte, cross_entropy_forward,
# depthwise_conv1d) run under `_no_language_warning`: the run's own front-end check then stands for this test.
SUBKERNELS = {"nkilib_src.nkilib.core.subkernels.rmsnorm_tkg": "rmsnorm_tkg"}


@pytest.mark.parametrize("source,module", FRONT_END_MODULES)
def test_front_end_finds_nothing_in_aws_kernels(request, source, module):
    """The language front end's reference set: AWS's 0.2 kernels raise no error and no warning."""
    mod = _import(request.getfixturevalue(source), module)
    functions = [k.__nki_func__ for k in _kernels(mod)]
    if module in SUBKERNELS:
        functions.append(getattr(mod, SUBKERNELS[module]))
    assert functions
    with warnings.catch_warnings():
        warnings.simplefilter("error", NKILanguageWarning)
        for function in functions:
            assert frontend._Checker().run(function) == [], function.__name__
