"""Run every top-level kernel of AWS's nki-library (0759719) in the NKI 0.2.0 emulator and report how far it gets.

    python infra/nki_library_triage.py /path/to/nki-library.git      # or set BMOJO_NKI_LIBRARY

Nothing of AWS's is copied here: the sources are exported from the given git clone at the
pinned commit into a temporary folder and imported from there with the emulator installed
as `nki` (`nki_kernels.emulator.as_nki`). Each case runs one kernel at a small legal shape
(from its own tests or docstring) and, where it runs through, compares with a NumPy
reference written from the kernel's docstring. The printed table is what docs/kernels.md
("Conformance with AWS's kernels", "Triage of nki-library") records, with the reason for
each refusal checked by hand against the sources; the outcome column here is the raw
result: `matched`, `MISMATCH`, or the first line of the error.
"""

from __future__ import annotations

import argparse
import importlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import ml_dtypes
import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from nki_kernels.emulator import NKILoopDependencyWarning, NKISpillWarning, as_nki, nisa, nki, nl  # noqa: E402

LIBRARY_COMMIT = "0759719"
BF16 = ml_dtypes.bfloat16
LIB = "nkilib_src.nkilib."


@dataclass
class Case:
    """One kernel at one shape: inputs, and a reference the outputs must match (None: run only)."""

    module: str
    kernel: str
    inputs: Callable[[np.random.Generator], tuple[tuple, dict]]
    reference: Callable[..., Any] | None = None
    atol: float = 1e-5
    rtol: float = 1e-5
    subkernel: bool = False  # no @nki.jit of its own: its tests jit it, here it is simulated
    grid: int | None = None  # launched as kernel[grid](...) (a launcher that takes the grid, rotational_topk's topk)
    harness: Callable[..., Any] | None = None  # our kernel that calls the sub-kernel (`SUBKERNEL`) between HBM tensors


def _randn(rng: np.random.Generator, *shape: int, dtype: Any = np.float32) -> np.ndarray:
    return rng.standard_normal(shape).astype(dtype)


# ----------------------------------------------------------------------------- references (NumPy, fp64)
def _softmax_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, causal: bool, scale: float) -> np.ndarray:
    scores = np.einsum("bqd,bkd->bqk", q, k) * scale
    if causal:
        scores = np.where(np.tril(np.ones(scores.shape[-2:], bool)), scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    return np.einsum("bqk,bkd->bqd", weights / weights.sum(-1, keepdims=True), v)


def _ref_attention_cte(q, k, v, **kw):
    # its docstring's default layouts: q (B, S, d) (tp_q), k (B, d, S) (no tp_k), v (B, S, d); out (B, S, d)
    return _softmax_attention(q.astype(np.float64), np.swapaxes(k, 1, 2).astype(np.float64),
                              v.astype(np.float64), kw.get("causal_mask", True), kw.get("scale", 1.0))


def _ref_rope(x, cos, sin, **kw):
    # x (d, B, N, S), cos/sin (d/2, B, S); contiguous halves: out = x*cos + rotate_half(x)*sin
    half = x.shape[0] // 2
    x = x.astype(np.float64)
    c, s = cos[:, :, None, :].astype(np.float64), sin[:, :, None, :].astype(np.float64)
    return np.concatenate((x[:half] * c - x[half:] * s, x[half:] * c + x[:half] * s))


def _ref_cross_entropy(logits, targets, **kw):
    x = logits.astype(np.float64)
    lse = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
    return lse - x[np.arange(len(targets)), targets]


def _ref_output_projection_cte(attention, weight, **kw):
    b, n, d, s = attention.shape
    flat = attention.astype(np.float64).transpose(0, 3, 1, 2).reshape(b, s, n * d)
    return flat @ weight.astype(np.float64)


def _ref_output_projection_tkg(attention, weight, **kw):
    d, b, n, s = attention.shape
    flat = attention.astype(np.float64).transpose(1, 3, 2, 0).reshape(b * s, n * d)
    return flat @ weight.astype(np.float64)


def _ref_conv1d(x, filters, **kw):
    k = filters.shape[0]
    length = x.shape[-1] - k + 1
    x, f = x.astype(np.float64), filters.astype(np.float64)
    return sum(np.einsum("bcl,co->bol", x[:, :, i:i + length], f[i]) for i in range(k))


def _ref_depthwise_conv1d(img, filt, **kw):
    s = filt.shape[-1]
    q = img.shape[-1] - s + 1
    img, w = img.astype(np.float64), filt[:, 0, 0, :].astype(np.float64)  # (N, C, 1, W), (C, S)
    return sum(img[..., i:i + q] * w[None, :, None, i:i + 1] for i in range(s))


def _ref_nonzero_with_count(x, **kw):
    idx = np.flatnonzero(x[0])
    out = np.full((1, x.shape[1] + 1), -1, np.int64)
    out[0, :len(idx)] = idx
    out[0, -1] = len(idx)
    return out


def _ref_find_nonzero_indices(x, **kw):
    t, c = x.shape
    indices = np.full((c, t), -1, np.int64)
    counts = np.zeros(c, np.int64)
    for col in range(c):
        nz = np.flatnonzero(x[:, col])
        indices[col, :len(nz)], counts[col] = nz, len(nz)
    return indices, counts


def _ref_mlp(h, gate, up, down, **kw):
    h = h.astype(np.float64)
    g, u = h @ gate.astype(np.float64), h @ up.astype(np.float64)
    return (g / (1 + np.exp(-g)) * u) @ down.astype(np.float64)


def _ref_qkv(x, w, **kw):
    return x.astype(np.float64) @ w.astype(np.float64)


def _ref_masked_affinities(affinities, index, rank, e_local, **kw):
    # its docstring (and moe_tkg's test golden): the rank's slice of experts, zeroed where a token chose none of them
    offset = int(rank[0, 0]) * e_local
    local = affinities[:, offset:offset + e_local].astype(np.float64)
    chosen = (index[:, :, None] == offset + np.arange(e_local)[None, None, :]).any(axis=1)
    return local * chosen


# The sub-kernel a `Case.harness` calls, set by `run_case` (a harness is our own NKI 0.2 code, run through the
# emulator's front end with the sub-kernel it reaches).
SUBKERNEL: dict[str, Callable[..., Any]] = {}


def _mask_expert_affinities_harness(affinities, index, rank, e_local):
    """moe_tkg's all-expert affinity masking (`mask_expert_affinities`, mask_unselected_experts=True, its SBUF
    output) between HBM tensors: the top-K indices loaded to SBUF first, the masked affinities stored back."""
    tokens, top_k = index.shape
    index_sbuf = nl.ndarray((tokens, top_k), dtype=index.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=index_sbuf, src=index)
    masked = SUBKERNEL["mask_expert_affinities"](affinities, index_sbuf, rank, e_local, tokens, top_k,
                                                  affinities.dtype, True, True)
    out = nl.ndarray((tokens, e_local), dtype=affinities.dtype, buffer=nl.shared_hbm)
    nisa.dma_copy(dst=out, src=masked)
    return out


def _masking_inputs(rng: np.random.Generator, top_k: int) -> tuple[tuple, dict]:
    """T 32 tokens, E 8 experts, 4 local ones at rank 1, top-k indices int32 (moe_tkg's test layouts)."""
    tokens, experts, e_local = 32, 8, 4
    index = np.stack([rng.permutation(experts)[:top_k] for _ in range(tokens)]).astype(np.int32)
    return (rng.random((tokens, experts)).astype(np.float32), index, np.ones((1, 1), np.uint32), e_local), {}


def _moe_inputs(rng: np.random.Generator) -> tuple[tuple, dict]:
    """Its docstring's layouts: T 512 tokens, H 512, E 2 experts, I 512, blocks of 256 (one per expert)."""
    t, h, e, i, block = 512, 512, 2, 512, 256
    hidden = _randn(rng, t, h, dtype=BF16)
    affinities = rng.random(((t + 1) * e, 1)).astype(BF16)
    gate_up, down = _randn(rng, e, h, 2, i, dtype=BF16) * 0.05, _randn(rng, e, i, h, dtype=BF16) * 0.05
    positions = np.arange(2 * block, dtype=np.int32)
    experts = np.arange(2, dtype=np.int32).reshape(2, 1)
    return (hidden, affinities, gate_up, down, block, positions, experts), {}


def _moe_one_block(rng: np.random.Generator, padding_row: bool = False) -> tuple:
    """The MoE kernels' smallest legal layouts: T 256 (+1 padding row where the docstring has T+1), H 512, one
    expert, I 128, one block of 256."""
    t, h, e, i, block = 256, 512, 1, 128, 256
    rows = t + 1 if padding_row else t
    return (_randn(rng, rows, h, dtype=BF16), rng.random(((t + 1) * e, 1)).astype(BF16),
            _randn(rng, e, h, 2, i, dtype=BF16) * 0.05, _randn(rng, e, i, h, dtype=BF16) * 0.05, block,
            np.arange(block, dtype=np.int32), np.zeros((1, 1), np.int32))


def _moe_backward_inputs(rng: np.random.Generator) -> tuple[tuple, dict]:
    """Its docstring's layouts: T 256, H 512, one expert, I 128, two blocks of 128."""
    b, t, n, h, i, e = 128, 256, 2, 512, 128, 1
    return ((_randn(rng, t, h, dtype=BF16), rng.random((t * e, 1)).astype(BF16),
             _randn(rng, e, h, 2, i, dtype=BF16) * 0.05, _randn(rng, e, i, h, dtype=BF16) * 0.05,
             _randn(rng, n, 2, i, b, dtype=BF16), _randn(rng, n, b, h, dtype=BF16), np.arange(n * b, dtype=np.int32),
             np.zeros((n, 1), np.int32), _randn(rng, t, h, dtype=BF16), b), {})


def _circulant(column: np.ndarray) -> np.ndarray:
    """scipy.linalg.circulant (the one SciPy function rotational_topk uses): entry (i, j) is column[(i - j) % n]."""
    column = np.asarray(column).ravel()
    n = len(column)
    return column[(np.arange(n)[:, None] - np.arange(n)[None, :]) % n]


def _scipy_stand_in() -> None:
    """Where SciPy is not installed, a `scipy.linalg` holding only `_circulant`, for rotational_topk's import."""
    try:
        importlib.import_module("scipy.linalg")
    except ImportError:
        scipy, linalg = (type(sys)(name) for name in ("scipy", "scipy.linalg"))
        linalg.circulant, scipy.linalg = _circulant, linalg
        sys.modules.update({"scipy": scipy, "scipy.linalg": linalg})


def _rmsnorm_quant_args():
    return importlib.import_module(LIB + "core.rmsnorm.rmsnorm_quant").RmsNormQuantKernelArgs()


# ----------------------------------------------------------------------------- the cases
def _cases() -> list[Case]:
    return [
        Case("core.cumsum.cumsum", "cumsum", lambda r: ((_randn(r, 130, 512),), {}),
             lambda x: np.cumsum(x.astype(np.float64), -1), 1e-3, 1e-3),
        Case("core.max.cascaded_max", "cascaded_max", lambda r: ((_randn(r, 2, 3, 3168),), {}),
             lambda x: (x.max(-1, keepdims=True), x.argmax(-1)[..., None])),
        Case("core.embeddings.rope_hf", "rope_hf",
             lambda r: ((_randn(r, 1, 2, 128, 64), _randn(r, 1, 1, 128, 64), np.zeros((1, 2, 128, 64), np.float32),
                         np.zeros((1, 1, 128, 64), np.float32)),
                        {"cos": _randn(r, 1, 128, 64), "sin": _randn(r, 1, 128, 64)})),
        Case("core.embeddings.rope", "RoPE",
             lambda r: ((_randn(r, 64, 1, 2, 128), _randn(r, 32, 1, 128), _randn(r, 32, 1, 128)), {}), _ref_rope),
        Case("core.attention.attention_cte", "attention_cte",
             lambda r: ((r.random((1, 512, 128), np.float32), r.random((1, 128, 512), np.float32),
                         r.random((1, 512, 128), np.float32)), {"scale": 0.5}),
             _ref_attention_cte, 1e-5, 2e-2),  # its test: uniform [0, 1) inputs, rtol 2e-2, atol 1e-5
        Case("core.attention.attention_bwd", "attention_bwd",
             lambda r: (tuple(_randn(r, 1, 1, 128, 512) for _ in range(5)) + (_randn(r, 1, 1, 128, 4),),
                        {"use_causal_mask": True})),
        Case("core.loss.cross_entropy", "cross_entropy_forward",
             lambda r: ((_randn(r, 8, 2048), r.integers(0, 2048, 8).astype(np.int32)),
                        {"positions_per_batch": 8, "chunk_size": 2048, "dtype": np.dtype(np.float32)}),
             _ref_cross_entropy, 1e-3, 1e-3),
        Case("experimental.loss.cross_entropy", "cross_entropy_forward",
             lambda r: ((_randn(r, 8, 2048), r.integers(0, 2048, 8).astype(np.int32)),
                        {"positions_per_batch": 8, "chunk_size": 2048, "dtype": np.dtype(np.float32)}),
             _ref_cross_entropy, 1e-3, 1e-3),
        Case("core.output_projection.output_projection_cte.output_projection_cte", "output_projection_cte",
             lambda r: ((_randn(r, 1, 2, 64, 512), _randn(r, 128, 256)), {}), _ref_output_projection_cte, 1e-3, 1e-3),
        Case("core.output_projection.output_projection_tkg", "output_projection_tkg",
             lambda r: ((_randn(r, 64, 1, 2, 4), _randn(r, 128, 256)), {}), _ref_output_projection_tkg, 1e-3, 1e-3),
        Case("experimental.conv.conv1d", "conv1d",
             lambda r: ((_randn(r, 1, 64, 256), _randn(r, 3, 64, 64)), {}), _ref_conv1d, 1e-3, 1e-3),
        Case("experimental.conv.depthwise_conv1d", "depthwise_conv1d_implicit_gemm",
             lambda r: ((_randn(r, 1, 128, 1, 256), _randn(r, 128, 1, 1, 4)), {"feature_group_count": 128}), _ref_depthwise_conv1d, 1e-3, 1e-3),
        Case("experimental.benchmark.find_nonzero_indices_with_count", "find_nonzero_indices_with_count",
             lambda r: (((r.random((1, 256)) < 0.3).astype(np.float32),), {}), _ref_nonzero_with_count, 0, 0),
        Case("core.subkernels.find_nonzero_indices", "find_nonzero_indices",
             lambda r: (((r.random((256, 8)) < 0.3).astype(np.float32),), {}), _ref_find_nonzero_indices, 0, 0),
        Case("core.subkernels.indexed_flatten", "indexed_flatten",
             lambda r: ((r.integers(0, 9, (4, 256)).astype(np.int32), 16, 2048, np.arange(4, dtype=np.int32) * 32),
                        {})),
        Case("core.mlp.mlp", "mlp",
             lambda r: ((_randn(r, 1, 4, 512, dtype=BF16), _randn(r, 512, 256, dtype=BF16) * 0.05,
                         _randn(r, 512, 256, dtype=BF16) * 0.05, _randn(r, 256, 512, dtype=BF16) * 0.05), {}),
             _ref_mlp, 2e-2, 2e-2),
        Case("core.qkv.qkv", "qkv",
             lambda r: ((_randn(r, 1, 4, 512, dtype=BF16), _randn(r, 512, 384, dtype=BF16) * 0.05), {}),
             _ref_qkv, 2e-2, 2e-2),
        Case("core.rmsnorm.rmsnorm_quant", "rmsnorm_quant_kernel",
             lambda r: ((_randn(r, 1, 4, 512, dtype=BF16), _randn(r, 1, 512, dtype=BF16), _rmsnorm_quant_args()), {})),
        Case("core.topk.rotational_topk", "topk", lambda r: ((_randn(r, 1, 4, 4096), 8), {}),
             lambda x, k: np.sort(x, -1)[..., ::-1][..., :k].astype(np.float64), grid=1),
        Case("core.moe.moe_tkg.moe_tkg_affinity_masking", "mask_expert_affinities",
             lambda r: _masking_inputs(r, 1), _ref_masked_affinities, 0, 0, harness=_mask_expert_affinities_harness),
        Case("core.moe.moe_tkg.moe_tkg_affinity_masking", "mask_expert_affinities",
             lambda r: _masking_inputs(r, 2), _ref_masked_affinities, 0, 0, harness=_mask_expert_affinities_harness),
        Case("core.router_topk.router_topk", "router_topk", lambda r: ((), {})),
        Case("core.moe_block.moe_block_tkg", "moe_block_tkg", lambda r: ((), {})),
        Case("core.moe.moe_cte.moe_cte", "moe_cte", lambda r: ((), {})),
        Case("core.moe.moe_cte.bwmm_shard_on_block", "bwmm_shard_on_block", _moe_inputs),
        Case("core.moe.moe_cte.bwmm_shard_on_I", "blockwise_mm_baseline_shard_intermediate",
             lambda r: (_moe_one_block(r), {})),
        Case("core.moe.moe_cte.bwmm_shard_on_I", "blockwise_mm_baseline_shard_intermediate_hybrid",
             lambda r: ((np.array([1, 0], np.int32), *_moe_one_block(r, padding_row=True)), {})),
        Case("core.moe.moe_cte.bwmm_shard_on_I", "blockwise_mm_shard_intermediate_dropping",
             lambda r: (_moe_one_block(r, padding_row=True), {})),
        Case("experimental.mxfp_subkernels.mxfp_load_utils", "mxfp_load_performance_wrapper",
             lambda r: ((_randn(r, 128, 512, dtype=BF16),), {})),
        Case("experimental.collectives.sb2sb_allgather", "allgather_sb2sb", lambda r: ((), {})),
        Case("experimental.transformer.attention_block_tkg", "attention_block_tkg", lambda r: ((), {})),
        Case("experimental.moe.bwd.blockwise_mm_backward", "blockwise_mm_bwd", _moe_backward_inputs),
        Case("experimental.moe.forward.bwmm_shard_on_H", "blockwise_mm_baseline_shard_hidden",
             lambda r: (_moe_one_block(r), {})),
    ]


# ----------------------------------------------------------------------------- running them
def export(repo: str, dest: Path) -> Path:
    """`git archive` the library's src/ at the pinned commit into dest."""
    blob = subprocess.run(["git", "-C", repo, "archive", LIBRARY_COMMIT, "src"], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(dest, filter="data")
    return dest / "src"


def _compare(case: Case, out: Any, expected: Any) -> bool:
    outs = out if isinstance(out, (tuple, list)) else (out,)
    exps = expected if isinstance(expected, (tuple, list)) else (expected,)
    for o, e in zip(outs, exps):
        o = np.asarray(o).astype(np.float64).reshape(np.shape(e))
        if not np.allclose(o, e, atol=case.atol, rtol=case.rtol):
            return False
    return True


def run_case(case: Case, seed: int = 0) -> tuple[str, float]:
    """Run one case; returns (outcome, seconds). The emulator's warnings (a loop-carried dependency in an
    affine_range, spilled tiles: neuronx-cc accepts both) are appended to a run's outcome."""
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", NKILoopDependencyWarning)
        warnings.simplefilter("always", NKISpillWarning)
        try:
            with as_nki():
                module = importlib.import_module(LIB + case.module)
            kernel = getattr(module, case.kernel)
            args, kwargs = case.inputs(np.random.default_rng(seed))
            if case.grid is not None:
                kernel = kernel[case.grid]
            if case.harness is not None:
                SUBKERNEL[case.kernel], kernel = kernel, case.harness
            with as_nki():
                simulated = case.subkernel or case.harness is not None
                out = nki.simulate_kernel(kernel, *args, **kwargs) if simulated else kernel(*args, **kwargs)
            if case.reference is None:
                outcome = "ran (no reference)"
            else:
                outcome = "matched" if _compare(case, out, case.reference(*args, **kwargs)) else "MISMATCH"
        except Exception as exc:  # noqa: BLE001 - the outcome of the triage is the error itself
            frame = next((f for f in reversed(traceback.extract_tb(exc.__traceback__)) if "nkilib_src" in f.filename),
                         None)
            where = f" [{Path(frame.filename).name}:{frame.lineno}]" if frame else ""
            outcome = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}{where}"
    for w in caught:
        if issubclass(w.category, (NKILoopDependencyWarning, NKISpillWarning)):
            outcome += f"; warned {w.category.__name__} [{Path(w.filename).name}:{w.lineno}]: {str(w.message)[:160]}"
    return outcome, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("repo", nargs="?", default=os.environ.get("BMOJO_NKI_LIBRARY"),
                        help="a git clone of aws-neuron/nki-library (default: $BMOJO_NKI_LIBRARY)")
    parser.add_argument("-k", default="", help="only kernels whose name contains this")
    args = parser.parse_args(argv)
    if not args.repo:
        print("error: give the path of an nki-library git clone (or set BMOJO_NKI_LIBRARY)", file=sys.stderr)
        return 2
    _scipy_stand_in()
    with tempfile.TemporaryDirectory() as tmp:
        src = export(args.repo, Path(tmp))
        sys.path.insert(0, str(src))
        print("| kernel | module | outcome | s |\n|---|---|---|---|")
        for case in _cases():
            if args.k in case.kernel:
                outcome, seconds = run_case(case)
                print(f"| `{case.kernel}` | `{case.module}` | {outcome.replace('|', '/')[:300]} | {seconds:.1f} |",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
