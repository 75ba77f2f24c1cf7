"""`bmojo-neuron precompile RECIPE [key=value ...]`: compile a training run's graphs into the Neuron cache first.

It runs ``neuron_parallel_compile`` around the exact torchrun line `bmojo-neuron plan`
builds (same recipe, overrides, node count, NEURON_CC_FLAGS), for a few steps, with
the final step's eval and checkpoint save included so their graphs are compiled
too, into a scratch run directory. Then it checks the cache: every entry the run
created, changed or used must hold a NEFF and no failure. docs/compile-cache.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from bmojo_neuron.cli import register_command
from bmojo_neuron.launch.precompile import DEFAULT_STEPS, TOOL, TrialRun, plan_trial_run, precompile_srun


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe name under recipes/ (e.g. trn1/bmojo-130m) or a YAML path")
    parser.add_argument("overrides", nargs="*", default=[], metavar="key=value",
                        help="recipe overrides: use the same ones as the real run, or its graphs differ")
    parser.add_argument("--nodes", type=int, default=1, help="number of instances, as in the real run (default 1)")
    parser.add_argument("--instance", default="trn1.32xlarge", choices=("trn1.32xlarge", "trn1.2xlarge"),
                        help="instance type, as in the real run")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                        help=f"training steps of the trial run (default {DEFAULT_STEPS})")
    parser.add_argument("--cache-dir", default=None,
                        help="compile cache (path or s3://...; default: --cache_dir in NEURON_CC_FLAGS, else "
                             "NEURON_COMPILE_CACHE_URL, else /var/tmp/neuron-compile-cache)")
    parser.add_argument("--output-dir", default=None,
                        help="run directory of the trial run (default: a scratch folder, removed afterwards; "
                             "with --nodes > 1 it must be one folder on a filesystem all nodes share)")
    parser.add_argument("--master-port", type=int, default=29500, help="torchrun rendezvous port")
    parser.add_argument("--dry-run", action="store_true", help="print the command and the checks; run nothing")


@register_command("precompile", help="compile every graph of a training run into the Neuron cache ahead of time "
                                     "(neuron_parallel_compile) and check the cache", add_arguments=add_arguments)
def run(args: argparse.Namespace) -> int:
    from bmojo_neuron.compile_cache.location import resolve_cache_dir

    if args.steps < 1:
        raise ValueError(f"--steps is {args.steps}; must be >= 1")
    cache_url, cache_source = resolve_cache_dir(args.cache_dir)
    job = plan_trial_run(args.recipe, args.overrides, nodes=args.nodes, instance=args.instance, cache_url=cache_url,
                         master_port=args.master_port, steps=args.steps, output_dir=args.output_dir,
                         environ=os.environ, strict=not args.dry_run)
    tool = shutil.which(TOOL)
    if args.dry_run:
        print(describe(job, args, cache_url, cache_source, tool))
        return 0
    if tool is None:
        raise_missing_tool()
    return execute(job, tool, cache_url)


def raise_missing_tool() -> None:
    from bmojo_neuron.neuron import INSTALL_COMMAND, NeuronUnavailableError

    raise NeuronUnavailableError(
        f"{TOOL} is not on PATH: it comes with the Neuron SDK's torch-neuronx / neuronx-cc packages "
        f"(Neuron SDK 2.28). Install them on a Trn1 instance: {INSTALL_COMMAND}, and activate that environment")


# ------------------------------------------------------------------ dry run
def describe(job: TrialRun, args: argparse.Namespace, cache_url: str, cache_source: str, tool: str | None) -> str:
    plan = job.plan
    command = shlex.join([TOOL, *job.argv])
    lines = [
        "precompile (dry run: nothing runs)",
        f"recipe       {plan.recipe}" + (f" {' '.join(plan.overrides)}" if plan.overrides else ""),
        f"cluster      {plan.nodes} × {plan.instance} = {plan.world} NeuronCores "
        f"(tp {plan.tp} × pp {plan.pp} × dp {plan.dp})",
        f"cache        {cache_url} ({cache_source})",
        f"trial run    {args.steps} steps, eval and checkpoint save at the last one; run dir {job.output_dir}"
        + ((" (removed afterwards" + (" by node 0)" if plan.nodes > 1 else ")")) if args.output_dir is None else ""),
        "", "environment:", *(f"  {line}" for line in plan.env_lines()),
        "", "command" + (" (on node NODE_RANK; MASTER_ADDR and NODE_RANK are filled in at run time)"
                         if plan.nodes > 1 else "") + ":", f"  {command}",
    ]
    if plan.nodes > 1:
        srun = precompile_srun(args.recipe, args.overrides, nodes=args.nodes, instance=args.instance, steps=args.steps,
                               cache_url=cache_url, master_port=args.master_port, output_dir=args.output_dir)
        lines += ["", "on every node (Slurm):", f"  {srun}"]
    found = f"found at {tool}" if tool else "NOT on PATH (install torch-neuronx / neuronx-cc)"
    graph_check = shlex.join(["bmojo-neuron", "plan", plan.recipe, *plan.overrides, "--check-graph"])
    lines += ["", "checks:", "  recipe, Trainium shapes, HBM estimate: ok", *tokenizer_lines(args), f"  {TOOL}: {found}",
              f"  the step graph against neuronx-cc's refusals: not run here (a minute or more, any machine): "
              f"{graph_check}",
              "", "afterwards, the real run (same nodes, recipe, overrides and NEURON_CC_FLAGS) uses the cache:",
              f"  {plan.torchrun}"]
    if plan.notes:
        lines += ["", "notes:", *(f"  - {n}" for n in plan.notes)]
    return "\n".join(lines)


def tokenizer_lines(args: argparse.Namespace) -> list[str]:
    """Where a text recipe's tokenizer comes from, and whether the trial run would download it (the line of
    `train --dry-run`; a real precompile refuses one it can neither read here nor fetch before it starts)."""
    from bmojo_neuron.data.tokenizer import tokenizer_source
    from bmojo_neuron.recipes import load_recipe

    data = load_recipe(args.recipe, list(args.overrides)).data
    if data.kind != "text":
        return []
    try:
        return [f"  tokenizer: {tokenizer_source(str(data.tokenizer or 'byte'))}"]
    except ValueError as error:
        return [f"  tokenizer: PROBLEM: {error}"]


# ------------------------------------------------------------------ running
def execute(job: TrialRun, tool: str, cache_url: str) -> int:
    """Snapshot the cache, run the tool (streaming its output), check the cache, print a summary."""
    from bmojo_neuron.compile_cache import LocalCache, open_cache
    from bmojo_neuron.compile_cache.check import check_run, snapshot
    from bmojo_neuron.compile_cache.s3 import s3_errors

    cache = open_cache(cache_url)
    # a local cache is not pruned while we fill and check it (S3 has no locks: see docs/compile-cache.md)
    with cache.use("precompile") if isinstance(cache, LocalCache) else contextlib.nullcontext():
        with s3_errors(cache_url):
            before = snapshot(_entries_or_none(cache))
        if job.scratch and job.output_dir.exists():
            # A multi-node scratch folder has a fixed name (job step or node count): one a killed precompile
            # left would make the trial run refuse it as a finished run. Node 0 clears it before its torchrun
            # starts, and no rank of any node writes before that torchrun's rendezvous.
            print(f"removing {job.output_dir}, left by an earlier precompile", flush=True)
            shutil.rmtree(job.output_dir)
        print(f"running: {shlex.join([TOOL, *job.argv])}", flush=True)
        try:
            code, mentioned = stream([tool, *job.argv], job.env)
        finally:
            if job.scratch:
                shutil.rmtree(job.output_dir, ignore_errors=True)
        with s3_errors(cache_url):
            result = check_run(before, _entries_or_none(cache), mentioned)
    print(summary(result, code, cache_url, job.plan))
    return 0 if code == 0 and result.ok else 1


def _entries_or_none(cache: Any) -> list:
    try:
        return cache.entries()
    except FileNotFoundError:  # a local cache the compiler has not created yet
        return []


def stream(argv: list[str], env: dict[str, str]) -> tuple[int, list[str]]:
    """Run `argv`, echoing its output line by line; (exit status, cache entries its output names)."""
    from bmojo_neuron.compile_cache.check import keys_in_text

    mentioned: list[str] = []
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", bufsize=1)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            mentioned += keys_in_text(line)
        return proc.wait(), mentioned
    except KeyboardInterrupt:  # the tool got the same SIGINT from the terminal; give it time to stop
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise


def summary(result: Any, code: int, cache_url: str, plan: Any) -> str:
    lines = ["", f"precompile check of {cache_url}:", f"  {TOOL} exit status {code}",
             f"  entries: {len(result.new)} new, {len(result.changed)} updated, "
             f"{len(result.mentioned)} already compiled (named in the output)"]
    for entry in result.bad:
        lines.append(f"  {entry.status.upper():<10} {entry.key}: {entry.detail}")
        lines += [f"      | {line}" for line in _log_tail(entry)]
    for key in result.missing:
        lines.append(f"  warning: the output names {key}, which is not in {cache_url} (another cache dir?)")
    if not result.checked:
        lines.append(f"FAILED: the run left no graph in {cache_url}; check the output above (did the training "
                     "command start? is this the cache in NEURON_CC_FLAGS?)")
    elif result.bad:
        lines.append(f"FAILED: {len(result.bad)} of {len(result.checked)} graphs did not compile; the real run would "
                     "compile them again (or fail): fix the error above, then rerun precompile (the plan's "
                     "--retry_failed_compilation retries failed graphs)")
    elif code != 0:
        lines.append(f"FAILED: {TOOL} exited with status {code}; the graphs it did compile are complete")
    else:
        lines += [f"OK: {len(result.checked)} graphs complete. Run training with the same nodes, recipe, overrides "
                  "and NEURON_CC_FLAGS:", f"  {plan.torchrun}"]
    return "\n".join(lines)


def _log_tail(entry: Any, lines: int = 5) -> list[str]:
    """The last lines of a failed local entry's model.log (nothing for S3 or when absent)."""
    path = Path(entry.location) / "model.log"
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    return text.strip().splitlines()[-lines:]
