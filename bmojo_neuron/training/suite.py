"""Several runs of one recipe (its ``compare`` baseline or its ``suite``) and the table that compares them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bmojo_neuron.data.mqar import chance_recall, guess_recall

from .progress import format_seconds
from .trainer import TrainResult

RECALL_NOTE = ("chance = a uniform guess among the value tokens (1 / (vocab_size - vocab_size // 2)); "
               "guess = a uniform guess among the values present in the sequence (1 / num_kv_pairs): "
               "recall above it means the model matched keys to values")


def plan_runs(recipe: Any, output_dir: str | Path | None = None) -> list[tuple[Any, Path]]:
    """(recipe, run dir) of every run the recipe asks for.

    A plain recipe trains into its output dir. With ``suite`` every entry, and with
    ``compare`` the recipe and then its baseline, train into ``<output dir>/<name>``.
    """
    base = Path(output_dir or recipe.run.output_dir)
    if recipe.suite:
        variants = [(v.name, v.overrides) for v in recipe.suite]
    elif recipe.compare is not None:
        variants = [(recipe.run.name, {}), (recipe.compare.name, recipe.compare.overrides)]
    else:
        return [(recipe, base)]
    runs = []
    for name, overrides in variants:
        variant = recipe.with_overrides({"run.name": name, "run.output_dir": str(base / name), **overrides})
        runs.append((variant, base / name))
    return runs


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
    }


def summary_table(rows: list[dict[str, Any]]) -> str:
    """One line per trained model: params, final eval loss, perplexity / MQAR recall vs chance."""
    mqar = any(r["recall"] is not None for r in rows)
    header = f"{'model':<20} {'layers':<10} {'params':>10} {'eval loss':>9} " + (
        f"{'recall':>7} {'chance':>7} {'guess':>7}" if mqar else f"{'ppl':>9}") + f" {'time':>7}"
    lines = [header, "-" * len(header)]
    for r in rows:
        tail = (f"{r['recall']:>7.3f} {r['chance']:>7.3f} {r['guess']:>7.3f}" if mqar else f"{r['perplexity']:>9.3f}")
        lines.append(f"{r['model']:<20.20} {r['layers']:<10.10} {r['params']:>10,} {r['eval_loss']:>9.4f} "
                     f"{tail} {r['time']:>7}")
    return "\n".join(lines)


def write_summary(base: Path, rows: list[dict[str, Any]]) -> Path:
    """``summary.txt`` (the table) and ``summary.json`` (the rows) in `base`; returns the text file."""
    (base / "summary.txt").write_text(summary_table(rows) + "\n")
    (base / "summary.json").write_text(json.dumps(rows, indent=2))
    return base / "summary.txt"
