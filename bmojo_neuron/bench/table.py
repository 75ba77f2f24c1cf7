"""Markdown tables from bench reports (for ``docs/benchmarks.md``).

    python -m bmojo_neuron.bench.table train-step.json scaling.json decode.json
"""

from __future__ import annotations

import json
import sys
from typing import Any


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:,.0f}"
    return str(x)


def _mib(n: int | None) -> str:
    return "—" if n is None else f"{n / 2**20:.1f}"


def machine_line(report: dict[str, Any]) -> str:
    m = report["machine"]
    toy = " **TOY SIZES: plumbing check, not a benchmark.**" if report.get("toy") else ""
    return (f"`{report['suite']}`, {report['created']}: {m['cpu']}, {m['cpu_count']} cores, "
            f"{m['torch_threads']} torch threads, torch {m['torch']}, transformers {m['transformers']}, "
            f"load average at start {m['load_average_start']}, at end {m.get('load_average_end')}; "
            f"suite took {report.get('elapsed_s')} s.{toy}")


def markdown(report: dict[str, Any]) -> str:
    lines = [machine_line(report), ""]
    if report.get("status") == "skipped":
        return "\n".join(lines + [str(report.get("message")), ""])
    suite = report["suite"]
    lengths = report["settings"]["lengths"]
    rows = {(r["candidate"], r["length"]): r for r in report["results"]}
    names = [c["name"] for c in report["candidates"]] or sorted({r["candidate"] for r in report["results"]})
    params = {c["name"]: c["non_embedding_params"] for c in report["candidates"]}

    def cell(name: str, length: int, key: str, scale: float = 1.0) -> str:
        r = rows.get((name, length))
        if r is None:
            return "—"
        if r["status"] != "ok":
            return r["status"]
        value = r.get(key)
        if key.endswith("bytes"):
            return _mib(value)
        return _fmt(value * scale if value is not None else None)

    if suite == "train-step":
        head = ["candidate", "non-emb. params"] + [f"tok/s L={L}" for L in lengths] + \
               [f"peak MiB L={L}" for L in lengths]
        body = [[n, f"{params.get(n, 0):,}"] + [cell(n, L, "tokens_per_s") for L in lengths] +
                [cell(n, L, "peak_memory_bytes") for L in lengths] for n in names]
    elif suite == "scaling":
        fits = {f["candidate"]: f for f in report["fits"]}
        head = ["candidate"] + [f"ms L={L}" for L in lengths] + ["time exp.", "memory exp.",
                                                                 f"peak MiB L={lengths[-1]}"]
        body = [[n] + [cell(n, L, "median_s", 1e3) for L in lengths] +
                [_fmt(fits.get(n, {}).get("time_exponent")), _fmt(fits.get(n, {}).get("memory_exponent")),
                 cell(n, lengths[-1], "peak_memory_bytes")] for n in names]
    elif suite == "decode":
        head = ["candidate"] + [f"ms/token ctx={L}" for L in lengths] + [f"cache MiB ctx={L}" for L in lengths]
        body = [[n] + [cell(n, L, "latency_ms") for L in lengths] + [cell(n, L, "cache_bytes") for L in lengths]
                for n in names]
    else:
        head = ["shape", "kernel", "dims", "modelled ms", "bound"]
        body = [[str(r.get("shape")), r["candidate"], str(r.get("dims", "")),
                 _fmt(r.get("modelled_ms")) if r["status"] == "ok" else r["status"], str(r.get("bound", ""))]
                for r in report["results"]]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    lines += ["| " + " | ".join(row) + " |" for row in body]
    if report["targets"]:
        lines += ["", "Targets:", ""]
        for t in report["targets"]:
            state = "met" if t["met"] else "**missed**"
            lines.append(f"- {t['name']} {t['comparison']} {t['threshold']}: {_fmt(t['value'])} ({state})")
    if report.get("ratios"):
        lines += ["", "Ratios (reported, not targets):", ""]
        lines += [f"- {r['name']}: {_fmt(r['value'])}" + (f" ({r['note']})" if r.get("note") else "")
                  for r in report["ratios"]]
    notes = [f"{r['candidate']} L={r['length']}: {r['note']}" for r in report["results"]
             if r["status"] != "ok" and r.get("note") and "shorter length" not in r["note"]]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    for path in (sys.argv[1:] if argv is None else argv):
        with open(path) as f:
            print(markdown(json.load(f)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
