"""The run directory on disk: which checkpoints it holds, and the crash-safe publish of a new one.

Layout of a run directory (the names are `names`'s)::

    step-0000100/          one complete checkpoint (one-process: `local`; sharded: `sharded`)
    step-0000200/
    latest                 text file naming the newest complete checkpoint ("step-0000200")
    recipe.json            the recipe of the run
    metrics.jsonl          one JSON record per log / eval step
    final/                 `save_pretrained` export of the finished model (`export`)

Every checkpoint is written into a hidden temporary directory (``.tmp-...``), each
file fsynced, then published with one `os.replace`; `latest` is rewritten the same
way (temp file + rename). A kill at any moment therefore leaves either the old or the
new state, never a half-written one, and discovery never looks at temp dirs. Old
checkpoints are pruned only after the new one is published, and are first renamed to
``.trash-...`` so a half-deleted directory is never mistaken for a checkpoint.
Each checkpoint ends with ``manifest.json`` (sizes and SHA-256 of its files,
`bmojo_neuron.checkpoints.manifest`); a resume skips a checkpoint whose files no
longer match it and continues from the newest intact one.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable

from bmojo_neuron.fsutil import fsync_dir, publish_dir, write_text_atomic

from .manifest import DamagedCheckpointError, damage, has_manifest, write_manifest
from .names import (CONFIG_FILE, FINAL, LATEST, METRICS_FILE, MODEL_FILE, OPTIM_FILE, PARALLEL_FILE, RECIPE_FILE,
                    REQUIRED_FILES, RUN_INFO_FILE, SHARDED_REQUIRED_FILES, STATE_FILE, STEP_PATTERN, SUMMARY_FILE,
                    step_dir_name, step_folders)


# ------------------------------------------------------------------ discovery


def is_complete(path: Path) -> bool:
    """A one-process or sharded checkpoint whose trainer state (written last) is on disk."""
    return any(all((path / f).is_file() for f in files) for files in (REQUIRED_FILES, SHARDED_REQUIRED_FILES))


def is_sharded(path: str | Path) -> bool:
    """A checkpoint of a parallel run (`sharded`'s format): its degrees file is there."""
    return (Path(path) / PARALLEL_FILE).is_file()


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete published checkpoints, oldest first."""
    found = [(int(STEP_PATTERN.match(p.name).group(1)), p) for p in step_folders(run_dir) if is_complete(p)]
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint `latest` names; if that file is missing or stale, the newest complete one."""
    run_dir = Path(run_dir)
    pointer = run_dir / LATEST
    if pointer.is_file():
        name = pointer.read_text().strip()
        if STEP_PATTERN.match(name) and is_complete(run_dir / name):
            return run_dir / name
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def latest_intact_checkpoint(run_dir: str | Path, hashes: bool = True,
                             on_skip: Callable[[DamagedCheckpointError], None] | None = None) -> Path | None:
    """The newest complete checkpoint whose files match its manifest (the one `latest` names first, then the
    others, newest first); `on_skip` hears about each damaged one passed over. `hashes` False checks sizes only.

    A step directory that lacks a file its manifest lists is damaged too, not merely incomplete: a
    checkpoint is published whole, so a file missing from a published one was deleted afterwards."""
    run_dir = Path(run_dir)
    for path in _resume_candidates(run_dir):
        problem = damage(path, hashes)
        if problem is None and is_complete(path):
            return path
        if problem is not None and on_skip is not None:
            on_skip(problem)
    return None


def _resume_candidates(run_dir: Path) -> list[Path]:
    """Published step directories that are complete or have a manifest: the one `latest` names first, then
    the others, newest first."""
    found = sorted((int(STEP_PATTERN.match(entry.name).group(1)), entry) for entry in step_folders(run_dir)
                   if is_complete(entry) or has_manifest(entry))
    candidates = [path for _, path in reversed(found)]
    pointer = run_dir / LATEST
    named = pointer.read_text().strip() if pointer.is_file() else ""
    first = [p for p in candidates if p.name == named]
    return first + [p for p in candidates if p.name != named]


def has_run(run_dir: Path) -> bool:
    """True when `run_dir` holds checkpoints or an export of an earlier run: what a new run would overwrite.

    A step folder counts even when damaged (a file of it lost): a new run would replace it when
    it saves that step, and its weights may still be worth recovering by hand. The logs alone
    (`abandoned_attempt`) do not count: nothing there can be resumed, and a retry that is
    refused them would only be told to ``--resume``, which starts afresh anyway.
    """
    return bool(step_folders(run_dir)) or (run_dir / FINAL).exists()


# What a run, or a suite's folder of runs, writes at the top of its directory (the hidden `.lock`, ``.tmp-`` and
# ``.trash-`` leftovers aside): a folder holding one of these is a run directory of ours, not someone's folder.
RUN_FILES = frozenset({LATEST, FINAL, METRICS_FILE, RECIPE_FILE, RUN_INFO_FILE, SUMMARY_FILE, "summary.json",
                       "tensorboard", "training.png"})
OUR_HIDDEN = (".lock", ".tmp-", ".trash-")
# Files a desktop or file manager leaves in any folder it shows: they make no folder someone else's.
DESKTOP_FILES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})


def holds_run_files(folder: Path) -> bool:
    """True when `folder` holds a file or folder a run (or a suite's summary) writes: a run directory of ours.

    The hidden ones count too: a run's `.lock` alone is a live run that has written nothing yet, or one killed
    before it wrote anything."""
    return folder.is_dir() and any(entry.name in RUN_FILES or STEP_PATTERN.match(entry.name)
                                   or entry.name.startswith(OUR_HIDDEN) for entry in folder.iterdir())


def foreign_entries(folder: Path) -> list[str]:
    """The names in `folder` that no run wrote (our hidden leftovers and desktop files aside), sorted with the
    hidden ones last; empty when the folder is missing or holds nothing else."""
    if not folder.is_dir():
        return []
    names = [entry.name for entry in folder.iterdir()
             if not entry.name.startswith(OUR_HIDDEN) and entry.name not in DESKTOP_FILES]
    return sorted(names, key=lambda name: (name.startswith("."), name))


def unrelated_folder_problem(root: Path, run_dirs: list[Path], option: str, run_name: str) -> str | None:
    """Why `train` may not write into output folder `root`, or None: it holds someone else's files and no run.

    A run writes its checkpoints, logs and plots at the top of its folder (and a suite its runs' folders and
    summary), so an output folder given by mistake (``~``, a project folder) would get them among the files
    already there. A folder that is new, empty, or holds a run of ours (`holds_run_files`: the run itself, a
    suite's summary, or one of the runs a suite plans) is fine, whatever else the user put in it since.
    `option` is where the folder came from (``--output-dir``, ``run.output_dir``, or `training.train`'s
    ``output_dir``), for the advice.
    """
    entries = foreign_entries(root)
    if not entries or any(holds_run_files(folder) for folder in {root, *run_dirs}):
        return None
    shown = ", ".join(entries[:4]) + (f", ... ({len(entries)} entries)" if len(entries) > 4 else "")
    subfolder = root / run_name
    advice = f"{option} {subfolder}" if option.startswith("--") else f"{option}={subfolder}"
    return (f"{option} {root} is a folder of other files ({shown}) and holds no run (no recipe.json, metrics.jsonl "
            f"or step-* checkpoint): the run would write its checkpoints and logs among them; pick a new or empty "
            f"folder, e.g. {advice}")


def abandoned_attempt(run_dir: Path) -> bool:
    """True when `run_dir` holds only the logs (``metrics.jsonl``, ``recipe.json``, TensorBoard) of a run that
    ended before its first checkpoint: failed, killed or interrupted early. A new run replaces them."""
    return (run_dir / METRICS_FILE).exists() and not has_run(run_dir)


# ------------------------------------------------------------------ writing


def new_tmp_dir(parent: Path, label: str) -> Path:
    path = parent / f".tmp-{label}-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    return path


def clean_stale(run_dir: Path) -> None:
    """Delete temp / trash leftovers of a crashed run (never a published checkpoint)."""
    if not run_dir.is_dir():
        return
    for entry in run_dir.iterdir():
        if entry.name.startswith((".tmp-", ".trash-")):
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


def prune(run_dir: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints (never the one `latest` names)."""
    latest = latest_checkpoint(run_dir)
    for path in list_checkpoints(run_dir)[:-keep_last]:
        if latest is not None and path.resolve() == latest.resolve():
            continue
        trash = path.with_name(f".trash-{path.name}-{uuid.uuid4().hex[:8]}")
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
    fsync_dir(run_dir)


def publish_step(tmp: Path, run_dir: Path, name: str, recipe: dict[str, Any], config: Any, state: Any,
                 keep_last: int) -> Path:
    """The shared end of every save: recipe, config and trainer state into `tmp` (the state marks the step
    complete), the manifest of all of them last, `tmp` published as ``run_dir/name``, ``latest`` moved, old
    steps pruned.
    `tmp` is removed if anything fails before it is published."""
    try:
        (tmp / RECIPE_FILE).write_text(json.dumps(recipe, indent=2, default=str))
        config.to_json_file(str(tmp / CONFIG_FILE))
        (tmp / STATE_FILE).write_text(json.dumps(state.__dict__, indent=1))
        write_manifest(tmp)
        publish_dir(tmp, run_dir / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_text_atomic(run_dir / LATEST, name + "\n")
    if keep_last > 0:
        prune(run_dir, keep_last)
    return run_dir / name
