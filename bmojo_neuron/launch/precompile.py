"""The trial run of `bmojo-neuron precompile`: what runs under ``neuron_parallel_compile``, and where.

The trial run is the real run's torchrun line (`bmojo_neuron.launch.plan`) cut to a
few steps, with the final step's eval and checkpoint save kept so their graphs are
compiled too, writing into a scratch run directory. Everything here is checked
before the tool starts, so a bad recipe, data path, node environment or cache fails
in one line instead of minutes into a compile. Torch-free, like the rest of `launch`.
"""

from __future__ import annotations

import os
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from bmojo_neuron.checkpoints.layout import has_run, unrelated_folder_problem
from bmojo_neuron.compile_cache.location import is_s3
from bmojo_neuron.compile_cache.shared_fs import shared_cache_doubt, shared_cache_problem
from bmojo_neuron.launch.plan import LaunchPlan, build_plan
from bmojo_neuron.fsutil import unwritable_reason
from bmojo_neuron.recipes import load_recipe

TOOL = "neuron_parallel_compile"
DEFAULT_STEPS = 3


@dataclass
class TrialRun:
    """What precompile runs: the plan, the trial-run command and environment, and its run directory."""

    plan: LaunchPlan  # of the real run
    argv: list[str]  # the plan's torchrun line + the trial overrides (without neuron_parallel_compile)
    env: dict[str, str]
    output_dir: Path
    scratch: bool  # output_dir is ours: removed after the run (by node 0 on multi-node runs)


def trial_overrides(steps: int, output_dir: Path) -> list[str]:
    """Stop after `steps` steps; eval and checkpoint only at the last one (the loop always does both there)."""
    return [f"train.steps={steps}", f"eval.every={steps}", f"checkpoint.every={steps}",
            f"run.output_dir={output_dir}"]


def plan_trial_run(recipe_name: str, overrides: Sequence[str], *, nodes: int, instance: str, cache_url: str,
                   master_port: int, steps: int, output_dir: str | None, environ: Mapping[str, str],
                   strict: bool = True) -> TrialRun:
    """Validate everything (recipe, plan, data, node environment, cache) and build the trial run.

    `strict` False (a dry run) leaves MASTER_ADDR and NODE_RANK as placeholders when unset.
    """
    if steps < 1:
        raise ValueError(f"--steps is {steps}; must be >= 1")
    recipe = load_recipe(recipe_name, list(overrides))
    check_data(recipe, tokenizer_too=strict)  # files and names only: before the plan builds the model (seconds)
    plan = build_plan(recipe, recipe_name, list(overrides), nodes=nodes, instance=instance,
                      cache_dir=cache_url, master_port=master_port)
    if output_dir:
        check_output_dir(Path(output_dir), recipe.run.name)
    run_dir = Path(output_dir) if output_dir else scratch_dir(recipe, nodes, environ)
    extra = trial_overrides(steps, run_dir)
    load_recipe(recipe_name, [*overrides, *extra])  # the trial run's recipe must load too
    check_cache_dir(cache_url, nodes)
    base = launch_argv(plan, environ, strict=strict)
    first_node = plan.nodes == 1 or base[base.index("--node-rank") + 1] == "0"
    return TrialRun(plan, base + extra, {**environ, **plan.env}, run_dir, output_dir is None and first_node)


def scratch_dir(recipe: Any, nodes: int, environ: Any) -> Path:
    """A fresh run directory for the trial run.

    One node: under the system temp folder. Several nodes: every rank writes its
    checkpoint shard into one folder, so it sits next to the real run's directory
    (which multi-node runs keep on a shared filesystem) under a name all nodes agree
    on: the Slurm job step, else the node count.
    """
    name, job = recipe.run.name, environ.get("SLURM_JOB_ID")
    if nodes == 1:
        stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        return Path(tempfile.gettempdir()) / "bmojo-precompile" / f"{name}-{stamp}"
    stamp = f"slurm{job}.{environ.get('SLURM_STEP_ID', '0')}" if job else f"nodes{nodes}"
    return Path(recipe.run.output_dir).absolute().parent / "precompile" / f"{name}-{stamp}"


def launch_argv(plan: Any, environ: Any, strict: bool = True) -> list[str]:
    """The plan's torchrun line as argv, with MASTER_ADDR and the node rank filled in on multi-node runs."""
    argv = shlex.split(plan.torchrun)
    if plan.nodes == 1:
        return argv
    master = environ.get("MASTER_ADDR")
    rank = environ.get("NODE_RANK") or environ.get("SLURM_NODEID")
    if not strict and not (master and rank):
        return argv
    if not master:
        raise ValueError(f"--nodes {plan.nodes}: set MASTER_ADDR to the first node's address (under Slurm: "
                         "MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1)); "
                         "run precompile on every node, see docs/compile-cache.md")
    if rank is None or not rank.isdigit() or int(rank) >= plan.nodes:
        raise ValueError(f"--nodes {plan.nodes}: set NODE_RANK to this node's rank 0..{plan.nodes - 1} (srun sets "
                         f"SLURM_NODEID, which is used when NODE_RANK is unset); got {rank!r}")
    return [master if a == "$MASTER_ADDR" else rank if a == "$NODE_RANK" else a for a in argv]


def check_data(recipe: Any, tokenizer_too: bool = True) -> None:
    """The trial run's text data, checked as `train` checks it before torch loads, so that what would stop the
    trial run fails here, not minutes into it: data.path (`data.text.check_source`: there, and at a glance text
    the build takes) and, with `tokenizer_too`, a tokenizer the run needs and can neither read here nor fetch
    (`data.text.check_build_tokenizer`; a dry run names where it comes from instead, as `train --dry-run` does)."""
    if recipe.data.kind != "text" or not recipe.data.path:
        return
    from bmojo_neuron.data.text import check_build_tokenizer, check_source

    try:
        check_source(str(Path(recipe.data.path).expanduser()), recipe.data.text_column)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"recipe key {exc}; set data.path=<your data> (the trn1 recipes ship a "
                                "placeholder) and prepare it with `bmojo-neuron data prepare`") from None
    if tokenizer_too:
        check_build_tokenizer(recipe.data)


def check_cache_dir(url: str, nodes: int = 1) -> None:
    """A local cache folder must be writable (or creatable) and, on several nodes, not on a network filesystem
    (one folder for all nodes: `compile_cache.shared_fs`); an S3 cache needs boto3."""
    if is_s3(url):
        from bmojo_neuron.compile_cache.s3 import make_client  # boto3 only for an S3 cache

        make_client()  # boto3 installed? (the post-run check lists the bucket)
        return
    _check_writable_folder("--cache-dir", Path(url).expanduser())
    problem = shared_cache_problem(url, nodes)
    if problem:
        raise ValueError(problem)
    doubt = shared_cache_doubt(url, nodes)
    if doubt:
        print(f"warning: {doubt}", file=sys.stderr, flush=True)


def check_output_dir(run_dir: Path, run_name: str) -> None:
    """The trial run's ``--output-dir`` must be writable (or creatable), hold no run, and be no folder of other
    files, as `train` requires: otherwise the trial run would stop there only after the launch."""
    folder = run_dir.expanduser()
    _check_writable_folder("--output-dir", folder)
    if has_run(folder):
        raise ValueError(f"--output-dir {run_dir} already holds a run; the trial run would refuse it: pick an "
                         "empty folder, or leave --output-dir out for a scratch folder removed afterwards")
    problem = unrelated_folder_problem(folder, [folder], "--output-dir", run_name)
    if problem:
        raise ValueError(problem)


def _check_writable_folder(option: str, path: Path) -> None:
    """`path`, or the nearest folder above it that exists, is a folder this process may write into; checked
    without creating anything (a dry run writes nothing)."""
    problem = unwritable_reason(path)
    if problem:
        raise ValueError(f"{option} {path}: {problem}")


def precompile_srun(recipe_name: str, overrides: Sequence[str], *, nodes: int, instance: str, steps: int,
                    cache_url: str, master_port: int, output_dir: str | None) -> str:
    """The Slurm line that runs this precompile on every node (NODE_RANK comes from SLURM_NODEID)."""
    inner = ["bmojo-neuron", "precompile", recipe_name, *overrides, "--nodes", str(nodes), "--instance", instance,
             "--steps", str(steps), "--cache-dir", cache_url, "--master-port", str(master_port)]
    if output_dir:
        inner += ["--output-dir", output_dir]
    script = ('MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1) '
              + " ".join(shlex.quote(a) for a in inner))
    return f"srun --nodes {nodes} --ntasks-per-node 1 --export ALL bash -c {shlex.quote(script)}"
