"""`bmojo-neuron eval PATH`: held-out loss / perplexity / MQAR recall at several lengths, table + PNG."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Sequence

from bmojo_neuron.cli import register_command, require_nonempty, say_on_terminal


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="RUN_OR_EXPORT",
                        help="a run directory (uses final/, else the latest checkpoint), a step-XXXXXXX "
                             "checkpoint or a final export")
    parser.add_argument("--data", nargs="+", default=[], metavar="RECIPE|key=value",
                        help="evaluation data: a recipe whose data section replaces the run's, and/or "
                             "data overrides such as seq_len=128 num_kv_pairs=16 (default: the run's data)")
    parser.add_argument("--lengths", default="1,2,4,8",
                        help="comma-separated multiples of the training length (default 1,2,4,8)")
    parser.add_argument("--batches", type=int, default=None, help="eval batches per length (default: eval.batches)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the run's train.batch_size")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--output-dir", default=None,
                        help="where length_eval.{png,json} go (default: <run dir>/eval/<model folder>, "
                             "e.g. eval/final or eval/step-0000600; with --data, a data-... folder inside it)")


def parse_lengths(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--lengths must be comma-separated integers like 1,2,4,8, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise ValueError(f"--lengths must be positive integers, got {text!r}")
    return values


def eval_recipe(saved: dict, data_args: list[str]):
    """The run's recipe with its data section replaced / overridden by ``--data``.

    A model that no run produced (a primed or exported folder) stores no recipe: then the
    first recipe named in ``--data`` is used whole (its data, batch size and precision).
    """
    from bmojo_neuron.recipes import Recipe, load_recipe

    named = [item for item in data_args if "=" not in item]
    if not saved and not named:
        raise ValueError("this model has no recipe stored with it (a primed or exported folder); name one with "
                         "--data RECIPE to say which data to evaluate on")
    raw = dict(saved) if saved else load_recipe(named[0]).to_dict()
    overrides = {}
    for item in data_args:
        if "=" in item:
            key, value = item.split("=", 1)
            key = key if key.startswith("data.") else f"data.{key}"
            overrides[key] = value
        else:
            raw["data"] = load_recipe(item).to_dict()["data"]
    recipe = Recipe.from_dict(raw)
    if overrides:
        recipe = recipe.with_overrides([f"{k}={v}" for k, v in overrides.items()])
    return recipe


def with_model_data_cache(recipe: Any, trained: Any, data_args: Sequence[str]) -> Any:
    """The recipe, its text data cache moved to where the model keeps its data, unless it was placed on purpose.

    A recipe's default ``data.cache_dir`` is relative, derived from a ``run.output_dir`` relative to wherever it
    was trained or is named from (``runs/data-cache``): read from this working folder it would build a new
    cache in any folder eval is started from. A model in a run (its ``final/`` or a checkpoint) uses the cache
    `train` put beside that run, ``<run dir>/../data-cache``, so the run's own text data is found built there;
    a folder that is itself the model (primed, converted) belongs to no run and uses the user cache,
    ``~/.cache/bmojo-neuron``. An absolute ``data.cache_dir`` (set in the run's or the named recipe), and
    ``--data data.cache_dir=...``, stay as they are.
    """
    from bmojo_neuron.data.text import DEFAULT_CACHE_DIR

    given = any(item.split("=", 1)[0] in ("cache_dir", "data.cache_dir") for item in data_args if "=" in item)
    if recipe.data.kind != "text" or given or Path(recipe.data.cache_dir).expanduser().is_absolute():
        return recipe
    in_run = trained.run_dir != trained.source
    home = trained.run_dir.absolute().parent / "data-cache" if in_run else DEFAULT_CACHE_DIR
    return recipe.with_overrides({"data.cache_dir": str(home)})


def check_data_source_early(data_args: Sequence[str]) -> None:
    """The text ``data.path`` that ``--data`` names (an override, else the last recipe named), when it is missing,
    empty or not text at a glance: one line before torch loads, as `train` and `data prepare` answer it
    (`data.text.check_source`, which reads the file system only). Overrides win over a named recipe's path and
    text column, as in `eval_recipe`; without either the column is the model's, not known yet, and its key is
    left to the build."""
    from bmojo_neuron.data.text import check_source
    from bmojo_neuron.recipes import load_recipe

    def given(key: str) -> list[str]:
        return [item.split("=", 1)[1] for item in data_args if item.split("=", 1)[0] in (key, f"data.{key}")]

    paths, columns = given("path"), given("text_column")
    for item in (item for item in data_args if "=" not in item):
        data = load_recipe(item).data
        if data.kind == "text" and data.path is not None:
            paths.insert(0, data.path)
        if data.kind == "text":
            columns.insert(0, data.text_column)
    if paths and paths[-1] not in ("", "null", "None"):
        check_source(str(Path(paths[-1]).expanduser()), columns[-1] if columns else None)


def check_vocabulary(model: Any, recipe: Any) -> None:
    """ValueError when the evaluation data holds token ids the model has no embedding for (data of a larger
    vocabulary than the one it was trained on), before any data is built."""
    from bmojo_neuron.data import data_vocabulary

    refuse_larger_vocabulary(data_vocabulary(recipe.data), model.config.vocab_size)


def check_vocabulary_early(model_dir: Path, data_args: Sequence[str]) -> None:
    """`check_vocabulary` before torch loads, where files decide it: the model's vocabulary from its config.json,
    the data from its stored recipe and ``--data`` (`eval_recipe`, whose refusals come here too), when its ids
    are counted without transformers (`data.data_vocabulary_from_files`: MQAR's ``data.vocab_size``, the byte
    tokenizer's 256, a local tokenizer folder's tokenizer.json). Any other tokenizer is counted after the load
    (`check_vocabulary`): counting it imports transformers."""
    from bmojo_neuron.checkpoints.state import stored_recipe
    from bmojo_neuron.data import data_vocabulary_from_files

    try:
        vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    except (OSError, ValueError, KeyError, TypeError):  # the loader says what is wrong with the folder
        return
    data = eval_recipe(stored_recipe(model_dir), list(data_args)).data
    counted = data_vocabulary_from_files(data)
    if isinstance(vocab, int) and counted is not None:
        refuse_larger_vocabulary(counted, vocab)


def refuse_larger_vocabulary(data: tuple[int, str], vocab: int) -> None:
    """ValueError when data of `data` = (ids, what sets their count) does not fit a model of `vocab` ids."""
    size, source = data
    if size > vocab:
        raise ValueError(f"the evaluation data has token ids up to {size - 1} ({source}), outside this model's "
                         f"vocabulary ({vocab}); pick --data of the kind the model was trained on")


def count_option(option: str, value: int | None, default: int) -> int:
    """`value` of a count option, `default` when it was not given; ValueError below 1."""
    if value is None:
        return default
    if value < 1:
        raise ValueError(f"{option} must be >= 1, got {value}")
    return value


def default_output_dir(trained: Any, data_args: Sequence[str] = ()) -> Path:
    """``<run dir>/eval/<model folder>`` (``eval/final``, ``eval/step-0000600``): one folder per model a run
    holds, so evaluating a checkpoint never overwrites the results of its final export, nor of another
    checkpoint. A folder that is itself the model (a converted or primed one) holds one model: ``<folder>/eval``.
    Other data (`--data`) get a folder of their own inside it, named after the arguments
    (``eval/final/data-num_kv_pairs=16``), so they never overwrite the results on the run's own data.
    """
    base = trained.run_dir / "eval"
    if trained.source != trained.run_dir:
        base = base / trained.source.name
    return base / data_folder_name(data_args) if data_args else base


def data_folder_name(data_args: Sequence[str]) -> str:
    """``data-`` and the `--data` arguments, a recipe by its file stem, joined by ``_``; characters a folder
    name should not hold become ``-``."""
    parts = [Path(a).stem if "=" not in a else a for a in data_args]
    return "data-" + re.sub(r"[^A-Za-z0-9._=+-]", "-", "_".join(parts))


def output_dir(option: str | None, trained: Any, data_args: Sequence[str] = ()) -> Path:
    """Where eval and inspect write: ``--output-dir``, else `default_output_dir`; created and checked writable
    now, so a bad folder fails before the evaluation rather than after it."""
    from bmojo_neuron.preflight import check_writable

    out = Path(option) if option is not None else default_output_dir(trained, data_args)
    check_writable(out, "pick another --output-dir")
    return out


def check_output_dir_early(option: str | None) -> None:
    """A ``--output-dir`` that a file stands in, refused before torch loads (`output_dir` checks the folder whole
    once the model is loaded, which its default needs)."""
    if option is not None:
        from bmojo_neuron.preflight import check_no_file_in_the_way

        check_no_file_in_the_way(Path(option), "pick another --output-dir")


def evaluating_line(source: Path, recipe: Any, lengths: Sequence[int], batches: int, batch_size: int) -> str:
    """What eval is about to do: the model, the length multiples with the training length, the batches."""
    multiples = ", ".join(f"{m}x" for m in lengths)
    return (f"evaluating {source} at {multiples} the training length ({recipe.data.sequence_length} tokens), up to "
            f"{batches} batch{'es' if batches > 1 else ''} of {batch_size} sequences each")


def eval_title(trained: Any, data_args: Sequence[str], where: bool = True) -> str:
    """The model evaluated and, with ``--data``, the data it was evaluated on, named apart: a folder no run
    produced (primed, converted) stores no recipe, and the recipe ``--data`` names for it is the data's, not the
    model's. The model is its run's name, else its folder's; `where` adds the folder read (``runs/x/final``)."""
    name = (trained.recipe.get("run") or {}).get("name") or trained.source.name
    title = f"{name} ({trained.source})" if where else str(name)
    if data_args:
        title += ", data: " + " ".join(Path(a).stem if "=" not in a else a for a in data_args)
    return title


def build_lines(recipe: Any) -> Any:
    """Where the libraries' bars are off (stderr not a terminal: a log, a pipe), a `BuildProgress` that says a
    text cache build's stages on stderr after the run's name, as `data prepare` does; None on a terminal."""
    from bmojo_neuron.data.build_progress import BuildProgress, stderr_lines

    return None if sys.stderr.isatty() else BuildProgress(stderr_lines(f"{recipe.run.name}: "))


@register_command("eval", help="evaluate a trained model: loss, perplexity, MQAR recall, length generalisation",
                  add_arguments=add_arguments)
def run(args: argparse.Namespace) -> int:
    lengths = parse_lengths(args.lengths)
    require_nonempty("--output-dir", args.output_dir)
    for option, value in (("--batches", args.batches), ("--batch-size", args.batch_size)):
        count_option(option, value, 1)  # a count below 1 is refused before torch loads; the defaults come later
    from bmojo_neuron.checkpoints.locate import resolve_sized_model_dir

    # a path that is no model, or a model with a missing or truncated file: one line, before torch loads
    model_dir = resolve_sized_model_dir(args.path, "eval")
    check_data_source_early(args.data)
    check_output_dir_early(args.output_dir)
    check_vocabulary_early(model_dir, args.data)
    say_on_terminal(f"eval {model_dir}: loading torch and the model, then the evaluation data")
    from bmojo_neuron.checkpoints.inference import load_trained
    from bmojo_neuron.data import build_datasets, library_progress_bars
    from bmojo_neuron.device import resolve_device, set_cpu_threads
    from bmojo_neuron.evaluation import format_length_table, length_generalisation, plot_length

    device = resolve_device(args.device, "--device", neuron=False)
    set_cpu_threads()
    trained = load_trained(args.path, device, "eval")
    recipe = with_model_data_cache(eval_recipe(trained.recipe, args.data), trained, args.data)
    batch_size = count_option("--batch-size", args.batch_size, recipe.train.batch_size)
    batches = count_option("--batches", args.batches, recipe.eval.batches)
    check_vocabulary(trained.model, recipe)
    out = output_dir(args.output_dir, trained, args.data)
    # Several lengths take tens of seconds on a CPU before the table prints: say what is being done.
    print(evaluating_line(trained.source, recipe, lengths, batches, batch_size), file=sys.stderr, flush=True)
    with library_progress_bars(sys.stderr.isatty()):  # in a log or a pipe each bar's redraw is another line
        _, eval_data = build_datasets(recipe, build_lines(recipe))
    rows = length_generalisation(trained.model, recipe, eval_data, lengths, batch_size, device, batches,
                                 recipe.train.precision)
    print(format_length_table(rows, title=eval_title(trained, args.data)))
    (out / "length_eval.json").write_text(json.dumps([r.__dict__ for r in rows], indent=2))
    plot = plot_length(rows, out / "length_eval.png", title=eval_title(trained, args.data, where=False))
    print(f"\nwrote {out / 'length_eval.json'}" + (f" and {plot}" if plot else ""))
    return 0
