"""`bmojo-neuron data prepare RECIPE [key=value ...]`: build a recipe's text data cache once, ahead of training.

Text recipes tokenize and pack their corpus into a `save_to_disk` folder under
``data.cache_dir`` the first time they load it (`bmojo_neuron.data.text`, built in
a temporary folder and renamed into place). On Trainium every torchrun rank loads
the data, so build the cache once on the node (or the shared filesystem) before
launching: the ranks then only read it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from bmojo_neuron.cli import register_command, require_nonempty


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    prepare = sub.add_parser("prepare", help="tokenize and pack the recipe's text data into its cache",
                             description="tokenize and pack the recipe's text data into data.cache_dir "
                                         "(a save_to_disk folder), then print where it is and its size")
    prepare.add_argument("recipe", help="recipe name under recipes/ or a YAML path")
    prepare.add_argument("overrides", nargs="*", default=[], metavar="key=value",
                         help="recipe overrides, e.g. data.path=/data/corpus data.cache_dir=/fsx/cache")
    prepare.add_argument("--output-dir", default=None,
                         help="the --output-dir the training will get: the cache is built where that run reads "
                              "it (<dir>/../data-cache, a suite's <dir>/data-cache, unless data.cache_dir is set)")
    prepare.add_argument("--no-progress", action="store_true",
                         help="plain lines of each stage on stderr instead of the datasets library's progress "
                              "bars (the default when stderr is not a terminal: a log file or a pipe)")


@register_command("data", help="prepare training data ahead of a run (`data prepare RECIPE`)",
                  add_arguments=add_arguments)
def run(args: argparse.Namespace) -> int:
    from bmojo_neuron.recipes import load_recipe  # checks the recipe without torch or datasets: a bad one fails fast

    require_nonempty("--output-dir", args.output_dir)
    recipe = load_recipe(args.recipe, args.overrides)
    if recipe.data.kind != "text":
        print(f"{recipe.run.name}: data.kind is {recipe.data.kind}: generated in memory when training starts, "
              "nothing to prepare")
        return 0
    if recipe.data.path is not None:  # a missing or bad source is refused before torch and datasets load (seconds)
        from bmojo_neuron.data.text import check_source

        check_source(str(Path(recipe.data.path).expanduser()), recipe.data.text_column)
    from bmojo_neuron.data.text import check_build_tokenizer
    from bmojo_neuron.recipe_runs import plan_runs

    # The data section of each run `train` would start: the cache's default folder derives from the run's
    # output dir, which --output-dir and a suite's run folders move, so the recipe's own would miss it.
    runs = plan_runs(recipe, args.output_dir)
    for variant, _ in runs:  # a tokenizer that can be neither read nor fetched: one line before datasets loads
        check_build_tokenizer(variant.data)
    from bmojo_neuron.data import library_progress_bars
    from bmojo_neuron.data.build_progress import BuildProgress, stderr_lines
    from bmojo_neuron.data.prepare import prepare_text

    prepared: list[Any] = []
    # Bars redraw in place: in a log file or a pipe each redraw is another line of carriage returns, so there
    # the build says its stages in plain lines instead.
    bars = not args.no_progress and sys.stderr.isatty()
    with library_progress_bars(bars):
        for variant, _ in runs:
            if variant.data not in prepared:
                prepared.append(variant.data)
                progress = None if bars else BuildProgress(stderr_lines(f"{variant.run.name}: "))
                print("\n".join(report_lines(variant, prepare_text(variant, progress))), flush=True)
    return 0


def report_lines(recipe: Any, report: dict[str, Any]) -> list[str]:
    size = report["block_size"]
    train, evaluation = report["train_blocks"], report["eval_blocks"]
    how = "built now" if report["built"] else "already there" if report["path"].name.startswith("text-") \
        else "packed source, read as it is"
    return [
        f"{recipe.run.name}: {report['path']} ({how})",
        f"  train  {train:,} blocks × {size} tokens = {train * size:,} tokens",
        f"  eval   {evaluation:,} blocks × {size} tokens = {evaluation * size:,} tokens",
        "  train with the same data.* settings to use it (the cache key hashes the source, tokenizer and packing)",
    ]
