"""`bmojo-neuron kernels profile`: modelled Trn1 time of each NKI kernel (`bmojo_neuron.bench.kernel_profile`)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Callable

from bmojo_neuron.cli import register_command, say_on_terminal

SCAN_KERNELS = "mamba1_fwd,mamba1_bwd,ssd_fwd,ssd_bwd"
ATTENTION_KERNELS = "attention_fwd,attention_bwd,attention_2pass"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # An action of its own parser, so that `kernels profile --help` shows `bmojo-neuron kernels profile` in its
    # usage line and the options under it, as `data prepare --help` does.
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    profile = sub.add_parser("profile", help="modelled Trn1 time per kernel and shape",
                             description="model each NKI kernel's Trn1 time with the emulator's cost model, at the "
                                         "tutorial's calibration shape and each recipes/trn1 shape (minutes), and "
                                         "print a table")
    profile.add_argument("--json", action="store_true", help="print JSON instead of a table")
    profile.add_argument("--kernels", default=SCAN_KERNELS, help=f"comma-separated subset of {SCAN_KERNELS}")
    profile.add_argument("--calibration-only", action="store_true", help="only the tutorial's calibration shape")
    profile.add_argument("--attention", default=ATTENTION_KERNELS,
                         help="comma-separated subset of attention_fwd, attention_bwd, attention_2pass (the fused "
                              "kernel vs two sliding-window passes merged, as B'MOJO-F does), or 'none'; "
                              "skipped with --calibration-only")


def _names(text: str) -> list[str]:
    return [k.strip() for k in text.split(",") if k.strip() and k.strip() != "none"]


@register_command("kernels", help="NKI kernel tools: `kernels profile` models each kernel's Trn1 time (minutes of "
                                  "cost modelling for every kernel and shape)",
                  add_arguments=add_arguments)
def run(args: argparse.Namespace) -> int | None:
    kernels, attention_kernels = _names(args.kernels), _names(args.attention)
    if not kernels and not args.kernels.strip():
        raise ValueError(f"no kernels given: --kernels is empty; name some of {SCAN_KERNELS}, or none for "
                         "attention kernels only")
    say_on_terminal("kernels profile: loading the NKI kernels and their emulator")
    from bmojo_neuron.bench import kernel_profile as kp  # the kernels and their emulator: seconds of imports

    kp.check_kernels(kernels, kp.SCAN_KERNELS)
    kp.check_kernels(attention_kernels, kp.ATTENTION_KERNELS, "attention kernels")
    if args.calibration_only:
        attention_kernels = []  # the attention kernels have no calibration shape
    if not kernels and not attention_kernels:
        raise ValueError("no kernels given: --kernels and --attention (skipped with --calibration-only) select "
                         "none; name at least one kernel")
    shapes = [kp.CALIBRATION] + ([] if args.calibration_only else kp.ladder_shapes())
    jobs = [(kp.profile_kernel, k, s) for s in shapes for k in kernels]
    scan_jobs = len(jobs)
    jobs += [(kp.profile_attention, k, s) for s in (kp.attention_shapes() if attention_kernels else [])
             for k in attention_kernels]
    results = [run_job(job, index, len(jobs)) for index, job in enumerate(jobs, 1)]
    rows, attention = results[:scan_jobs], results[scan_jobs:]
    if args.json:
        print(json.dumps(rows + attention, indent=1))
    else:
        tables = ([scan_table(rows)] if rows else []) + ([attention_table(attention)] if attention else [])
        print("\n\n".join(tables))
    return 0


def run_job(job: tuple[Any, str, dict[str, Any]], index: int, total: int,
            clock: Callable[[], float] = time.monotonic) -> dict[str, Any]:
    """One kernel modelled at one shape: each takes seconds to a minute of the emulator's cost model, the whole
    profile minutes, and the table prints only at the end. On a terminal it is named before it starts; in a log
    or a pipe, where no one watches it start, a line on stderr says it finished, with its modelled and its own
    time, so the log shows the profile moving (stdout stays the table, or the JSON)."""
    profile, kernel, shape = job
    what = f"[{index}/{total}] {kernel} at {shape['name']}"
    say_on_terminal(f"  {what}")
    start = clock()
    row = profile(kernel, shape)
    if not sys.stderr.isatty():
        print(f"kernels profile: {what}: {row['time_ms']:.2f} ms modelled, in {clock() - start:.0f}s",
              file=sys.stderr, flush=True)
    return row


def shape_width(rows: list[dict[str, Any]]) -> int:
    """The shape column's width: the recipes' names (`prime-llama-3.2-1b-finetune`) outgrow the usual 24."""
    return max([24, *(len(r["shape"]) for r in rows)])


def scan_table(rows: list[dict[str, Any]]) -> str:
    width = shape_width(rows)
    head = (f"{'shape':<{width}} {'kernel':<11} {'dims':<30} {'time ms':>9} {'overlap ms':>10} {'serial ms':>10} "
            f"{'bound':<9} {'peak %':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        share = f"{100 * r['peak_share']:.0f}" if r["peak_share"] is not None else "-"
        lines.append(f"{r['shape']:<{width}} {r['kernel']:<11} {r['dims']:<30} {r['time_ms']:>9.2f} "
                     f"{r['overlap_ms']:>10.2f} {r['serial_ms']:>10.2f} {r['bound']:<9} {share:>7}")
    lines.append("time = the contention-aware timeline (engines in program order, the shared SBUF port of Vector + "
                 "GpSimd and PSUM port of Vector + Scalar, DMA engines, dependencies) on one Trn1 NeuronCore, batch 1; "
                 "overlap = busiest engine alone (lower bound); serial = no overlap. Calibration: the tutorial's "
                 "Mamba-1 forward measured 27.8 ms.")
    return "\n".join(lines)


def attention_table(rows: list[dict[str, Any]]) -> str:
    width = shape_width(rows)
    head = (f"{'shape':<{width}} {'kernel':<16} {'dims':<50} {'time ms':>8} {'overlap ms':>10} {'serial ms':>9} "
            f"{'bound':<9} {'TE util %':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['shape']:<{width}} {r['kernel']:<16} {r['dims']:<50} {r['time_ms']:>8.2f} {r['overlap_ms']:>10.2f} "
                     f"{r['serial_ms']:>9.2f} {r['bound']:<9} {100 * r['tensor_util']:>9.1f}")
    lines.append("TE util = attention matmul FLOPs (exact attended keys) / (time x 92 TFLOPS bf16); time from the "
                 "contention-aware timeline; batch 1, bf16.")
    return "\n".join(lines)
