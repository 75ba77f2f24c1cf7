"""`bmojo-neuron train [RECIPE | --recipe RECIPE] [key=value ...]`: train a recipe, its `compare` or its `suite`.

A recipe with ``run.device: neuron`` trains on Trainium (the trainer's Neuron backend);
without the Neuron SDK the command stops before importing torch, naming what to
install. ``--dry-run`` validates and prints what would run (for Neuron: the launch
plan of `bmojo-neuron plan`), and runs nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bmojo_neuron.cli import (launch_rank, record_for_torchrun, register_command, require_nonempty,
                              say_on_terminal)
from bmojo_neuron.fsutil import disk_full_cause
from bmojo_neuron.locking import DirectoryLock


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", nargs="?", default=None,
                        help="recipe name under recipes/ or a YAML path (default: cpu-tiny)")
    parser.add_argument("--recipe", dest="recipe_option", metavar="RECIPE", default=None,
                        help="the recipe, as an option (instead of the positional RECIPE)")
    parser.add_argument("overrides", nargs="*", default=[], metavar="key=value",
                        help="recipe overrides, e.g. train.steps=100 model.layer_pattern=MB")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest checkpoint in the output directory")
    parser.add_argument("--output-dir", default=None,
                        help="run directory (default: the recipe's run.output_dir)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no live progress bar: plain step and eval lines, as when output is redirected")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the recipe and print what would run (Neuron: the launch plan); run nothing")


def recipe_and_overrides(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """The recipe (positional or ``--recipe``) and the overrides; a first positional with ``=`` is an override."""
    name, overrides = args.recipe, list(args.overrides)
    if name is not None and "=" in name:  # `bmojo-neuron train train.steps=5`: no positional recipe
        name, overrides = None, [name, *overrides]
    if args.recipe_option is not None:
        if name is not None:
            raise ValueError(f"give the recipe once: positional {name!r} and --recipe {args.recipe_option!r}")
        name = args.recipe_option
    return name, overrides


def require_neuron_if_needed(name: str | None, overrides: list[str]) -> None:
    """For a ``run.device: neuron`` recipe, `NeuronUnavailableError` at once when the Neuron SDK is missing.

    Reads only the YAML (no torch, transformers or datasets import), so a Trainium
    recipe started on the wrong machine fails in well under a second.
    """
    from bmojo_neuron.recipes import recipe_device

    if recipe_device(name, overrides) == "neuron":
        from bmojo_neuron.neuron import TRAINING_FEATURE, TRAINING_PACKAGES, require_neuron

        require_neuron(TRAINING_FEATURE, TRAINING_PACKAGES)


def describe(recipe: Any, params: int, run_dir: Path, resume: bool = False) -> str:
    config = recipe.model_config()
    d, t = recipe.data, recipe.train
    data = (f"mqar (vocab {d.vocab_size}, {d.num_kv_pairs} kv pairs, {d.train_examples} train examples)"
            if d.kind == "mqar" else f"text ({d.path or 'bundled corpus'}, tokenizer {d.tokenizer})")
    return "\n".join([
        f"== {recipe.run.name} ==",
        f"  model    {config.layer_pattern}  d={config.hidden_size}  {params:,} parameters",
        f"  data     {data}, length {d.sequence_length}",
        f"  train    {t.steps} steps x batch {t.batch_size} x accum {t.grad_accum}, lr {recipe.optim.lr}, "
        f"{t.precision}, device {recipe.run.device}",
        f"  weights  {weights_text(recipe, run_dir, resume)}",
        f"  output   {run_dir}",
    ])


def weights_text(recipe: Any, run_dir: Path, resume: bool) -> str:
    """Where the run's first weights come from: its checkpoint (``--resume`` of a run that has one), the model
    folder ``init.weights`` names (the folder it resolves to, when that is another: a run's ``final/``), or a
    random init from ``run.seed``. Reads folder listings only (`checkpoints.locate`)."""
    from bmojo_neuron.checkpoints.layout import latest_checkpoint

    if resume and (latest := latest_checkpoint(run_dir)) is not None:
        return f"from its checkpoint (--resume; newest {latest.name})"
    path = recipe.init.weights
    if not path:
        return f"random init (run.seed {recipe.run.seed})"
    from bmojo_neuron.checkpoints.locate import initial_weights_dir

    try:
        folder = initial_weights_dir(path)
    except FileNotFoundError:  # `init_line` and the preflight say what is wrong
        return f"init.weights {path} (not found)"
    shown = "" if folder == Path(path).expanduser() else f" (model folder {folder})"
    return f"init.weights {path}{shown}"


# ------------------------------------------------------------------------ --dry-run


def dry_run(recipe: Any, name: str | None, overrides: list[str], args: argparse.Namespace) -> int:
    """Validate every run of the recipe and print what `train` would do; start nothing, write nothing."""
    from bmojo_neuron.recipes import DEFAULT_RECIPE, count_parameters
    from bmojo_neuron.recipe_runs import plan_runs

    runs = plan_runs(recipe, args.output_dir)
    for variant, _ in runs:
        variant.check()
    for variant, run_dir in runs:
        print(describe(variant, count_parameters(variant), run_dir, args.resume))
        if variant.run.device != "neuron":
            print(f"  parallel {parallel_line(variant)}")
    if recipe.run.device == "neuron":
        from bmojo_neuron.launch.plan import build_plan

        print("\nlaunch plan (as `bmojo-neuron plan`; 1 × trn1.32xlarge, other clusters: plan --nodes/--instance):")
        print(build_plan(recipe, name or DEFAULT_RECIPE, overrides).format())
    print("\nchecks:")
    for line in readiness(recipe, runs, args):
        print(f"  {line}")
    print("dry run: nothing was started or written")
    return 0


def parallel_line(recipe: Any) -> str:
    """The torchrun layout of a cpu/cuda run (degrees checked on the meta device, no process group)."""
    from bmojo_neuron.parallel.layout import torchrun_env
    from bmojo_neuron.training.backends.torchrun import check_parallel_recipe, wants_parallel

    world = torchrun_env()[2]
    if not wants_parallel(recipe):
        return "one process"
    layout = check_parallel_recipe(recipe, world)
    p = recipe.parallel
    return (f"tp {layout.tp} × pp {layout.pp} × dp {layout.dp} = {layout.world} ranks (sp {p.sp}, zero1 {p.zero1}; "
            "world from torchrun's WORLD_SIZE)")


def start_lines(recipe: Any, params: int, run_dir: Path, resume: bool = False) -> str:
    """What `train` prints as a run starts: `describe`, for a cpu/cuda run the hot ops' backend, and with
    several ranks or ``parallel.*`` set, its rank layout (what the dry run shows). The layout is checked here, so a world that
    does not divide it is refused before the run looks started."""
    from bmojo_neuron.training.backends.torchrun import wants_parallel

    lines = describe(recipe, params, run_dir, resume)
    if recipe.run.device == "neuron":
        return lines
    layout = f"\n  parallel {parallel_line(recipe)}" if wants_parallel(recipe) else ""  # a refusal comes first
    return f"{lines}\n  ops      {ops_line(recipe)}{layout}"


def ops_line(recipe: Any) -> str:
    """Which backend runs the hot ops of a cpu/cuda run (`ops.auto.describe`; builds the C kernels if needed)."""
    from bmojo_neuron.device import resolve_device
    from bmojo_neuron.ops import auto

    return auto.describe(resolve_device(recipe.run.device, neuron=False).type, recipe.train.precision)


def readiness(recipe: Any, runs: list[tuple[Any, Path]], args: argparse.Namespace) -> list[str]:
    """One line per thing the run needs from this machine: Neuron packages, the data, the run directories."""
    resume, lines = args.resume, []
    if recipe.run.device == "neuron":
        from bmojo_neuron.neuron import INSTALL_COMMAND, TRAINING_PACKAGES, neuron_status

        status = neuron_status()
        missing = [f"{n} ({status[n]['reason']})" for n in TRAINING_PACKAGES if not status[n]["importable"]]
        lines.append("Neuron SDK: ok" if not missing else
                     f"Neuron SDK: missing here, training would stop: {'; '.join(missing)}; install with "
                     f"{INSTALL_COMMAND}")
    lines.append(f"data: {data_line(runs[0][0])}")  # a run's recipe: its cache follows its output dir
    if recipe.data.kind == "text":
        lines.append(f"tokenizer: {tokenizer_line(recipe)}")
    if recipe.init.weights:
        lines.append(f"init.weights: {init_line(recipe)}")
    from bmojo_neuron.checkpoints.layout import abandoned_attempt, has_run, latest_checkpoint
    from bmojo_neuron.fsutil import unwritable_reason
    from bmojo_neuron.locking import exclusive_holder
    from bmojo_neuron.preflight import describe_output, space_need
    from bmojo_neuron.recipes import count_parameters

    problem = output_root_problem(recipe, runs, args) or suite_root_problem(recipe, runs)
    if problem:
        lines.append(f"output: PROBLEM: {problem}")
    for variant, run_dir in runs:
        blocked = unwritable_reason(run_dir)
        if blocked:  # a file in the way, or a folder this process may not write: not a "new run"
            lines.append(f"output {run_dir}: PROBLEM: cannot be made or written: {blocked}")
            continue
        latest = latest_checkpoint(run_dir)
        holder = exclusive_holder(run_dir)
        if holder:
            lines.append(f"output {run_dir}: PROBLEM: in use by {holder}; train would refuse it until that "
                         "process ends")
        elif resume:
            lines.append(f"output {run_dir}: " + (resume_line(variant, latest) if latest else "no checkpoint yet, "
                                                   "starts from scratch"))
        elif has_run(run_dir):
            lines.append(f"output {run_dir}: PROBLEM: already holds a run; train would refuse it without --resume")
        elif abandoned_attempt(run_dir):
            lines.append(f"output {run_dir}: new run, replacing the logs of an attempt that ended before its first "
                         "checkpoint")
        else:
            lines.append(f"output {run_dir}: new run")
        need = space_need(count_parameters(variant), variant.checkpoint.keep_last, resume)
        lines.append(f"  disk {describe_output(run_dir, need)}")
    return lines


def output_root_problem(recipe: Any, runs: list[tuple[Any, Path]], args: argparse.Namespace) -> str | None:
    """Why the output folder may not take this recipe's runs, or None: a folder of unrelated files
    (`checkpoints.layout.unrelated_folder_problem`). The folder is the run's own, or the one a suite's runs go into."""
    from bmojo_neuron.checkpoints.layout import unrelated_folder_problem

    root = Path(args.output_dir or recipe.run.output_dir).expanduser()
    option = "--output-dir" if args.output_dir else "run.output_dir"
    return unrelated_folder_problem(root, [run_dir for _, run_dir in runs], option, recipe.run.name)


def init_line(recipe: Any) -> str:
    """Where a new run's weights come from, and whether they are there (`check_run_dirs` makes the same check)."""
    from bmojo_neuron.preflight import check_init_weights

    try:
        check_init_weights(recipe)
    except (FileNotFoundError, ValueError) as error:
        return f"PROBLEM: {error}"
    return f"{recipe.init.weights}: ok"


def suite_root_problem(recipe: Any, runs: list[tuple[Any, Path]]) -> str | None:
    """Why a suite or comparison may not train into its output dir, or None.

    Its runs go into ``<output dir>/<name>``, so an output dir that holds a run of its own is most likely
    that run, given to continue it (one model of cpu-tiny's suite, say): training the recipe there would
    start every model of the suite afresh inside it.
    """
    if not (recipe.suite or recipe.compare is not None):
        return None
    from bmojo_neuron.checkpoints.layout import has_run

    root = runs[0][1].parent
    if not has_run(root):
        return None
    what, key = ("suite", "suite") if recipe.suite else ("comparison", "compare")
    # `<key>=none`: the run trains alone even where its recipe.json carries the suite
    return (f"{root} holds a run of its own, and this recipe's {what} trains into {root}/<name>; to continue "
            f"that run, train it alone: bmojo-neuron train {root / 'recipe.json'} {key}=none --resume "
            f"--output-dir {root}")


def resume_line(recipe: Any, checkpoint: Path) -> str:
    """Whether `recipe` may resume `checkpoint` (the newest one; train checks the newest intact one)."""
    from bmojo_neuron.checkpoints.state import read_recipe, resume_refusal

    refusal = resume_refusal(checkpoint, read_recipe(checkpoint), recipe.record())
    return f"PROBLEM: {refusal}" if refusal else f"resumes from {checkpoint.name}"


def data_line(recipe: Any) -> str:
    """Where the training data comes from, and whether it is there."""
    d = recipe.data
    if d.kind == "mqar":
        return "MQAR, generated in memory at start (nothing to prepare)"
    from bmojo_neuron.data.text import CORPUS_DIR, built_cache, cache_root, check_source

    source = str(CORPUS_DIR if d.path is None else Path(d.path).expanduser())
    try:
        kind = check_source(source, d.text_column)
    except (FileNotFoundError, ValueError) as error:
        return f"PROBLEM: {error}"
    if kind == "packed":
        return f"{source}: packed blocks (save_to_disk), read as they are"
    cached = built_cache(d.path, d.tokenizer, d.block_size, d.cache_dir, d.eval_fraction, d.text_column)
    if cached is not None:
        return f"{source} ({kind}): already tokenized and packed in {cached} (a `data prepare` or an earlier run)"
    return (f"{source} ({kind}): tokenized and packed into {cache_root(d.cache_dir)} on first use; build it once "
            "ahead with `bmojo-neuron data prepare` (the same overrides and --output-dir) before launching many ranks")


def tokenizer_line(recipe: Any) -> str:
    """Where the text data's tokenizer comes from, and whether the run will download it."""
    from bmojo_neuron.data.tokenizer import tokenizer_source

    try:
        return tokenizer_source(str(recipe.data.tokenizer or "byte"))
    except ValueError as error:
        return f"PROBLEM: {error}"


@register_command("train", help="train a recipe (default cpu-tiny: B'MOJO against B'MOJO-F and Mamba on MQAR)",
                  add_arguments=add_arguments)
def run(args: argparse.Namespace) -> int:
    name, overrides = recipe_and_overrides(args)
    require_nonempty("--output-dir", args.output_dir)
    if not args.dry_run:
        require_neuron_if_needed(name, overrides)  # before anything imports torch
    from bmojo_neuron.recipes import count_parameters, load_recipe, shadowed_overrides

    recipe = load_recipe(name, overrides)  # before torch and transformers load: a bad recipe is refused at once
    runs: list[tuple[Any, Path]] = []
    if not args.dry_run:  # --dry-run lists every problem instead
        if recipe.run.device == "neuron":  # a cache every node would share fails the run: the first thing said
            check_cache_not_shared()
        check_sources_early(recipe, args.resume)
        runs = check_runs_early(recipe, args)
    say_loading(loading_line(recipe, args.dry_run))  # the checks above took a blink; torch takes seconds
    from bmojo_neuron.checkpoints.layout import has_run
    from bmojo_neuron.parallel.layout import torchrun_env
    from bmojo_neuron.preflight import check_run_dirs

    main = torchrun_env()[0] == 0  # under torchrun only rank 0 prints and writes summaries
    if main:
        for note in shadowed_overrides(recipe, overrides):
            print(f"note: {note}", file=sys.stderr)
    if args.dry_run:
        return dry_run(recipe, name, overrides, args)
    with contextlib.ExitStack() as locks:
        if main:  # data there, output writable (which creates the run directories), room on disk
            locks.enter_context(removing_unused_folders([run_dir for _, run_dir in runs]))
            check_run_dirs(runs, [count_parameters(variant) for variant, _ in runs], args.resume)
        if recipe.run.device == "neuron" and torchrun_env()[1] == 0:
            use_compile_cache(locks, recipe.run.name)
        for variant, run_dir in runs:
            if main:  # held for the whole command: a second train or --resume on a live run is refused
                locks.enter_context(DirectoryLock(run_dir, leave_no_trace=True))
            if not args.resume and has_run(run_dir):
                raise ValueError(used_dir_refusal(run_dir))
        return train_all(runs, args, recipe, main)


def check_runs_early(recipe: Any, args: argparse.Namespace) -> list[tuple[Any, Path]]:
    """The runs of the recipe (`recipe_runs.plan_runs`), each checked, and the refusals that read only files:
    an output folder that may not take them or that a file stands in, without ``--resume`` a run directory that
    already holds a run, with it a checkpoint whose recipe differs (`preflight.check_resumable`), a text run's
    tokenizer that can be neither read here nor fetched (`data.text.check_build_tokenizer`) or that counts more
    ids than the model has (`check_vocabulary_fits`), and a new run's ``init.weights`` whose model is not the
    recipe's or learned another tokenizer (`preflight.check_init_weights`). All before torch loads (seconds). A
    directory a live run holds is left to the lock, whose refusal names the process; the check after taking the
    lock is the one that counts."""
    from bmojo_neuron.checkpoints.layout import has_run
    from bmojo_neuron.data.text import check_build_tokenizer
    from bmojo_neuron.locking import exclusive_holder
    from bmojo_neuron.preflight import check_init_weights, check_no_file_in_the_way, check_resumable
    from bmojo_neuron.recipe_runs import plan_runs

    runs = plan_runs(recipe, args.output_dir)
    for variant, _ in runs:  # check every run before the first long one starts
        variant.check()
    problem = output_root_problem(recipe, runs, args) or suite_root_problem(recipe, runs)
    if problem:
        raise ValueError(problem)
    for _, run_dir in runs:
        check_no_file_in_the_way(run_dir)
        if not args.resume and has_run(run_dir) and not exclusive_holder(run_dir):
            raise ValueError(used_dir_refusal(run_dir))
    if args.resume:
        check_resumable(runs)
    for variant, _ in runs:
        check_build_tokenizer(variant.data)
        check_vocabulary_fits(variant)
        if not args.resume:  # a resumed run starts from its checkpoint
            check_init_weights(variant)
    return runs


def check_vocabulary_fits(recipe: Any) -> None:
    """ValueError when the text data's token ids, where files count them without transformers (a local tokenizer
    folder's tokenizer.json: `data.data_vocabulary_from_files`), reach past the model's vocabulary, which would
    stop the run at its first step with an index error; the byte tokenizer is the recipe's own check."""
    from bmojo_neuron.data import data_vocabulary_from_files

    if recipe.data.kind != "text":
        return
    counted = data_vocabulary_from_files(recipe.data)
    vocab = recipe.model_fields().vocab_size
    if counted is not None and counted[0] > vocab:
        raise ValueError(f"recipe key model.vocab_size: is {vocab}, smaller than the {counted[0]} ids of "
                         f"data.tokenizer {recipe.data.tokenizer!r} (its tokenizer.json); the embedding needs a row "
                         "for every id")


def used_dir_refusal(run_dir: Path) -> str:
    return f"{run_dir} already holds a run; pass --resume to continue it, or pick another --output-dir"


def loading_line(recipe: Any, dry_run: bool) -> str:
    """What `train` says on a terminal before torch loads: the wait that follows (seconds; under torchrun every
    rank imports torch at once, on a busy machine twenty seconds and more) has no other output."""
    if dry_run:
        runs = len(recipe.suite) if recipe.suite else 1 + (recipe.compare is not None)
        models = f"{runs} models" if runs > 1 else "the model"
        return f"dry run of {recipe.run.name}: loading torch to count the parameters of {models}"
    world = launch_rank()[1]
    where = f" on {world} ranks: loading torch in every rank" if world > 1 else ": loading torch"
    return f"training {recipe.run.name}{where}; the run's lines follow"


def say_loading(line: str) -> None:
    """`loading_line` on a terminal (`say_on_terminal`), and under torchrun from rank 0 wherever its stderr goes:
    a torchrun log (``torchrun ... 2>&1 | tee run.log``) is torchrun's banner, its per-rank failure summary and
    the ranks' lines, never one `error:` line a script reads alone, and its ranks wait longest."""
    rank, world = launch_rank()
    if world > 1 and rank == 0:
        print(line, file=sys.stderr, flush=True)
    else:
        say_on_terminal(line)


def check_sources_early(recipe: Any, resume: bool) -> None:
    """Each run's text ``data.path`` is there and, at a glance, text the build takes (`data.text.check_source`:
    a folder's files and JSON lines too) and, for a new run, its ``init.weights`` names a model folder (a resumed
    run starts from its checkpoint): one line before torch loads, since both read the file system only. The
    preflight checks both again."""
    from bmojo_neuron.checkpoints.locate import initial_weights_dir
    from bmojo_neuron.data.text import check_source

    # the runs `recipe_runs.plan_runs` makes of the recipe, as the dotted overrides each applies to it
    if recipe.suite:
        runs = [variant.overrides for variant in recipe.suite]
    else:
        runs = [{}] + ([recipe.compare.overrides] if recipe.compare is not None else [])
    checked: set[tuple[str, str]] = set()  # a suite's runs mostly share one source: glance at it once
    for run_overrides in runs:
        kind = run_overrides.get("data.kind", recipe.data.kind)
        path = run_overrides.get("data.path", getattr(recipe.data, "path", None))
        column = run_overrides.get("data.text_column", getattr(recipe.data, "text_column", "text"))
        if kind == "text" and path is not None and (str(path), str(column)) not in checked:
            checked.add((str(path), str(column)))
            check_source(str(Path(path).expanduser()), column)
        weights = run_overrides.get("init.weights", recipe.init.weights)
        if weights and not resume:
            initial_weights_dir(weights)


def check_cache_not_shared() -> None:
    """A run on several nodes refuses a compile cache folder on a network filesystem, as `precompile --nodes`
    does (`compile_cache.shared_fs`): the same path would be one folder for every node. One that may be shared
    (an unknown FUSE daemon, 9p, virtiofs) gets a warning from rank 0."""
    from bmojo_neuron.compile_cache import resolve_cache_dir
    from bmojo_neuron.compile_cache.shared_fs import shared_cache_doubt, shared_cache_problem
    from bmojo_neuron.parallel.layout import torchrun_env, torchrun_nodes

    url, source = resolve_cache_dir()
    problem = shared_cache_problem(url, torchrun_nodes())
    if problem:
        raise ValueError(f"{problem} (the cache comes from {source})")
    doubt = shared_cache_doubt(url, torchrun_nodes())
    if doubt and torchrun_env()[0] == 0:
        print(f"warning: {doubt} (the cache comes from {source})", file=sys.stderr, flush=True)


@contextlib.contextmanager
def removing_unused_folders(run_dirs: list[Path]) -> Iterator[None]:
    """When the command ends, however it ends, remove the folders it created for `run_dirs` (each one and its
    missing parents) that are still empty.

    A run that fails before writing its directory (a tokenizer found missing while the data is built, a full
    disk found by the preflight, a suite stopped before the run's turn) then leaves nothing for the user to
    find. Only empty folders go (`rmdir` refuses any other), so nothing a run wrote is ever removed; a folder
    that existed before stays. The run directory's lock file is gone by then when the run wrote nothing else
    (`DirectoryLock`'s ``leave_no_trace``). A kill that ends the process at once (SIGKILL) skips this.
    """
    created = sorted({folder for run_dir in run_dirs for folder in (run_dir, *run_dir.parents)
                      if not folder.exists()}, key=lambda folder: len(folder.parts), reverse=True)
    try:
        yield
    finally:
        for folder in created:  # deepest first, so a parent is empty once its new children are gone
            with contextlib.suppress(OSError):  # not empty: something was written there, so it stays
                folder.rmdir()


def use_compile_cache(locks: contextlib.ExitStack, run_name: str) -> None:
    """One process per node holds the node's compile cache in shared use: no prune while the run may read it."""
    from bmojo_neuron.compile_cache import LocalCache, is_s3, resolve_cache_dir

    url, _ = resolve_cache_dir()
    if not is_s3(url):
        locks.enter_context(LocalCache(url).use(f"train {run_name}"))


def last_checkpoint_text(run_dir: Path) -> str:
    from bmojo_neuron.checkpoints.layout import latest_checkpoint

    latest = latest_checkpoint(run_dir)
    return f"its latest checkpoint is {latest}" if latest else f"{run_dir} has no checkpoint yet"


def stopped_line(name: str, run_dir: Path, result: Any) -> str:
    """Where a run a signal ended early stands: the step it stopped after and its checkpoint."""
    return (f"{name}: stopped by {signal.Signals(result.stop_signal).name} after step {result.step}; "
            f"{last_checkpoint_text(run_dir)}: continue with --resume")


def report_stop(runs: list[tuple[Any, Path]], results: list[Any], signum: int | None, main: bool) -> int:
    """After a signal: one line per run (stopped with its checkpoint, finished, or not started), then the
    signal's status (143, 130), so a scheduler sees the command was interrupted."""
    from bmojo_neuron.training.signals import exit_status, signal_name

    by = signal_name(signum)
    # What torchrun's failure summary shows for this rank when only the ranks were signalled (torchrun judges
    # them by their status, and a stopped run must not look finished: docs/training.md, Stopping a run).
    record_for_torchrun(f"stopped by {by}, gracefully (each run that had started is checkpointed); continue "
                        "with --resume")
    if main:
        for index, (variant, run_dir) in enumerate(runs):
            result = results[index] if index < len(results) else None
            if result is None:
                line = f"{variant.run.name}: not started (stopped by {by}); train again with --resume to run it"
            elif result.stop_signal is not None:
                line = stopped_line(variant.run.name, run_dir, result)
            else:
                line = f"{variant.run.name}: finished; final export in {result.final_dir}"
            print(line, file=sys.stderr, flush=True)
    return exit_status(signum) if signum is not None else 130


def train_all(runs: list[tuple[Any, Path]], args: argparse.Namespace, recipe: Any, main: bool) -> int:
    from bmojo_neuron.recipes import count_parameters
    from bmojo_neuron.training.progress import format_seconds
    from bmojo_neuron.training.signals import holding_stop_signals, pending_signal, signal_name
    from bmojo_neuron.training.suite import summary_row

    if main:
        for variant, run_dir in runs:
            print(start_lines(variant, count_parameters(variant), run_dir, args.resume), flush=True)
    jobs = run_jobs(recipe, len(runs))
    if jobs > 1:
        print(f"training {len(runs)} runs, {jobs} at a time (run.jobs)", flush=True)
    with holding_stop_signals():  # between runs and after the last one a signal is held, not fatal
        rows: list[dict[str, Any]] = []
        results: list[Any] = []
        received: list[int] = []  # the signals a pool of workers passed on, or one held between runs
        for (variant, run_dir), result in zip(runs, train_runs(runs, args, jobs, received)):
            results.append(result)
            if result.stop_signal is not None:
                continue
            rows.append(summary_row(variant, result))
            if main:
                print(f"{variant.run.name}: done in {format_seconds(result.seconds)}; final export in "
                      f"{result.final_dir}", flush=True)
        signum = next((r.stop_signal for r in results if r.stop_signal is not None),
                      received[0] if received else None)
        if signum is not None or len(results) < len(runs):  # runs not started are missing from the results
            return report_stop(runs, results, signum, main)
        if main:
            print_summary(runs, rows, args, recipe)
        if (late := pending_signal()) is not None and main:
            print(f"received {signal_name(late)} after every run had finished and exported: nothing was "
                  "interrupted", file=sys.stderr, flush=True)
    return 0


def print_summary(runs: list[tuple[Any, Path]], rows: list[dict[str, Any]], args: argparse.Namespace,
                  recipe: Any) -> None:
    """The table of the trained runs; with several runs also summary.txt / .json / .png in the output dir."""
    from bmojo_neuron.training.suite import RECALL_NOTE, summary_table, write_summary

    print("\n" + summary_table(rows))
    if len(runs) > 1:
        path = write_summary(Path(args.output_dir or recipe.run.output_dir), rows)
        print(f"\nsummary written to {path} (plot: {path.with_suffix('.png')})")
    if any(r["recall"] is not None for r in rows):
        print(RECALL_NOTE)


def run_jobs(recipe: Any, runs: int) -> int:
    """How many runs train at once: ``run.jobs``, at most the number of runs, 1 under torchrun."""
    from bmojo_neuron.parallel.layout import torchrun_env

    return 1 if torchrun_env()[2] > 1 else max(1, min(recipe.run.jobs, runs))


def train_runs(runs: list[tuple[Any, Path]], args: argparse.Namespace, jobs: int,
               signals: list[int]) -> Iterator[Any]:
    """Each run's `TrainResult`, in order: one after another here, or `jobs` at a time in worker processes.

    A run a signal stopped is the last one yielded: the runs after it do not start, nor do they after a
    signal held between two runs. `signals` receives the signals a pool of workers passed on, and a held one.
    """
    from bmojo_neuron.training.run_pool import train_in_processes

    if jobs > 1:
        yield from train_in_processes(runs, jobs, resume=args.resume, signals=signals)
        return
    from bmojo_neuron.training.signals import pending_signal

    for variant, run_dir in runs:
        if (held := pending_signal()) is not None:  # came between two runs: the next one does not start
            signals.append(held)
            return
        result = train_one(variant, run_dir, args)
        yield result
        if result.stop_signal is not None:
            return


def train_one(variant: Any, run_dir: Path, args: argparse.Namespace) -> Any:
    """One run in this process; a full disk becomes one error line naming the checkpoint to resume from."""
    from bmojo_neuron.training import train

    try:
        # --no-progress drops the live bar only: the plain step and eval lines stay ("lines")
        return train(variant, run_dir, resume=args.resume, progress="lines" if args.no_progress else True)
    except KeyboardInterrupt:
        print(f"\n{variant.run.name} interrupted; {last_checkpoint_text(run_dir)}: continue with --resume",
              file=sys.stderr)
        raise
    except Exception as exc:
        full = disk_full_cause(exc)
        if full is None:
            raise
        raise ValueError(f"disk full: {full.strerror} while writing {run_dir}; {last_checkpoint_text(run_dir)} "
                         "(a checkpoint is written whole or not at all): free some space, then continue with "
                         "--resume") from None
