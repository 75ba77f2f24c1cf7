"""`bmojo-neuron inspect PATH`: what each B layer's eidetic memory holds, as a table and a PNG.

For a few eval sequences of the run's data: the memory after each chunk (positions and
innovation scores) and, on MQAR, where each query's pair is when the query arrives
(window, fading window, the memory its chunk reads, dropped by that memory, or too
recent for it) and how many of the queries at each place the model answers wrong; then
recall by the distance back to the pair, and how many wrong answers were another pair's value.
``--length M`` inspects the eval data at M times the training length, laid out as
`eval --lengths` lays it out, to see why recall changes with length.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from bmojo_neuron.cli import register_command, require_nonempty, say_on_terminal


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="RUN_OR_EXPORT",
                        help="a run directory (uses final/, else the latest checkpoint), a step-XXXXXXX "
                             "checkpoint or a final export")
    parser.add_argument("--sequences", type=int, default=8,
                        help="eval sequences to inspect (coverage counts all; the table shows --row)")
    parser.add_argument("--row", type=int, default=0, help="which inspected sequence the table and PNG show")
    parser.add_argument("--data", nargs="+", default=[], metavar="RECIPE|key=value",
                        help="evaluation data, as for `eval` (default: the run's data)")
    parser.add_argument("--length", type=int, default=1, metavar="M",
                        help="inspect the eval data at M times the training length, stretched as `eval --lengths` "
                             "stretches it (MQAR: every pair and query position p moves to M*p; default 1)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--output-dir", default=None,
                        help="where memory.{png,json} go (default: <run dir>/eval/<model folder>, "
                             "e.g. eval/final or eval/step-0000600; with --data, a data-... folder inside it)")


@register_command("inspect", help="show what each B layer's eidetic memory holds (table + PNG)",
                  add_arguments=add_arguments)
def run(args: argparse.Namespace) -> int:
    if args.sequences < 1:
        raise ValueError(f"--sequences must be >= 1, got {args.sequences}")
    if not 0 <= args.row < args.sequences:
        raise ValueError(f"--row must be in [0, --sequences) = [0, {args.sequences}), got {args.row}")
    if args.length < 1:
        raise ValueError(f"--length must be >= 1, got {args.length}")
    require_nonempty("--output-dir", args.output_dir)
    from bmojo_neuron.checkpoints.locate import resolve_sized_model_dir

    # a path that is no model, or a model with a missing or truncated file: one line, before torch loads
    model_dir = resolve_sized_model_dir(args.path, "inspect")
    from bmojo_neuron.commands.evaluate import (build_lines, check_data_source_early, check_output_dir_early,
                                                check_vocabulary, check_vocabulary_early, eval_recipe, output_dir,
                                                with_model_data_cache)

    check_data_source_early(args.data)  # so is a --data file that is missing, empty or not text
    check_output_dir_early(args.output_dir)  # and an --output-dir that is a file
    check_vocabulary_early(model_dir, args.data)  # and data the model has no embedding for
    say_on_terminal(f"inspecting {model_dir}: loading torch and the model, then tracing the eidetic memory over "
                    f"{args.sequences} eval sequence{'s' if args.sequences > 1 else ''}")
    from bmojo_neuron.checkpoints.inference import load_trained
    from bmojo_neuron.data import build_eval_dataset, library_progress_bars
    from bmojo_neuron.device import resolve_device, set_cpu_threads
    from bmojo_neuron.memory_inspection import (
        answer_breakdown,
        format_answers,
        format_memory_table,
        kv_coverage,
        kv_positions,
        plot_memory,
        trace_memory,
    )

    device = resolve_device(args.device, "--device", neuron=False)
    set_cpu_threads()
    trained = load_trained(args.path, device, "inspect")
    recipe = with_model_data_cache(eval_recipe(trained.recipe, args.data), trained, args.data)
    check_vocabulary(trained.model, recipe)
    out = output_dir(args.output_dir, trained, args.data)
    with library_progress_bars(sys.stderr.isatty()):  # in a log or a pipe each bar's redraw is another line
        eval_data = build_eval_dataset(recipe, args.length, build_lines(recipe))
    rows = eval_data[: args.sequences]
    if len(rows["input_ids"]) <= args.row:
        raise ValueError(f"the eval data has only {len(rows['input_ids'])} sequences; lower --row")
    traces = trace_memory(trained.model, rows["input_ids"].to(device))
    ids, labels = rows["input_ids"].numpy(), rows["labels"].numpy()
    mqar = recipe.data.kind == "mqar"
    kv = kv_positions(ids, labels)[args.row] if mqar else None
    coverage, answers = [], None
    if mqar:
        predictions = _predictions(trained.model, rows["input_ids"].to(device))
        coverage = [kv_coverage(t, ids, labels, predictions) for t in traces]
        answers = answer_breakdown(ids, labels, predictions)
    print(format_memory_table(traces, args.row, kv, coverage))
    if answers is not None:
        print("\n" + format_answers(answers))

    report = {
        "source": str(trained.source),
        "length_multiplier": args.length,
        "layers": [{"layer": t.layer, "chunk": t.chunk, "lag": t.lag,
                    "positions": t.positions.tolist(), "scores": t.scores.tolist()} for t in traces],
        "coverage": [{"layer": c.layer, "queries": c.queries, "keys": c.keys, "values": c.values,
                      "misses_by_value_place": c.value_misses,
                      "values_in_memory": c.memory_share("values"), "keys_in_memory": c.memory_share("keys")}
                     for c in coverage],
    }
    if answers is not None:
        report["answers_by_distance"] = [{"distance": [first, last], "queries": n, "correct": c}
                                         for first, last, n, c in answers.buckets()]
        report["wrong_answers"] = {"total": answers.wrong, "another_pairs_value": answers.wrong_other_value}
    (out / "memory.json").write_text(json.dumps(report, indent=2))
    plot = plot_memory(traces, out / "memory.png", args.row, kv, title=f"{recipe.run.name}: sequence {args.row}"
                       + (f" at {args.length}x" if args.length > 1 else ""))
    print(f"\nwrote {out / 'memory.json'} and {plot}")
    return 0


def _predictions(model: Any, input_ids: Any) -> Any:
    """The model's next-token argmax (batch, L) as a numpy array."""
    import torch

    with torch.no_grad():
        return model(input_ids).logits.argmax(-1).cpu().numpy()
