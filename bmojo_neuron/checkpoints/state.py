"""What a checkpoint restores besides the weights: where training stands, the recipe, the RNG streams.

Only the RNG functions need torch and NumPy, and import them: `train --resume` checks a checkpoint's recipe
(`resume_refusal`) before torch loads (seconds).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bmojo_neuron.config_fields import model_fields_as_trained
from bmojo_neuron.recipes import resume_conflicts

from .layout import CONFIG_FILE, PARALLEL_FILE, RECIPE_FILE, RUN_INFO_FILE, STATE_FILE, is_complete
from .manifest import read_json_object


@dataclass
class TrainerState:
    """Where training stands: enough to continue with the very same next batch."""

    step: int = 0  # optimizer updates done
    epoch: int = 0  # pass over the training set the next batch comes from
    position: int = 0  # micro-batches already taken from that epoch's permutation
    tokens: int = 0  # training tokens consumed
    metrics: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl records so far
    # The per-step metric rows since the last record, kept by a run stopped between log steps so that the
    # resumed run's next record averages the steps the uninterrupted run's does. A checkpoint written before
    # this field existed holds none: that resumed run's next record averages only the steps after it.
    log_window: list[list[float]] = field(default_factory=list)
    # Wall seconds the run has trained up to this checkpoint, over every attempt (each from its start to its
    # save): a resumed run reports the time its result took, not only its own part (0 in older checkpoints).
    seconds: float = 0.0


@dataclass
class Checkpoint:
    """A checkpoint read back from disk (the model weights are loaded separately).

    For a sharded checkpoint it is one rank's view: the optimizer states of its shard,
    its own scheduler and RNG states.
    """

    path: Path
    state: TrainerState
    recipe: dict[str, Any]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any] | None  # None: `checkpoint shard` of a plain export (a warm start)
    rng: dict[str, Any]


def read_trainer_state(path: Path) -> TrainerState:
    return TrainerState(**read_json_object(path / STATE_FILE))


def read_recipe(path: Path) -> dict[str, Any]:
    return read_json_object(path / RECIPE_FILE)


def stored_recipe(model_dir: Path) -> dict[str, Any]:
    """The recipe a model folder holds, as `inference.load_trained` reads it: a checkpoint's recipe.json, an
    export's ``recipe`` in bmojo_run.json, {} for a folder that stores none (primed, converted)."""
    if is_complete(model_dir):
        return read_recipe(model_dir)
    info = model_dir / RUN_INFO_FILE
    return read_json_object(info).get("recipe", {}) if info.is_file() else {}


def stored_tokenizer(model_dir: Path) -> str | None:
    """The tokenizer whose ids the model in `model_dir` learned: a checkpoint's text ``data.tokenizer``, an
    export's or primed folder's ``tokenizer`` in bmojo_run.json; None where none is recorded (an MQAR run's
    task ids, a source primed without tokenizer files)."""
    if is_complete(model_dir):
        data = read_recipe(model_dir).get("data", {})
        return str(data.get("tokenizer") or "byte") if data.get("kind") == "text" else None
    info = model_dir / RUN_INFO_FILE
    tokenizer = read_json_object(info).get("tokenizer") if info.is_file() else None
    return str(tokenizer) if tokenizer else None


# A refusal lists every changed key up to this many; more mean the folder holds another recipe's run, and a
# screenful of keys would hide that: the most telling (`TELLING_KEYS`) are named and the rest counted.
MAX_CHANGES_LISTED = 5
TELLING_KEYS = ("data.kind", "data.path", "data.tokenizer", "model.layer_pattern", "model.hidden_size",
                "model.num_hidden_layers", "model.vocab_size")


def resume_refusal(checkpoint: Path, saved: dict[str, Any], current: dict[str, Any]) -> str | None:
    """Why `checkpoint` (whose recipe is `saved`) cannot be resumed with the recipe `current`, or None.

    Both are compared with the model fields whose default has changed written out as the
    checkpoint's config.json says its weights were trained, so a changed default cannot
    silently change a resumed layer. The trainer and the CLI's check before any run starts
    (`preflight.check_resumable`) share it, so a suite refuses with the trainer's words.
    """
    if not set(saved) - {"parallel"}:
        return _recipe_free_refusal(checkpoint)
    config_file = checkpoint / CONFIG_FILE
    saved_config = read_json_object(config_file) if config_file.exists() else None
    diff = resume_conflicts(
        {**saved, "model": model_fields_as_trained(saved.get("model") or {}, saved_config)},
        {**current, "model": model_fields_as_trained(current.get("model") or {}, None)})
    if not diff:
        return None
    # Each key with both values: the override that makes the run resumable is then on the screen.
    changes = [f"{key} ({old!r} in the checkpoint, {new!r} now)" for key, (old, new) in diff.items()]
    if len(changes) <= MAX_CHANGES_LISTED:
        return f"cannot resume {checkpoint}: the recipe changed in {', '.join(changes)}"
    telling = sorted(range(len(changes)), key=lambda i: (list(diff)[i] not in TELLING_KEYS, i))[:MAX_CHANGES_LISTED]
    recipe = checkpoint.parent / RECIPE_FILE
    own = f"bmojo-neuron train {recipe} --resume --output-dir {checkpoint.parent}" if recipe.is_file() else None
    return (f"cannot resume {checkpoint}: the recipe changed in {len(changes)} keys, among them "
            f"{', '.join(changes[i] for i in sorted(telling))}: the folder holds a run of another recipe; "
            + (f"continue it with its own ({own}), or " if own else "") + "pick another --output-dir for this one")


def _recipe_free_refusal(checkpoint: Path) -> str:
    """Why a checkpoint no recipe trained (`checkpoint shard` of a `prime` output) is not resumed.

    Its recipe holds only the degrees, so every key of the current one would read as changed;
    what the user wants is a new run from those weights, which `init.weights` starts (and shards).
    """
    try:
        source = read_json_object(checkpoint / PARALLEL_FILE).get("sharded_from")
    except (OSError, ValueError, AttributeError):
        source = None
    weights = source or "<the folder it was sharded from>"
    return (f"cannot resume {checkpoint}: it was sharded from weights no recipe trained (a `prime` output), "
            f"so there is no run to continue; start one from them with init.weights={weights} instead of --resume")


def rng_states() -> dict[str, Any]:
    """The Python, NumPy, torch (and CUDA, once initialised) generator states of this process."""
    import numpy as np
    import torch

    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
