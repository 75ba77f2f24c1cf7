"""One PNG per suite report (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import os
from typing import Any

from .candidates import LABELS

OURS_STYLE = {"linestyle": "-", "marker": "o"}
BASE_STYLE = {"linestyle": "--", "marker": "s"}


def _label(name: str) -> str:
    return LABELS.get(name, name)


def _series(report: dict[str, Any], key: str) -> dict[str, tuple[list[int], list[float]]]:
    out: dict[str, tuple[list[int], list[float]]] = {}
    for row in report["results"]:
        if row["status"] == "ok" and row.get(key):
            xs, ys = out.setdefault(row["candidate"], ([], []))
            xs.append(row["length"])
            ys.append(row[key])
    return out


def _capped_note(report: dict[str, Any]) -> str:
    capped = sorted({f"{r['candidate']} (L>={r['length']})" for r in report["results"]
                     if r["status"] == "capped" and not (r.get("note") or "").startswith("capped at the shorter")})
    errors = sorted({r["candidate"] for r in report["results"] if r["status"] == "error"})
    parts = []
    if capped:
        parts.append("capped: " + ", ".join(capped))
    if errors:
        parts.append("error: " + ", ".join(errors))
    return "; ".join(parts)


def _title(report: dict[str, Any], what: str) -> str:
    m = report["machine"]
    toy = " [TOY SIZES]" if report.get("toy") else ""
    load = (m.get("load_average_start") or [None])[0]
    return (f"{what}{toy}\n{m.get('cpu')}, {m.get('cpu_count')} cores, {m.get('torch_threads')} threads, "
            f"torch {m.get('torch')}, load {load}")


def plot_report(report: dict[str, Any], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    suite = report["suite"]
    if report.get("status") == "skipped" or not any(r["status"] == "ok" for r in report["results"]):
        message = report.get("message") or "no successful measurement. " + _capped_note(report) + " " + "; ".join(
            sorted({f"{r['candidate']}: {r['status']}" for r in report["results"] if r["status"] == "skipped"}))
        fig, ax = plt.subplots(figsize=(7, 2.5))
        ax.axis("off")
        ax.text(0.5, 0.5, f"bench {suite}: {message}", ha="center", va="center", wrap=True, fontsize=9)
    elif suite == "train-step":
        fig = _bars(plt, report)
    elif suite == "kernels":
        fig = _kernel_bars(plt, report)
    elif suite == "scaling":
        fig = _lines(plt, report, [("median_s", "fwd+bwd time of one layer (s)"),
                                   ("peak_memory_bytes", "peak extra memory (bytes)")],
                     "scaling: one layer, forward + backward", exponents=True)
    else:
        key2 = ("cache_bytes", "cache size (bytes)")
        fig = _lines(plt, report, [("latency_ms", "per-token latency (ms)"), key2], "decode: per-token latency")
    fig.savefig(path, dpi=110, bbox_inches="tight", format="png")  # a named format: no suffix appended
    plt.close(fig)
    return path


def _bars(plt, report):
    series = _series(report, "tokens_per_s")
    lengths = sorted({r["length"] for r in report["results"]})
    names = [c["name"] for c in report["candidates"]]
    fig, ax = plt.subplots(figsize=(max(7, 1.1 * len(names) * len(lengths)), 4.5))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        xs, ys = series.get(name, ([], []))
        values = [ys[xs.index(L)] if L in xs else 0.0 for L in lengths]
        pos = [j + (i - (len(names) - 1) / 2) * width for j in range(len(lengths))]
        baseline = name.startswith("hf-")
        bars = ax.bar(pos, values, width, label=_label(name), hatch="//" if baseline else None,
                      edgecolor="black", linewidth=0.5)
        for bar, L, v in zip(bars, lengths, values):
            if v == 0.0:
                ax.text(bar.get_x() + bar.get_width() / 2, 0, "capped" if _status(report, name, L) == "capped"
                        else _status(report, name, L), rotation=90, ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(lengths)), [f"L={L}" for L in lengths])
    ax.set_ylabel("training tokens / s (fwd + bwd + AdamW)")
    ax.set_title(_title(report, "train-step"), fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    note = _capped_note(report)
    if note:
        fig.text(0.01, -0.02, note, fontsize=7)
    return fig


def _kernel_bars(plt, report):
    rows = [r for r in report["results"] if r["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(9, max(2.5, 0.3 * len(rows) + 1)))
    labels = [f"{r.get('shape')} / {r['candidate']}" for r in rows]
    ax.barh(range(len(rows)), [r["modelled_ms"] for r in rows], color="tab:blue")
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("modelled Trn1 time per call (ms), NKI emulator cost model")
    ax.set_title(_title(report, "kernels"), fontsize=9)
    return fig


def _status(report, name, length) -> str:
    for row in report["results"]:
        if row["candidate"] == name and row["length"] == length:
            return row["status"]
    return "n/a"


def _lines(plt, report, panels, what, exponents: bool = False):
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5))
    fits = {f["candidate"]: f for f in report.get("fits", [])}
    for ax, (key, ylabel) in zip(axes, panels):
        for name, (xs, ys) in _series(report, key).items():
            label = _label(name)
            if exponents and name in fits:
                exp = fits[name].get("time_exponent" if key == "median_s" else "memory_exponent")
                if exp is not None:
                    label += f" (exp {exp:.2f})"
            style = BASE_STYLE if name.startswith("hf-") else OURS_STYLE
            ax.plot(xs, ys, label=label, **style)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length" if report["suite"] == "scaling" else "context length")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
    axes[0].set_title(_title(report, what), fontsize=9)
    note = _capped_note(report)
    if note:
        fig.text(0.01, -0.02, note, fontsize=7)
    return fig
