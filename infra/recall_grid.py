"""Train layer kinds on a grid of MQAR regimes through the CLI, seeds apart; table and plot of final recall.

    python infra/recall_grid.py --out runs/grid --kv 4 8 --seq 64 --patterns BB FF MM \\
        --seeds 0 1 2 --steps 600 --jobs 2 model.ssm_state_size=16
    python infra/recall_grid.py --out runs/grid --report   # table (mean ± std over seeds) and PNG only

Every run is `bmojo-neuron train RECIPE suite=none ...` (`--recipe`, default cpu-tiny) with the
overrides of its regime (`regime_overrides`), so what the grid measures is what a user gets
from the CLI. Windows and chunks scale with the sequence (``w = w_f = c = L / 16``, at least
4); every token is a candidate (``k = c``) and the memory holds half the sequence
(``M = L / 2``), the default run's proportions, and the vocabulary is 128 (``--vocab``).
``--keep-recipe-sizes`` keeps the recipe's own windows, chunks, picks, memory and vocabulary
instead (only the sequence and the pairs change), for a cell of the recipe's regime such as the
mqar-suite's at 8 pairs. Each pattern keeps the SwiGLU width the
recipe's own suite gives it (its parameters within 10% of the B'MOJO model's). Run seed and
data seed are both the seed. Every run's recipe is loaded and checked before the first run
starts, so a cell the recipe cannot hold (more pairs than its vocabulary has keys) is one error
line, not a failed run in a log. A finished run (a final eval in its ``metrics.jsonl``) is not
run again, so an interrupted grid resumes where it stopped. A run evaluates at the training length
only (``eval.length_multipliers=[1]``) unless an override asks for more, e.g.
``eval.length_multipliers=[1,2,4]``; its row then also carries ``length_recall`` (multiplier ->
recall, from the run's ``length_eval.json``), which the table reports beside the recall. Rows
without it (older files, runs at 1x only) stay valid. Recipe overrides go before the
options or after ``--``: the list options (``--kv``, ``--seq``, ``--seeds``, ``--patterns``,
``--include``) take every word up to the next option.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def mlp_widths(recipe: str) -> dict[str, int]:
    """SwiGLU width per layer kind from the recipe's suite (the entry's override, else the recipe's own)."""
    from bmojo_neuron.recipes import load_recipe

    loaded = load_recipe(recipe)
    widths = {}
    for entry in loaded.suite or []:
        pattern = entry.overrides.get("model.layer_pattern", loaded.model["layer_pattern"])
        widths[pattern[0]] = entry.overrides.get("model.intermediate_size", loaded.model["intermediate_size"])
    return widths


def regime_overrides(kv: int, seq: int, vocab: int | None = None, keep_recipe_sizes: bool = False) -> list[str]:
    """Data and model overrides of one regime: windows, chunk and memory scaled with the sequence, vocabulary
    `vocab` (default 128). With `keep_recipe_sizes` only the sequence and the pairs are set (and the
    vocabulary if `vocab` is given): the recipe's windows, chunks, picks, memory and vocabulary stay."""
    overrides = [f"data.seq_len={seq}", f"data.num_kv_pairs={kv}"]
    if keep_recipe_sizes:
        return overrides + ([] if vocab is None else [f"data.vocab_size={vocab}"])
    window = max(4, seq // 16)
    return overrides + [f"data.vocab_size={128 if vocab is None else vocab}",
                        f"model.window_size={window}", f"model.fading_window={window}",
                        f"model.memory_chunk={window}", f"model.memory_picks={window}",
                        f"model.memory_size={seq // 2}", f"model.ssm_chunk_size={min(seq, 64)}"]


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``NAME[:key=value,key=value]`` -> (NAME, overrides)."""
    name, _, overrides = text.partition(":")
    return name, [o for o in overrides.split(",") if o]


def run_name(pattern: str, variant: str, kv: int, seq: int, seed: int) -> str:
    return f"{pattern}{'-' + variant if variant else ''}_kv{kv}_L{seq}_s{seed}"


def final_recall(run_dir: Path) -> float | None:
    """Recall of the last eval in the run's metrics.jsonl, None if the run has not finished one."""
    metrics = run_dir / "metrics.jsonl"
    if not (run_dir / "final").exists() or not metrics.exists():
        return None
    evals = [json.loads(line) for line in metrics.read_text().splitlines() if '"eval"' in line]
    return evals[-1]["eval_accuracy"] if evals else None


def length_recall(run_dir: Path) -> dict[str, float] | None:
    """Recall at each longer length the run evaluated (``length_eval.json``), keyed by the multiplier as a
    string (a JSON object's key); None when it evaluated at the training length only."""
    path = run_dir / "length_eval.json"
    if not path.exists():
        return None
    longer = {str(r["multiplier"]): r["accuracy"] for r in json.loads(path.read_text())
              if r["multiplier"] != 1 and r.get("accuracy") is not None}  # a skipped length has no accuracy
    return longer or None


def run_overrides(name: str, width: int, pattern: str, seed: int, steps: int, eval_every: int,
                  regime: list[str], extra: list[str]) -> list[str]:
    """Every recipe override of one grid run after ``suite=none``: its name and seeds, its layer kind at its
    SwiGLU width, its budget, its regime and the extra overrides (last, so they win)."""
    return [f"run.name={name}", f"run.seed={seed}", f"data.seed={seed}", f"model.layer_pattern={pattern}",
            f"model.intermediate_size={width}", f"model.num_hidden_layers={len(pattern)}", f"train.steps={steps}",
            f"eval.every={eval_every or steps}", f"checkpoint.every={steps}", "eval.length_multipliers=[1]",
            *regime, *extra]


def run_recipe(recipe: str, name: str, width: int, pattern: str, seed: int, steps: int, eval_every: int,
               regime: list[str], extra: list[str]):
    """The recipe one grid run trains (`recipe` with ``suite=none`` and the run's overrides), loaded and checked."""
    from bmojo_neuron.recipes import load_recipe

    return load_recipe(recipe, ["suite=none", *run_overrides(name, width, pattern, seed, steps, eval_every, regime,
                                                              extra)])


def train_one(out: Path, recipe: str, width: int, pattern: str, variant: str, extra: list[str], kv: int, seq: int,
              seed: int, steps: int, eval_every: int, regime: list[str]) -> dict:
    name = run_name(pattern, variant, kv, seq, seed)
    run_dir = out / name
    recall = final_recall(run_dir)
    if recall is None:
        if run_dir.exists():
            subprocess.run(["rm", "-rf", str(run_dir)], check=True)
        argv = ["nice", "-n", "10", sys.executable, "-m", "bmojo_neuron.cli", "train", recipe, "suite=none",
                "--output-dir", str(run_dir), "--no-progress",
                *run_overrides(name, width, pattern, seed, steps, eval_every, regime, extra)]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with open(out / f"{name}.log", "w") as log:
            subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, check=False)
        recall = final_recall(run_dir)
    print(f"{name}: recall {recall}", flush=True)
    row = {"pattern": pattern, "variant": variant, "kv": kv, "seq": seq, "seed": seed, "steps": steps,
           "recall": recall}
    longer = length_recall(run_dir) if recall is not None else None
    return row if longer is None else {**row, "length_recall": longer}


def collect(out: Path, include: Sequence[Path] = ()) -> list[dict]:
    """Every finished run under `out` (recorded in results.jsonl by the runs of this script), and the runs
    recorded in `include` (results.jsonl files of runs made elsewhere, e.g. on another machine)."""
    rows = []
    for path in [*include, out / "results.jsonl"]:
        if path.exists():
            rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    latest = {(r["pattern"], r["variant"], r["kv"], r["seq"], r["seed"], r["steps"]): r for r in rows}
    return [r for r in latest.values() if r["recall"] is not None]


def length_cell(rows: list[dict]) -> str:
    """Mean recall over seeds at each longer length the rows carry (``2x 0.211 / 4x 0.094``), with the count
    of seeds when only some rows carry it; "-" when none does."""
    lengths: dict[str, list[float]] = {}
    for r in rows:
        for multiplier, recall in (r.get("length_recall") or {}).items():
            lengths.setdefault(multiplier, []).append(recall)
    parts = []
    for multiplier, values in sorted(lengths.items(), key=lambda item: float(item[0])):
        some = f" ({len(values)} of {len(rows)} seeds)" if len(values) < len(rows) else ""
        parts.append(f"{multiplier}x {statistics.mean(values):.3f}{some}")
    return " / ".join(parts) or "-"


def table(rows: list[dict]) -> str:
    """Markdown: one line per (model, regime, steps), recall mean ± std over seeds; with a column of the mean
    recall at longer lengths when any row carries ``length_recall``."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["kv"], r["seq"], r["steps"], r["pattern"] + (f" {r['variant']}" if r["variant"] else "")),
                          []).append(r)
    with_lengths = any(r.get("length_recall") for r in rows)
    lines = ["| kv pairs | seq | steps | model | recall (mean ± std) | seeds |", "|---|---|---|---|---|---|"]
    if with_lengths:
        lines = [lines[0] + " longer lengths (mean) |", lines[1] + "---|"]
    for (kv, seq, steps, model), group in sorted(groups.items()):
        values = [r["recall"] for r in group]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        lines.append(f"| {kv} | {seq} | {steps} | {model} | {statistics.mean(values):.3f} ± {spread:.3f} | "
                     f"{len(values)} |" + (f" {length_cell(group)} |" if with_lengths else ""))
    return "\n".join(lines)


def rule_table(rows: list[dict], margin: float = 0.05) -> str:
    """Markdown: per regime and step budget, whether B'MOJO (BB) is at least the SSM-only (MM) and the
    fading-only (FF) model's mean recall minus `margin`; cells without all three (unnamed variant) are
    left out."""
    means: dict[tuple[int, int, int], dict[str, list[float]]] = {}
    for r in rows:
        if not r["variant"]:
            means.setdefault((r["kv"], r["seq"], r["steps"]), {}).setdefault(r["pattern"], []).append(r["recall"])
    lines = ["| kv pairs | seq | steps | BB | MM | FF | BB - MM | BB - FF | rule |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (kv, seq, steps), by in sorted(means.items()):
        if not {"BB", "MM", "FF"} <= by.keys():
            continue
        bb, mm, ff = (statistics.mean(by[p]) for p in ("BB", "MM", "FF"))
        holds = bb >= mm - margin and bb >= ff - margin
        lines.append(f"| {kv} | {seq} | {steps} | {bb:.3f} | {mm:.3f} | {ff:.3f} | {bb - mm:+.3f} | {bb - ff:+.3f} | "
                     f"{'holds' if holds else 'FAILS'} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Recall in every regime and step budget of the grid (x: kv pairs / sequence / steps, ordered by
    sequence, pairs, steps), a line of means per model (same colour everywhere), each seed as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regimes = sorted({(r["seq"], r["kv"], r["steps"]) for r in rows})
    models = sorted({(r["pattern"], r["variant"]) for r in rows})
    fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * len(regimes) + 2), 3.6))
    for i, (pattern, variant) in enumerate(models):
        shift = 0.08 * (i - (len(models) - 1) / 2)  # seeds of different models side by side, not on top
        xs, means = [], []
        for x, regime in enumerate(regimes):
            recalls = [r["recall"] for r in rows
                       if (r["seq"], r["kv"], r["steps"], r["pattern"], r["variant"]) == (*regime, pattern, variant)]
            if recalls:
                xs.append(x)
                means.append(statistics.mean(recalls))
                ax.scatter([x + shift] * len(recalls), recalls, s=9, color=f"C{i}", alpha=0.5)
        ax.plot(xs, means, marker="o", color=f"C{i}", label=pattern + (f" {variant}" if variant else ""))
    ax.set_xticks(range(len(regimes)))
    ax.set_xticklabels([f"{kv} pairs\nseq {seq}\n{steps} steps" for seq, kv, steps in regimes], fontsize=8)
    ax.set(ylabel="MQAR recall (mean; dots: seeds)", ylim=(0, 1.02), xlim=(-0.5, len(regimes) - 0.5))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def misplaced_override_hint(text: object) -> str:
    """A hint for a key=value read as the value of a list option: those options take every word up to
    the next option, so an override written after one of them lands in its list."""
    return " (a recipe override? put overrides before the options, or after --)" if "=" in str(text) else ""


def grid_int(text: str) -> int:
    """An integer option value; a misplaced override is named as one instead of as a bad integer."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer{misplaced_override_hint(text)}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder of the runs, results.jsonl, grid.md, grid.png")
    parser.add_argument("--recipe", default="cpu-tiny", help="base recipe; its suite gives each kind's SwiGLU width")
    parser.add_argument("--patterns", nargs="+", default=["BB", "MM", "FF"],
                        help="layer patterns of one kind each (BB, MM, FF, SS, AA, or one layer: B, M, ...)")
    parser.add_argument("--kv", type=grid_int, nargs="+", default=[4, 16, 32])
    parser.add_argument("--seq", type=grid_int, nargs="+", default=[64, 256])
    parser.add_argument("--seeds", type=grid_int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--vocab", type=int, default=None,
                        help="MQAR vocabulary (keys below V/2: 128 holds 32 pairs; default 128, or the recipe's "
                             "with --keep-recipe-sizes)")
    parser.add_argument("--keep-recipe-sizes", action="store_true",
                        help="keep the recipe's windows, chunks, picks, memory and vocabulary instead of scaling "
                             "them with the sequence; only --seq and --kv change the regime")
    parser.add_argument("--eval-every", type=int, default=0, help="steps between evals (default: only at the end)")
    parser.add_argument("--variant", action="append", default=None, metavar="NAME[:KEY=VALUE,...]",
                        help="a model variant: its name (part of each run's name) and its overrides; repeat "
                             "for several (default: one unnamed variant)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (each uses one thread)")
    parser.add_argument("--report", action="store_true", help="only write the table and plot of finished runs")
    parser.add_argument("--plot", type=Path, help="PNG path (default: OUT/grid.png)")
    parser.add_argument("--include", type=Path, nargs="+", default=[], metavar="RESULTS_JSONL",
                        help="results.jsonl files of runs made elsewhere, added to the table and plot")
    parser.add_argument("overrides", nargs="*", help="extra recipe overrides for every run, key=value")
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    widths = mlp_widths(args.recipe)
    for pattern in args.patterns:
        if len(set(pattern)) != 1 or pattern[0] not in widths:
            parser.error(f"--patterns: {pattern!r} is not one layer kind of the {args.recipe} suite "
                         f"({''.join(widths)}) repeated{misplaced_override_hint(pattern)}")
    for path in args.include:  # before any run starts
        if not path.is_file():
            parser.error(f"--include: {path} is not a file{misplaced_override_hint(path)}")
    args.out.mkdir(parents=True, exist_ok=True)
    variants = [parse_variant(text) for text in args.variant or [""]]
    if not args.report:
        jobs = [(widths[p[0]], p, name, [*args.overrides, *extra], kv, seq, seed, args.steps, args.eval_every,
                 regime_overrides(kv, seq, args.vocab, args.keep_recipe_sizes))
                for seq in args.seq for kv in args.kv for seed in args.seeds
                for p in args.patterns for name, extra in variants if 4 * kv <= seq]
        for width, pattern, variant, extra, kv, seq, seed, steps, eval_every, regime in jobs:  # before any run
            name = run_name(pattern, variant, kv, seq, seed)
            try:
                run_recipe(args.recipe, name, width, pattern, seed, steps, eval_every, regime, extra).model_config()
            except ValueError as err:
                parser.error(f"{name}: {err}")
        with ThreadPoolExecutor(args.jobs) as pool, open(args.out / "results.jsonl", "a") as results:
            for row in pool.map(lambda job: train_one(args.out, args.recipe, *job), jobs):
                results.write(json.dumps(row) + "\n")
                results.flush()
    rows = collect(args.out, args.include)
    report = f"{table(rows)}\n\n{rule_table(rows)}\n"
    (args.out / "grid.md").write_text(report)
    print(report, end="")
    if rows:
        plot(rows, args.plot or args.out / "grid.png")


if __name__ == "__main__":
    main()
