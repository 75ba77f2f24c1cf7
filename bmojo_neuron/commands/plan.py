"""`bmojo-neuron plan RECIPE [key=value ...]`: the Trn1 launch plan of a recipe, without running anything.

``--check-graph`` adds the CPU trace of the recipe's training step and what neuronx-cc would refuse in it
(`bmojo_neuron.training.step_graph`; docs/trn1.md, "Checking the graph before the first compile").
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from bmojo_neuron.cli import register_command, say_on_terminal


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe name under recipes/ (e.g. trn1/bmojo-130m) or a YAML path")
    parser.add_argument("overrides", nargs="*", default=[], metavar="key=value",
                        help="recipe overrides, passed on to `train` as well, e.g. parallel.tp=2")
    parser.add_argument("--nodes", type=int, default=1, help="number of instances (default 1)")
    parser.add_argument("--instance", default="trn1.32xlarge", choices=("trn1.32xlarge", "trn1.2xlarge"),
                        help="instance type: 32 NeuronCores (trn1.32xlarge) or 2 (trn1.2xlarge)")
    parser.add_argument("--cache-dir", default="/var/tmp/neuron-compile-cache",
                        help="Neuron compile cache (a path or s3://...), put in NEURON_CC_FLAGS")
    parser.add_argument("--master-port", type=int, default=29500, help="torchrun rendezvous port")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--check-graph", action="store_true",
                        help="also trace the training step on fake tensors (CPU, no Neuron SDK; a minute or more) "
                             "and list what neuronx-cc 2.23 would refuse in it by its error-code pages, and any "
                             "data-dependent shape; exit status 1 when it finds any (docs/trn1.md)")


@register_command("plan", help="show the Trn1 launch plan (torchrun/srun lines, environment, rank layout, "
                               "HBM per NeuronCore) and validate the shapes; runs nothing",
                  add_arguments=add_arguments)
def run(args: argparse.Namespace) -> int:
    from bmojo_neuron.compile_cache.location import check_cache_location
    from bmojo_neuron.launch.plan import build_plan
    from bmojo_neuron.recipes import load_recipe

    check_cache_location(args.cache_dir, "--cache-dir")
    recipe = load_recipe(args.recipe, args.overrides)
    say_on_terminal(f"planning {args.recipe}: loading torch to build the model's shapes (no weights) for the "
                    "memory estimate")
    plan = build_plan(recipe, args.recipe, args.overrides, nodes=args.nodes, instance=args.instance,
                      cache_dir=args.cache_dir, master_port=args.master_port)
    if not args.check_graph:
        print(json.dumps(plan.to_dict(), indent=2) if args.json else plan.format())
        return 0
    if not args.json:  # the plan first: it is ready long before the trace
        print(plan.format(), flush=True)
    check = check_graph(args.recipe, args.overrides, plan.memory.microbatch_size)
    if args.json:
        print(json.dumps({**plan.to_dict(), "graph_check": check_json(check)}, indent=2))
    else:
        print("\n" + "\n".join(check_lines(check)))
    return 1 if check.findings else 0


def check_graph(recipe: str, overrides: list[str], batch: int) -> Any:
    """The graph check of the recipe's training step at `batch` sequences (one NeuronCore's micro-batch), with
    its progress on stderr; its time includes loading torch and the model code."""
    def progress(line: str) -> None:
        print(f"graph check: {line}", file=sys.stderr, flush=True)

    start = time.monotonic()
    progress(f"{recipe}: loading torch and the model")
    from bmojo_neuron.training.step_graph import check_recipe_graph

    check = check_recipe_graph(recipe, overrides, progress, batch)
    return check._replace(seconds=time.monotonic() - start)


def check_lines(check: Any) -> list[str]:
    """The findings, one a line (code, page, what, where, graph), and the summary with the time taken."""
    from bmojo_neuron.compiler_rules import SDK_DOCS

    shards = (f", the shards of tensor-parallel rank 0 of {check.tp}{' (sequence-parallel)' if check.sp else ''}"
              if check.tp > 1 else "")
    traced = (f"layers {check.pattern} (one per kind: findings are per op), {check.batch} × {check.length} tokens"
              f"{shards}, torch reference ops in place of the NKI kernels")
    head = [f"graph check (neuronx-cc 2.23 error-code pages, {SDK_DOCS}; {traced}):"]
    count = len(check.findings)
    verdict = (f"{count} finding{'s' if count != 1 else ''}: the compiler would refuse the step, or compile a new "
               "graph every step" if count else "no finding")
    return head + [f"  {finding}" for finding in check.findings] + [f"{verdict} ({check.seconds:.1f} s)"]


def check_json(check: Any) -> dict[str, Any]:
    from bmojo_neuron.compiler_rules import SDK_DOCS

    return {"findings": [f.to_dict() for f in check.findings], "seconds": round(check.seconds, 1),
            "layers": check.pattern, "tokens": check.length, "batch": check.batch, "tp": check.tp, "sp": check.sp,
            "sdk_docs": SDK_DOCS}
