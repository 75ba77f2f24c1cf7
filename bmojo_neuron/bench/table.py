"""Markdown tables from bench reports (for ``docs/benchmarks.md``).

    python -m bmojo_neuron.bench.table train-step.json scaling.json decode.json
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from bmojo_neuron.closed_stdout import exit_status_on_closed_stdout


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
            why = f" — {t['note']}" if t["value"] is None and t.get("note") else ""
            lines.append(f"- {t['name']} {t['comparison']} {t['threshold']}: {_fmt(t['value'])} ({state}){why}")
    if report.get("ratios"):
        lines += ["", "Ratios (reported, not targets):", ""]
        lines += [f"- {r['name']}: {_fmt(r['value'])}" + (f" ({r['note']})" if r.get("note") else "")
                  for r in report["ratios"]]
    notes = [f"{r['candidate']} L={r['length']}: {r['note']}" for r in report["results"]
             if r["status"] != "ok" and r.get("note") and "shorter length" not in r["note"]]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


SCHEMA_PREFIX = "bmojo-neuron-bench/"  # harness.SCHEMA without its version (harness imports torch)


def load_report(path: str) -> dict[str, Any]:
    """The report in `path`; ValueError saying why it is not one (unreadable, not JSON, not a bench report)."""
    try:
        with open(path) as f:
            report = json.load(f)
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not JSON ({exc})") from None
    if not isinstance(report, dict) or not str(report.get("schema", "")).startswith(SCHEMA_PREFIX):
        raise ValueError(f"{path}: not a bench report (no \"schema\": \"{SCHEMA_PREFIX}...\"); "
                         "give the --json files `bmojo-neuron bench` wrote")
    return report


def table(path: str) -> str:
    """The Markdown of the report in `path`; ValueError for a file that is not a complete report."""
    report = load_report(path)
    try:
        return markdown(report)
    except (KeyError, TypeError, AttributeError, IndexError) as exc:
        what = f"missing key {exc}" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {exc}"
        raise ValueError(f"{path}: incomplete bench report ({what})") from None


def main(argv: list[str] | None = None) -> int:
    """Print each report's tables; one ``error:`` line per file that is not a report (exit status 2)."""
    parser = argparse.ArgumentParser(prog="python -m bmojo_neuron.bench.table",
                                     description="Markdown tables from `bmojo-neuron bench` JSON reports.")
    parser.add_argument("reports", nargs="+", metavar="REPORT", help="JSON reports written by bench --json")
    args = parser.parse_args(argv)
    status = 0
    for path in args.reports:
        try:
            text = table(path)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            status = 2
            continue
        print(text)
    return status


if __name__ == "__main__":
    sys.exit(exit_status_on_closed_stdout(main))
