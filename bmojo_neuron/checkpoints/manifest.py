"""A checkpoint's manifest: every file's size and SHA-256, written last, checked when it is read.

``manifest.json`` sits in each checkpoint directory and in the ``final/`` export::

    {"format": 1, "files": {"model.safetensors": {"bytes": 641344, "sha256": "9f2c..."}, ...}}

It is written into the temporary directory after every other file, so a published
directory either has a manifest that covers all of its files or (written before
manifests existed) none. Publishing is already atomic (`layout.publish_step`); the
manifest catches what happens to the files afterwards: a copy cut short, a disk that
returns other bytes, a file replaced by hand. Sizes are checked first (no reading);
hashes read every byte, so they are checked where a damaged file would otherwise
surface as a deep traceback or a silently wrong model: loading for `eval` /
`generate`, resuming a one-process run, `checkpoint consolidate` and `shard`.
A directory without a manifest is read through `read_safetensors` / `read_torch_file` /
`read_json_object` / `check_readable`, which turn a file their parser rejects into the same
one-line error.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path
from typing import Any

from bmojo_neuron.fsutil import write_text_atomic

from .names import (CONFIG_FILE, FINAL, PARALLEL_FILE, RECIPE_FILE, RUN_INFO_FILE, STATE_FILE, STEP_PATTERN,
                    step_folders)

MANIFEST_FILE = "manifest.json"
# the JSON files of a checkpoint or export that are read when it is loaded (generation_config.json is
# `transformers`' own, read by `generate` with its defaults when absent)
JSON_FILES = (CONFIG_FILE, RECIPE_FILE, STATE_FILE, RUN_INFO_FILE, PARALLEL_FILE, "generation_config.json")
FORMAT = 1
_CHUNK = 8 * 1024 * 1024


class DamagedCheckpointError(ValueError):
    """A checkpoint or export whose files do not match its manifest (one line: which file, what is wrong)."""

    def __init__(self, directory: Path, file: str, problem: str) -> None:
        super().__init__(f"{directory / file}: {problem}; {repair_advice(directory)}")
        self.directory, self.file, self.problem = directory, file, problem


def repair_advice(directory: Path) -> str:
    """What the user can do about a damaged `directory`: a training checkpoint has earlier steps to fall back
    on; an export has none, but can be written again from what it was made from."""
    if STEP_PATTERN.match(directory.name) or (directory / STATE_FILE).is_file():
        return "the checkpoint is damaged (copy it again, or use an earlier step)"
    source = _consolidated_from(directory / RUN_INFO_FILE)
    if source is not None:
        return (f"the export is damaged (copy it again, or delete it and consolidate it again: bmojo-neuron "
                f"checkpoint consolidate {source} {directory})")
    run = directory.parent
    if directory.name == FINAL and (run / RECIPE_FILE).is_file() and any(
            (step / STATE_FILE).is_file() for step in step_folders(run)):  # a step's state is written last
        # resuming a finished run redoes its export from the last checkpoint
        return (f"the export is damaged (copy it again, or export it again from the run's last checkpoint: "
                f"bmojo-neuron train {run / RECIPE_FILE} --resume --output-dir {run})")
    return "the export is damaged (copy it again, or export it again from the checkpoint it was made from)"


def _consolidated_from(run_info: Path) -> str | None:
    """The sharded checkpoint a `checkpoint consolidate` folder was made from, as its run info records it."""
    try:
        source = json.loads(run_info.read_text()).get("consolidated_from")
    except (OSError, ValueError, AttributeError):  # no run info, or one damaged too
        return None
    return source if isinstance(source, str) and source else None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _listed_files(directory: Path) -> list[str]:
    """Every regular file under `directory` but the manifest, as sorted relative POSIX paths."""
    names = []
    for root, _dirs, files in os.walk(directory):
        for name in files:
            rel = (Path(root) / name).relative_to(directory).as_posix()
            if rel != MANIFEST_FILE:
                names.append(rel)
    return sorted(names)


def write_manifest(directory: Path) -> None:
    """Record the size and SHA-256 of every file in `directory`; call it after the last other file is written."""
    files = {}
    for rel in _listed_files(directory):
        path = directory / rel
        files[rel] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    write_text_atomic(directory / MANIFEST_FILE, json.dumps({"format": FORMAT, "files": files}, indent=1) + "\n")


def has_manifest(directory: Path) -> bool:
    return (directory / MANIFEST_FILE).is_file()


def verify_manifest(directory: str | Path, hashes: bool = True) -> None:
    """Raise `DamagedCheckpointError` naming the first file that is missing, resized or (with `hashes`) changed.

    A directory without a manifest (written before manifests existed) passes unchecked.
    """
    directory = Path(directory)
    if not has_manifest(directory):
        return
    try:
        listed = json.loads((directory / MANIFEST_FILE).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DamagedCheckpointError(directory, MANIFEST_FILE, f"unreadable manifest ({exc})") from None
    for rel, entry in sorted(listed.items()):
        path = directory / rel
        if not path.is_file():
            raise DamagedCheckpointError(directory, rel, "missing (listed in manifest.json)")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise DamagedCheckpointError(directory, rel, f"{size} bytes, manifest.json says {entry['bytes']} "
                                                         "(truncated or replaced)")
    if hashes:
        for rel, entry in sorted(listed.items()):
            if file_sha256(directory / rel) != entry["sha256"]:
                raise DamagedCheckpointError(directory, rel, "SHA-256 differs from manifest.json (corrupted bytes)")


def _unreadable(file: Path, kind: str, exc: BaseException) -> DamagedCheckpointError:
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return DamagedCheckpointError(file.parent, file.name, f"not a readable {kind} file ({detail})")


def check_safetensors(directory: Path) -> None:
    """Open the header of every ``*.safetensors`` file in `directory` (which also checks that the file is as long
    as the header says): a cut or garbled file fails here in one line instead of inside a loader."""
    from safetensors import safe_open

    for file in sorted(Path(directory).glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except OSError:  # unreadable for reasons of the file system, not of its bytes
            raise
        except Exception as exc:  # safetensors' own error type differs between its releases
            raise _unreadable(file, "safetensors", exc) from None


def read_json_object(file: Path) -> dict[str, Any]:
    """A checkpoint's or export's JSON file (config, recipe, trainer state, run info), which holds an object; one
    that does not parse, or holds anything else, is a `DamagedCheckpointError`."""
    file = Path(file)
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as exc:  # bad JSON, or bytes that are not UTF-8
        raise _unreadable(file, "JSON", exc) from None
    if not isinstance(value, dict):
        raise DamagedCheckpointError(file.parent, file.name, f"holds a JSON {type(value).__name__}, not an object")
    return value


def check_readable(directory: Path) -> None:
    """`check_safetensors`, and every JSON file the loaders read (`JSON_FILES`) an object: a file cut or edited
    into something else fails here in one line naming it, not as a traceback inside `transformers`."""
    check_safetensors(directory)
    for name in JSON_FILES:
        if (Path(directory) / name).is_file():
            read_json_object(Path(directory) / name)


def read_safetensors(file: Path) -> dict[str, Any]:
    """`safetensors.torch.load_file` of a checkpoint file; one it cannot parse is a `DamagedCheckpointError`."""
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except OSError:  # unreadable for reasons of the file system, not of its bytes
        raise
    except Exception as exc:  # safetensors' own error type differs between its releases
        raise _unreadable(Path(file), "safetensors", exc) from None


def read_torch_file(file: Path) -> Any:
    """`torch.load` (on the CPU) of a checkpoint's own pickle; one it cannot parse is a `DamagedCheckpointError`."""
    import torch

    try:
        return torch.load(file, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, ValueError, KeyError, IndexError, pickle.UnpicklingError) as exc:
        # what a cut zip archive or pickle raises
        raise _unreadable(Path(file), "torch.save", exc) from None


def damage(directory: Path, hashes: bool = True) -> DamagedCheckpointError | None:
    """The error `verify_manifest` would raise, or None for an intact directory."""
    try:
        verify_manifest(directory, hashes)
    except DamagedCheckpointError as exc:
        return exc
    return None
