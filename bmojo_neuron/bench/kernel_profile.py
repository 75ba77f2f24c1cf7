"""The NKI kernels through the emulator's Trn1 cost model (``bmojo-neuron kernels profile``, ``bench kernels``).

Runs each kernel cost-only (rules checked, cycles charged, no arithmetic) at the Trn1
ladder's shapes (one sequence of `block_size` tokens, the recipe's d_inner / heads /
state size; Mamba-1 uses state 16 at the same d_inner) plus the calibration shape of
the fused-Mamba tutorial, and prints modelled time (the contention-aware timeline, beside
the perfect-overlap and serial bounds), what bounds it and the share of that engine's
peak. Modelled, not measured: see docs/kernels.md.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from bmojo_neuron.recipes import parse_yaml, repository_root
from nki_kernels.attention_bwd import eidetic_attention_bwd
from nki_kernels.attention_fwd import eidetic_attention_fwd
from nki_kernels.emulator import simulate
from nki_kernels.emulator.core import Profile
from nki_kernels.emulator.costmodel import HBM_BYTES_PER_S
from nki_kernels.selective_scan_bwd import selective_scan_bwd
from nki_kernels.selective_scan_fwd import selective_scan_fwd
from nki_kernels.ssd_bwd import ssd_bwd
from nki_kernels.ssd_fwd import ssd_fwd

SCAN_KERNELS = ("mamba1_fwd", "mamba1_bwd", "ssd_fwd", "ssd_bwd")

CALIBRATION = {"name": "calibration (tutorial)", "d_inner": 4096, "length": 8192, "n1": 16, "n2": 16,
               "head_dim": 64, "groups": 1}


def ladder_shapes() -> list[dict[str, Any]]:
    """Kernel shapes of the recipes in recipes/trn1 (one sequence each)."""
    shapes = []
    for path in sorted(Path(repository_root(), "recipes", "trn1").glob("*.yaml")):
        raw = parse_yaml(path.read_text(encoding="utf-8"))
        model, data = raw.get("model", {}), raw.get("data", {})
        d_inner = int(model.get("ssm_expand", 2)) * int(model["hidden_size"])
        shapes.append({"name": path.stem, "d_inner": d_inner, "length": int(data.get("block_size", 2048)),
                       "n1": 16, "n2": int(model.get("ssm_state_size", 64)),
                       "head_dim": int(model.get("ssm_head_dim", 64)), "groups": int(model.get("ssm_n_groups", 1))})
    return shapes


def profile_kernel(kernel: str, shape: dict[str, Any]) -> dict[str, Any]:
    """Cost-only emulator run of one kernel at one shape -> a result row."""
    zeros = lambda *s: np.broadcast_to(np.float32(0), s)  # noqa: E731
    d, length, b = shape["d_inner"], shape["length"], 1
    if kernel in ("ssd_fwd", "ssd_bwd"):
        heads, n, g = d // shape["head_dim"], shape["n2"], shape["groups"]
        args = (zeros(b, length, heads, shape["head_dim"]), zeros(b, length, heads), zeros(heads),
                zeros(b, length, g, n), zeros(b, length, g, n), zeros(heads), zeros(heads), True)
        if kernel == "ssd_fwd":
            _, prof = simulate(ssd_fwd, *args, cost_only=True)
        else:
            _, prof = simulate(ssd_bwd, zeros(b, length, heads, shape["head_dim"]), *args, cost_only=True)
        dims = f"H={heads} P={shape['head_dim']} N={n} G={g}"
    else:
        n = shape["n1"]
        base = (zeros(b, d, length), zeros(b, d, length), zeros(d, n), zeros(b, n, length), zeros(b, n, length))
        # as training runs them: the forward saves the tile states and pre-gate y, the backward reads them
        if kernel == "mamba1_fwd":
            _, prof = simulate(selective_scan_fwd, *base, None, None, None, False, None, True, cost_only=True)
        else:
            saved = (zeros(b, d, n * -(-length // 512)), zeros(b, d, length))
            _, prof = simulate(selective_scan_bwd, zeros(b, d, length), *base, zeros(d), zeros(b, d, length),
                               zeros(d), True, *saved, cost_only=True)
        dims = f"D={d} N={n}"
    return {"shape": shape["name"], "kernel": kernel, "dims": f"L={length} {dims}", **_times(prof),
            "profile": prof.to_dict()}


def _times(prof: Profile, time_s: float | None = None) -> dict[str, Any]:
    """The row's modelled times: `time_ms` from the contention-aware timeline (engines in program order,
    shared SBUF/PSUM ports, DMA engines, dependencies), `overlap_ms` the perfect-overlap lower bound
    (busiest engine alone), `serial_ms` no overlap at all; what bounds it and that engine's peak share."""
    bound = prof.bound
    engine = bound if bound in prof.cycles else None  # a port, 'dma' or 'hbm' has no peak share
    return {"time_ms": (prof.time_s if time_s is None else time_s) * 1e3, "overlap_ms": prof.time_overlapped_s * 1e3,
            "serial_ms": prof.time_serial_s * 1e3, "bound": bound,
            "peak_share": prof.peak_share(engine) if engine else None}


# ----------------------------------------------------------------------------- eidetic attention
ATTENTION_KERNELS = ("attention_fwd", "attention_bwd", "attention_2pass")
# A long-window Trn1 shape beside the recipes' (which use w = w_f = 512 at L 8192).
ATTENTION_EXAMPLE = {"name": "long window w2048", "length": 8192, "heads": 16, "kv_heads": 16, "head_dim": 128,
                     "window": 2048, "fading": 2048, "memory": 256, "chunk": 2048}


def attention_shapes() -> list[dict[str, Any]]:
    """Attention shapes of the recipes in recipes/trn1 (one sequence each) plus a long-window example."""
    shapes = []
    for path in sorted(Path(repository_root(), "recipes", "trn1").glob("*.yaml")):
        raw = parse_yaml(path.read_text(encoding="utf-8"))
        model, data = raw.get("model", {}), raw.get("data", {})
        heads = int(model["num_attention_heads"])
        window = int(model.get("window_size", 512))
        shapes.append({"name": path.stem, "length": int(data.get("block_size", 2048)), "heads": heads,
                       "kv_heads": int(model.get("num_key_value_heads") or heads),
                       "head_dim": int(model.get("head_dim") or int(model["hidden_size"]) // heads),
                       "window": window, "fading": int(model.get("fading_window", window)),
                       "memory": int(model.get("memory_size", 0)), "chunk": int(model.get("memory_chunk", window))})
    return shapes + [ATTENTION_EXAMPLE]


def attended_keys(shape: dict[str, Any]) -> int:
    """Keys summed over the queries of one head: min(i+1, w) + the clipped fading window + M."""
    i = np.arange(shape["length"])
    w, wf = min(shape["window"], shape["length"]), shape["fading"]
    return int(np.minimum(i + 1, w).sum() + np.clip(i - w + 1, 0, wf).sum() + shape["memory"] * shape["length"])


def _attention_profile(shape: dict[str, Any], window: int, fading: int, memory: int, backward: bool = False):
    bf16 = ml_dtypes.bfloat16
    z = lambda *s, dt=bf16: np.broadcast_to(np.zeros((), dt), s)  # noqa: E731
    length, hq, hkv, d, c = shape["length"], shape["heads"], shape["kv_heads"], shape["head_dim"], shape["chunk"]
    nc = -(-length // c)
    scale = 1 / math.sqrt(d)
    kv_t, kv = z(1, hkv, d, length), z(1, hkv, length, d)
    fad_t, fad = (kv_t, kv) if fading else (None, None)
    mem = (z(1, hkv, nc, memory, d), z(1, hkv, nc, d, memory), z(1, nc, memory, dt=np.float32)) if memory else (
        None, None, None)
    if not backward:
        return simulate(eidetic_attention_fwd, z(1, hq, d, length), kv_t, kv, fad_t, fad, mem[1],
                        mem[0], mem[2], window, fading, c, scale, cost_only=True)[1]
    q, q_t = z(1, hq, length, d), z(1, hq, d, length)
    return simulate(eidetic_attention_bwd, q, q_t, kv, kv_t, kv_t, fad, fad_t, fad_t, mem[0], mem[1], mem[1], mem[2],
                    q, q, q_t, z(1, hq, length, dt=np.float32), None, window, fading, c, scale, cost_only=True)[1]


def profile_attention(kernel: str, shape: dict[str, Any]) -> dict[str, Any]:
    """Cost-only run of an attention kernel at one shape -> a result row with Tensor-engine utilisation.

    utilisation = the attention's matmul FLOPs (4·d per attended key and query forward: QK^T and PV;
    8·d backward: dP, dV, dK, dQ, not counting the recomputed QK^T) / (modelled time × 92 TFLOPS).
    attention_2pass: in-context SWA (window w) + a SWA pass over the fading keys with window w + w_f
    (a sliding-window kernel cannot offset its window, so it computes the whole band and masks the
    newest w keys), then a merge of the two (out, lse) pairs (HBM-bound elementwise pass); no memory.
    """
    w, wf, m = shape["window"], shape["fading"], shape["memory"]
    flop_keys = attended_keys(shape)
    if kernel == "attention_fwd":
        prof = _attention_profile(shape, w, wf, m)
        flops = 4 * shape["head_dim"] * shape["heads"] * flop_keys
    elif kernel == "attention_bwd":
        prof = _attention_profile(shape, w, wf, m, backward=True)
        flops = 8 * shape["head_dim"] * shape["heads"] * flop_keys
    else:
        no_mem = {**shape, "memory": 0}
        flop_keys = attended_keys(no_mem)
        flops = 4 * shape["head_dim"] * shape["heads"] * flop_keys
        first = _attention_profile(shape, w, 0, 0)
        second = _attention_profile({**shape, "window": w + wf}, w + wf, 0, 0)
        prof = Profile()  # the three kernels run one after the other: their times add
        for part in (first, second):
            for e in prof.cycles:
                prof.cycles[e] += part.cycles[e]
                prof.instructions[e] += part.instructions[e]
                prof.useful[e] += part.useful[e]
            prof.hbm_bytes += part.hbm_bytes
        # merge: read two bf16 outputs and two fp32 lse, write one bf16 output
        merge_bytes = shape["heads"] * shape["length"] * (3 * 2 * shape["head_dim"] + 2 * 4)
        prof.hbm_bytes += merge_bytes
        prof.timeline.busy.update({r: first.timeline.busy[r] + second.timeline.busy[r] for r in prof.timeline.busy})
        prof.timeline.makespan = first.time_s + second.time_s + merge_bytes / HBM_BYTES_PER_S
    row = _times(prof)
    dims = (f"L={shape['length']} H={shape['heads']}/{shape['kv_heads']} d={shape['head_dim']} w={w} "
            f"wf={wf} M={m if kernel != 'attention_2pass' else 0} c={shape['chunk']}")
    return {"shape": shape["name"], "kernel": kernel, "dims": dims, **row,
            "tensor_util": flops / (row["time_ms"] * 1e-3 * 92e12), "profile": prof.to_dict()}


def check_kernels(names: list[str], known: tuple[str, ...], what: str = "kernels") -> None:
    """ValueError naming the unknown ones among `names`, or those named twice (each would be profiled twice).

    `what` names the list in the message (e.g. "attention kernels"), so the user sees which option was wrong.
    """
    unknown = set(names) - set(known)
    if unknown:
        raise ValueError(f"unknown {what} {sorted(unknown)}; choose from {', '.join(known)}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"{what} {repeated} given more than once; name each once")


def attention_profiles(names: list[str]) -> list[dict[str, Any]]:
    """`profile_attention` of each kernel in `names` at every shape of `attention_shapes`."""
    check_kernels(names, ATTENTION_KERNELS, "attention kernels")
    return [profile_attention(k, s) for s in attention_shapes() for k in names]
