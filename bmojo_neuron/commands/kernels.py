"""`bmojo-neuron kernels profile`: the NKI kernels through the emulator's Trn1 cost model.

Runs each kernel cost-only (rules checked, cycles charged, no arithmetic) at the Trn1
ladder's shapes (one sequence of `block_size` tokens, the recipe's d_inner / heads /
state size; Mamba-1 uses state 16 at the same d_inner) plus the calibration shape of
the fused-Mamba tutorial, and prints modelled time, bound engine and the share of
that engine's peak. Modelled, not measured: see docs/kernels.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bmojo_neuron.cli import register_command

CALIBRATION = {"name": "calibration (tutorial)", "d_inner": 4096, "length": 8192, "n1": 16, "n2": 16,
               "head_dim": 64, "groups": 1}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["profile"], help="what to do (profile: modelled Trn1 time per kernel)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--kernels", default="mamba1_fwd,mamba1_bwd,ssd_fwd",
                        help="comma-separated subset of mamba1_fwd, mamba1_bwd, ssd_fwd")
    parser.add_argument("--calibration-only", action="store_true", help="only the tutorial's calibration shape")


def ladder_shapes() -> list[dict[str, Any]]:
    """Kernel shapes of the recipes in recipes/trn1 (one sequence each)."""
    import yaml

    from bmojo_neuron.recipes import repository_root

    shapes = []
    for path in sorted(Path(repository_root(), "recipes", "trn1").glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        model, data = raw.get("model", {}), raw.get("data", {})
        d_inner = int(model.get("ssm_expand", 2)) * int(model["hidden_size"])
        shapes.append({"name": path.stem, "d_inner": d_inner, "length": int(data.get("block_size", 2048)),
                       "n1": 16, "n2": int(model.get("ssm_state_size", 64)),
                       "head_dim": int(model.get("ssm_head_dim", 64)), "groups": int(model.get("ssm_n_groups", 1))})
    return shapes


def profile_kernel(kernel: str, shape: dict[str, Any]) -> dict[str, Any]:
    """Cost-only emulator run of one kernel at one shape -> a result row."""
    import numpy as np

    from nki_kernels.emulator import simulate

    zeros = lambda *s: np.broadcast_to(np.float32(0), s)  # noqa: E731
    d, length, b = shape["d_inner"], shape["length"], 1
    if kernel == "ssd_fwd":
        from nki_kernels.ssd_fwd import ssd_fwd

        heads, n, g = d // shape["head_dim"], shape["n2"], shape["groups"]
        args = (zeros(b, length, heads, shape["head_dim"]), zeros(b, length, heads), zeros(heads),
                zeros(b, length, g, n), zeros(b, length, g, n), zeros(heads), zeros(heads), True)
        _, prof = simulate(ssd_fwd, *args, cost_only=True)
        dims = f"H={heads} P={shape['head_dim']} N={n} G={g}"
    else:
        n = shape["n1"]
        base = (zeros(b, d, length), zeros(b, d, length), zeros(d, n), zeros(b, n, length), zeros(b, n, length))
        if kernel == "mamba1_fwd":
            from nki_kernels.selective_scan_fwd import selective_scan_fwd

            _, prof = simulate(selective_scan_fwd, *base, None, None, None, False, cost_only=True)
        else:
            from nki_kernels.selective_scan_bwd import selective_scan_bwd

            _, prof = simulate(selective_scan_bwd, zeros(b, d, length), *base, zeros(d), zeros(b, d, length),
                               zeros(d), True, cost_only=True)
        dims = f"D={d} N={n}"
    bound = prof.bound
    return {"shape": shape["name"], "kernel": kernel, "dims": f"L={length} {dims}",
            "time_ms": prof.time_overlapped_s * 1e3, "serial_ms": prof.time_serial_s * 1e3, "bound": bound,
            "peak_share": prof.peak_share(bound) if bound != "hbm" else None, "profile": prof.to_dict()}


def _table(rows: list[dict[str, Any]]) -> str:
    head = f"{'shape':<24} {'kernel':<11} {'dims':<30} {'time ms':>9} {'serial ms':>10} {'bound':<7} {'peak %':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        share = f"{100 * r['peak_share']:.0f}" if r["peak_share"] is not None else "-"
        lines.append(f"{r['shape']:<24} {r['kernel']:<11} {r['dims']:<30} {r['time_ms']:>9.2f} "
                     f"{r['serial_ms']:>10.2f} {r['bound']:<7} {share:>7}")
    lines.append("time = max(engine times, HBM time) on one Trn1 NeuronCore, batch 1; serial = their sum. "
                 "Calibration: the tutorial's Mamba-1 forward measured 27.8 ms.")
    return "\n".join(lines)


@register_command("kernels", help="NKI kernel tools: `kernels profile` models each kernel's Trn1 time",
                  add_arguments=add_arguments)
def run(args: argparse.Namespace) -> int | None:
    kernels = [k.strip() for k in args.kernels.split(",") if k.strip()]
    unknown = set(kernels) - {"mamba1_fwd", "mamba1_bwd", "ssd_fwd"}
    if unknown:
        raise ValueError(f"unknown kernels {sorted(unknown)}; choose from mamba1_fwd, mamba1_bwd, ssd_fwd")
    shapes = [CALIBRATION] + ([] if args.calibration_only else ladder_shapes())
    rows = [profile_kernel(k, s) for s in shapes for k in kernels]
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(_table(rows))
    return 0
