"""The runs one recipe asks for (itself, its ``compare`` baseline, or each ``suite`` entry) and their folders.

Kept apart from the training package, which imports torch and the trainer: `data prepare` and `train` name a
recipe's runs and their data caches before torch loads (seconds, more on a busy machine).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plan_runs(recipe: Any, output_dir: str | Path | None = None) -> list[tuple[Any, Path]]:
    """(recipe, run dir) of every run the recipe asks for.

    A plain recipe trains into its output dir. With ``suite`` every entry, and with
    ``compare`` the recipe and then its baseline, train into ``<output dir>/<name>``.
    An ``output_dir`` (``--output-dir``) becomes each run's ``run.output_dir``, so what
    derives from it (the text data cache ``<output dir>/../data-cache`` unless
    ``data.cache_dir`` is set, the stored ``recipe.json``) follows it too.
    """
    base = Path(output_dir or recipe.run.output_dir).expanduser()  # a quoted or `--output-dir=~/x` tilde
    if recipe.suite:
        variants = [(v.name, v.overrides) for v in recipe.suite]
    elif recipe.compare is not None:
        variants = [(recipe.run.name, {}), (recipe.compare.name, recipe.compare.overrides)]
    elif output_dir is not None and str(base) != recipe.run.output_dir:
        return [(recipe.with_overrides({"run.output_dir": str(base)}), base)]
    else:
        return [(recipe, base)]
    runs = []
    for name, overrides in variants:
        # Each run is one model: without the suite or comparison it came from, so the recipe.json it stores
        # trains (or resumes) that run alone, in its own directory, not the whole suite inside it.
        variant = recipe.with_overrides({"run.name": name, "run.output_dir": str(base / name), **overrides,
                                         "suite": None, "compare": None})
        runs.append((variant, base / name))
    return runs
