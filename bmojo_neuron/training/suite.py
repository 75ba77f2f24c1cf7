"""The table that compares the runs of one recipe (its ``compare`` baseline or its ``suite``; `recipe_runs` plans
them)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bmojo_neuron.checkpoints.names import SUMMARY_FILE
from bmojo_neuron.data.mqar import chance_recall, guess_recall

from .progress import format_seconds
from .trainer import TrainResult

RECALL_NOTE = ("chance = a uniform guess among the value tokens (1 / (vocab_size - vocab_size // 2)); "
               "guess = a uniform guess among the values present in the sequence (1 / num_kv_pairs): "
               "recall above it means the model matched keys to values")


def summary_row(recipe: Any, result: TrainResult) -> dict[str, Any]:
    """One trained model's line of the summary: params, final eval loss, perplexity or MQAR recall vs chance."""
    d = recipe.data
    mqar = d.kind == "mqar"
    return {
        "model": recipe.run.name,
        "layers": recipe.model_config().layer_pattern,
        "params": result.params,
        "eval_loss": result.final_eval["loss"],
        "perplexity": result.final_eval["perplexity"],
        "recall": result.final_eval.get("accuracy"),
        "chance": chance_recall(d.vocab_size) if mqar else None,
        "guess": guess_recall(d.num_kv_pairs) if mqar else None,
        "time": format_seconds(result.seconds),
        "run_dir": str(result.run_dir),
        # recall (MQAR) or loss (text) at each evaluated multiple of the training length
        "lengths": {str(r.multiplier): (r.accuracy if mqar else r.loss) for r in result.length_eval if not r.skipped},
        "curve": [(r["step"], r.get("eval_accuracy") if mqar else r.get("eval_loss"))
                  for r in result.metrics if r.get("type") == "eval"],
    }


def summary_table(rows: list[dict[str, Any]]) -> str:
    """One line per trained model: params, final eval loss, perplexity / MQAR recall vs chance, longer lengths."""
    mqar = any(r["recall"] is not None for r in rows)
    longer = sorted({m for r in rows for m in r.get("lengths", {}) if m != "1"}, key=int)
    name = "recall" if mqar else "loss"
    header = f"{'model':<20} {'layers':<10} {'params':>10} {'eval loss':>9} " + (
        f"{'recall':>7} {'chance':>7} {'guess':>7}" if mqar else f"{'ppl':>9}") + "".join(
        f" {name + '@' + m + 'x':>10}" for m in longer) + f" {'time':>7}"
    lines = [header, "-" * len(header)]
    for r in rows:
        tail = (f"{r['recall']:>7.3f} {r['chance']:>7.3f} {r['guess']:>7.3f}" if mqar else f"{r['perplexity']:>9.3f}")
        at = r.get("lengths", {})
        tail += "".join(f" {at[m]:>10.3f}" if at.get(m) is not None else f" {'-':>10}" for m in longer)
        lines.append(f"{r['model']:<20.20} {r['layers']:<10.10} {r['params']:>10,} {r['eval_loss']:>9.4f} "
                     f"{tail} {r['time']:>7}")
    return "\n".join(lines)


def plot_summary(rows: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """PNG: each model's eval recall (or loss) over training steps, and against the length multiple."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mqar = any(r["recall"] is not None for r in rows)
    name = "recall" if mqar else "eval loss"
    fig, (curves, lengths) = plt.subplots(1, 2, figsize=(11, 4))
    for r in rows:
        label = f"{r['model']} ({r['layers']}, {r['params'] / 1e3:.0f}K)"
        points = [(step, value) for step, value in r.get("curve", []) if value is not None]
        if points:
            curves.plot(*zip(*points), marker="o", label=label)
        at = sorted((int(m), v) for m, v in r.get("lengths", {}).items() if v is not None)
        if at:
            lengths.plot(*zip(*at), marker="o", label=label)
    if mqar and rows and rows[0]["guess"] is not None:
        for ax in (curves, lengths):
            ax.axhline(rows[0]["guess"], color="grey", linestyle=":", label="guess (1 / kv pairs)")
    curves.set_xlabel("step")
    curves.set_ylabel(name)
    curves.set_title(f"{name} during training")
    lengths.set_xscale("log", base=2)
    lengths.set_xlabel("eval length / training length")
    lengths.set_ylabel(name)
    lengths.set_title("length generalisation")
    curves.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_summary(base: Path, rows: list[dict[str, Any]]) -> Path:
    """``summary.txt`` (the table), ``summary.json`` (the rows) and ``summary.png`` in `base`; returns the text file."""
    (base / SUMMARY_FILE).write_text(summary_table(rows) + "\n")
    (base / "summary.json").write_text(json.dumps(rows, indent=2))
    plot_summary(rows, base / "summary.png", title=base.name)
    return base / SUMMARY_FILE
