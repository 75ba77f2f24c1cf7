"""`bmojo-neuron plan RECIPE [key=value ...]`: the Trn1 launch plan of a recipe, without running anything."""

from __future__ import annotations

import argparse
import json

from bmojo_neuron.cli import register_command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe name under recipes/ (e.g. trn1/bmojo-130m) or a YAML path")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="recipe overrides, passed on to `train` as well, e.g. parallel.tp=2")
    parser.add_argument("--nodes", type=int, default=1, help="number of instances (default 1)")
    parser.add_argument("--instance", default="trn1.32xlarge", choices=("trn1.32xlarge", "trn1.2xlarge"),
                        help="instance type: 32 NeuronCores (trn1.32xlarge) or 2 (trn1.2xlarge)")
    parser.add_argument("--cache-dir", default="/var/tmp/neuron-compile-cache",
                        help="Neuron compile cache (a path or s3://...), put in NEURON_CC_FLAGS")
    parser.add_argument("--master-port", type=int, default=29500, help="torchrun rendezvous port")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


@register_command("plan", help="show the Trn1 launch plan (torchrun/srun lines, environment, rank layout, "
                               "HBM per NeuronCore) and validate the shapes; runs nothing",
                  add_arguments=add_arguments)
def run(args: argparse.Namespace) -> int:
    from bmojo_neuron.compile_cache.location import check_cache_location
    from bmojo_neuron.launch.plan import build_plan
    from bmojo_neuron.recipes import load_recipe

    check_cache_location(args.cache_dir, "--cache-dir")
    recipe = load_recipe(args.recipe, args.overrides)
    plan = build_plan(recipe, args.recipe, args.overrides, nodes=args.nodes, instance=args.instance,
                      cache_dir=args.cache_dir, master_port=args.master_port)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else plan.format())
    return 0
