"""Checks of what a run needs from this machine, made before any long work starts.

`train` calls `check_run_dirs` before it builds data or weights, so a read-only or full
output directory, or a data path that is not there, is one ``error:`` line within seconds
rather than a traceback after minutes. ``train --dry-run`` prints the same findings.
None of them imports torch or transformers: `train` makes the checks that read files alone
(`check_resumable`, `check_no_file_in_the_way`, `check_init_weights`) before torch loads.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bmojo_neuron.checkpoints.initial_config import check_initial_config
from bmojo_neuron.checkpoints.layout import latest_intact_checkpoint
from bmojo_neuron.checkpoints.locate import initial_weights_dir
from bmojo_neuron.checkpoints.state import read_recipe, resume_refusal, stored_tokenizer
from bmojo_neuron.compile_cache.units import format_size
from bmojo_neuron.data.text import source_kind
from bmojo_neuron.data.tokenizer import BYTE_TOKENIZER, byte_level_backend, tokenizer_file
from bmojo_neuron.fsutil import DISK_FULL, file_in_the_way, unwritable_reason

# Per parameter on disk: fp32 weights (4 B) and AdamW's two fp32 moments (8 B) in a checkpoint;
# the weights again in the final export. Each also holds a few small files (config, recipe, RNG
# states, headers: 70 KiB for cpu-tiny), and metrics, plots and TensorBoard logs get an allowance.
CHECKPOINT_BYTES_PER_PARAMETER = 12
EXPORT_BYTES_PER_PARAMETER = 4
FILE_OVERHEAD = 2**20
LOGS_ALLOWANCE = 16 * 2**20


@dataclass(frozen=True)
class SpaceNeed:
    """Bytes a run writes at its peak: `checkpoints` checkpoints side by side, the export and the logs."""

    checkpoints: int
    checkpoint_bytes: int
    export_bytes: int

    @property
    def total(self) -> int:
        return self.checkpoints * self.checkpoint_bytes + self.export_bytes + LOGS_ALLOWANCE

    def describe(self) -> str:
        return (f"about {format_size(self.total)}: {self.checkpoints} checkpoint(s) of "
                f"{format_size(self.checkpoint_bytes)}, the {format_size(self.export_bytes)} export and logs")


def space_need(parameters: int, keep_last: int, resume: bool) -> SpaceNeed:
    """The peak disk use of a run of a model with `parameters` parameters.

    A new checkpoint is published before the oldest is pruned, so ``keep_last + 1`` exist
    for a moment; a resumed run already has its old ones on disk and adds one at a time.
    """
    return SpaceNeed(1 if resume else keep_last + 1, CHECKPOINT_BYTES_PER_PARAMETER * parameters + FILE_OVERHEAD,
                     EXPORT_BYTES_PER_PARAMETER * parameters + FILE_OVERHEAD)


def check_writable(directory: Path, remedy: str = "pick another --output-dir (or run.output_dir)") -> None:
    """Create `directory` if needed and write, sync and delete a probe file in it; ValueError naming why not
    and ending with `remedy` (what the user changes: the option of the command that writes there)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".tmp-probe-") as probe:
            probe.write(b"\0")
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        check_no_file_in_the_way(directory, remedy)  # the OS says "File exists" or "Not a directory": name it
        full = " (disk full)" if exc.errno in DISK_FULL else ""
        raise ValueError(f"output directory {directory} is not writable: {exc.strerror}{full}; {remedy}") from None


def check_no_file_in_the_way(directory: Path, remedy: str = "pick another --output-dir (or run.output_dir)") -> None:
    """ValueError when a file stands where the output folder `directory` (or a folder above it) would be, in
    `check_writable`'s words; creates nothing, so a command asks it before torch loads."""
    problem = file_in_the_way(directory)
    if problem:
        raise ValueError(f"output directory {directory} {problem}, not a folder; {remedy}")


def check_free_space(needs: list[tuple[Path, SpaceNeed]]) -> None:
    """ValueError when the filesystem holding these (existing) run directories has less room than they all need."""
    directory = needs[0][0]
    free = shutil.disk_usage(directory).free
    if free < sum(need.total for _, need in needs):
        what = "; ".join(f"{run_dir} {need.describe()}" for run_dir, need in needs)
        raise ValueError(f"{directory.parent if len(needs) > 1 else directory} has {format_size(free)} free, "
                         f"too little for what the run writes: {what}; free some space or pick another "
                         "--output-dir")


def describe_output(run_dir: Path, need: SpaceNeed) -> str:
    """For ``--dry-run``, which writes nothing: whether `run_dir` could be created and written, and the room."""
    problem = unwritable_reason(run_dir)
    if problem:
        return f"PROBLEM: {problem}"
    existing = next(p for p in [run_dir, *run_dir.parents] if p.exists())
    free = shutil.disk_usage(existing).free
    verdict = "ok" if free >= need.total else "PROBLEM: too little"
    return f"{verdict}: {format_size(free)} free, the run writes {need.describe()}"


def check_data_source(recipe: Any) -> None:
    """A text recipe's data.path must exist (or be a hub name), so a typo fails before the run starts.

    data.tokenizer is not checked here: with the data cache already built (`data prepare` on
    another machine) the run never loads it, so an offline node without it must still train.
    """
    if recipe.data.kind != "text" or recipe.data.path is None:
        return
    source_kind(str(Path(recipe.data.path).expanduser()))


def check_init_weights(recipe: Any) -> None:
    """A new run's ``init.weights`` must name a model folder holding the recipe's model, so a typo or a model
    section that restates other sizes fails before the run starts (and before its data is built); a text run
    must also read its data with the tokenizer that model learned."""
    if recipe.init.weights:
        check_initial_config(recipe.init.weights, recipe.model_fields(), recipe.model)
        check_init_tokenizer(recipe)


def check_init_tokenizer(recipe: Any) -> None:
    """ValueError when a text recipe's ``data.tokenizer`` gives other ids than the tokenizer ``init.weights``'
    model learned (a primed Llama fed the byte tokenizer of a shipped recipe): its embeddings would be read for
    the wrong tokens, and nothing else would say so. Tokenizers are compared by their tokenizer.json's model,
    normalizer and pre-tokenizer (a byte-level folder `prime` or an export wrote is the ``byte`` tokenizer); one
    that cannot be read here (a hub name not in the local cache) is not judged."""
    if recipe.data.kind != "text":
        return
    learned, given = stored_tokenizer(initial_weights_dir(recipe.init.weights)), recipe.data.tokenizer or BYTE_TOKENIZER
    if learned is None or _same_name(learned, given):
        return
    learned_ids, given_ids = _token_ids_definition(learned), _token_ids_definition(given)
    if learned_ids is not None and given_ids is not None and learned_ids != given_ids:
        raise ValueError(f"init.weights {recipe.init.weights}: its model learned the ids of the tokenizer {learned}, "
                         f"but data.tokenizer is {given}, which gives other ids; set data.tokenizer={learned}")


def _same_name(first: str, second: str) -> bool:
    return first == second or Path(first).expanduser().resolve() == Path(second).expanduser().resolve()


def _token_ids_definition(tokenizer: str) -> dict[str, Any] | None:
    """What decides a tokenizer's ids for a text: its tokenizer.json's model, normalizer and pre-tokenizer, read
    from the file (the byte tokenizer: its byte-level equivalent's); None when there is no file to read."""
    if tokenizer == BYTE_TOKENIZER:  # built by the tokenizers library alone (milliseconds; no transformers)
        document = json.loads(byte_level_backend().to_str())
    else:
        location = tokenizer_file(tokenizer, "tokenizer.json")
        try:
            document = json.loads(location.read_text(encoding="utf-8")) if isinstance(location, Path) else None
        except (OSError, ValueError):  # unreadable: the data build names it
            return None
    if not isinstance(document, dict):
        return None
    return {key: document.get(key) for key in ("model", "normalizer", "pre_tokenizer")}


def check_run_dirs(runs: list[tuple[Any, Path]], parameters: list[int], resume: bool) -> None:
    """Each run's data source (and a new run's ``init.weights``) present, its directory writable, and room on
    disk for all of them.

    `runs` are (recipe, run dir) pairs, `parameters` the model size of each.
    """
    by_filesystem: dict[int, list[tuple[Path, SpaceNeed]]] = {}
    for (recipe, run_dir), count in zip(runs, parameters):
        check_data_source(recipe)
        if not resume:  # a resumed run starts from its checkpoint
            check_init_weights(recipe)
        check_writable(run_dir)
        need = space_need(count, recipe.checkpoint.keep_last, resume)
        by_filesystem.setdefault(run_dir.stat().st_dev, []).append((run_dir, need))
    for needs in by_filesystem.values():
        check_free_space(needs)


def check_resumable(runs: list[tuple[Any, Path]]) -> None:
    """ValueError when a run's checkpoint cannot be resumed with its recipe (a key that may not change did).

    Checked for every run before the first starts, so a suite whose recipe changed is refused
    as a whole instead of training some runs and failing on another. The checkpoint is the
    one the trainer will take (the newest intact one; sizes only, the trainer hashes it).
    """
    for recipe, run_dir in runs:
        checkpoint = latest_intact_checkpoint(run_dir, hashes=False)
        if checkpoint is not None and (refusal := resume_refusal(checkpoint, read_recipe(checkpoint),
                                                                 recipe.record())):
            raise ValueError(refusal)
