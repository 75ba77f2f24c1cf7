"""The ``final/`` export of a finished run: a Hugging Face `save_pretrained` directory plus the run's info."""

from __future__ import annotations

import json
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from torch import nn
from transformers.utils import logging as hf_logging

from bmojo_neuron.data.tokenizer import hf_tokenizer
from bmojo_neuron.fsutil import publish_dir

from .layout import FINAL, RECIPE_FILE, RUN_INFO_FILE, new_tmp_dir
from .manifest import write_manifest


def export_final(
    run_dir: str | Path, model: nn.Module, recipe: dict[str, Any], tokenizer: str, metrics: dict[str, Any]
) -> Path:
    """Atomically write ``<run_dir>/final``: `save_pretrained` + tokenizer files + the run info (tokenizer, recipe, metrics).

    With the tokenizer files beside the weights, ``pipeline("text-generation", model=final)``
    works after ``import bmojo_neuron`` (docs/hf.md). A model trained on text gets the
    tokenizer's end-of-text id as its ``eos_token_id`` (config and generation config), so a
    plain ``model.generate`` stops where the training documents ended.
    """
    run_dir = Path(run_dir)
    tmp = new_tmp_dir(run_dir, FINAL)
    try:
        save_for_hf(tmp, model, recipe, tokenizer)
        info = {"tokenizer": tokenizer, "recipe": recipe, "final_metrics": metrics}
        (tmp / RUN_INFO_FILE).write_text(json.dumps(info, indent=2, default=str))
        (tmp / RECIPE_FILE).write_text(json.dumps(recipe, indent=2, default=str))
        write_manifest(tmp)
        publish_dir(tmp, run_dir / FINAL)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return run_dir / FINAL


def save_for_hf(directory: Path, model: nn.Module, recipe: dict[str, Any], tokenizer: str) -> None:
    """`save_pretrained` of a trained model with its tokenizer's files and, for a text model, the tokenizer's
    end-of-text id as its eos (`stop_at_end_of_text`). A model whose vocabulary the tokenizer does not fit
    (MQAR's task ids under the byte tokenizer's name) gets neither (`tokenizer_fits`)."""
    with quiet_transformers():
        hf_tok = _loadable_tokenizer(tokenizer)
        if hf_tok is not None and not tokenizer_fits(hf_tok, model.config.vocab_size):
            hf_tok = None
        if hf_tok is not None and (recipe.get("data") or {}).get("kind") == "text":
            stop_at_end_of_text(model, hf_tok.eos_token_id)
        model.save_pretrained(str(directory))
        if hf_tok is not None:
            hf_tok.save_pretrained(str(directory))


def save_tokenizer_files(directory: Path, tokenizer: str, vocab_size: int) -> bool:
    """Write the Hugging Face files of `tokenizer` (``byte`` included, as `hf_tokenizer` builds it) into
    `directory`, so that ``pipeline(model=directory)`` finds a tokenizer; False when this machine cannot load
    it (after a warning) or it does not fit a model of `vocab_size` ids (`tokenizer_fits`)."""
    with quiet_transformers():
        hf_tok = _loadable_tokenizer(tokenizer, lost="no tokenizer files", advice="pass the tokenizer to pipeline()")
        if hf_tok is None or not tokenizer_fits(hf_tok, vocab_size):
            return False
        hf_tok.save_pretrained(str(directory))
    return True


def tokenizer_fits(hf_tok: Any, vocab_size: int) -> bool:
    """Whether every id `hf_tok` produces is in a model of `vocab_size` ids. An MQAR model is trained on task
    ids (64 of them in cpu-tiny) and named after the byte tokenizer: with the byte tokenizer's files beside
    it, ``pipeline`` would encode text into ids the embedding does not have and fail with an IndexError."""
    return len(hf_tok) <= vocab_size


def _loadable_tokenizer(tokenizer: str, lost: str = "no tokenizer files and no eos_token_id",
                        advice: str = "pass the tokenizer to pipeline() and eos_token_id to generate()") -> Any:
    """The tokenizer whose files go beside the weights for `pipeline`, or None: a tokenizer this machine cannot
    load (pre-tokenized data, offline) costs only that convenience (`lost`, in the warning), not the export."""
    try:
        return hf_tokenizer(tokenizer)
    except (OSError, ValueError) as err:
        reason = " ".join(str(err).split())  # transformers' messages span lines; the warning is one
        print(f"warning: the export has {lost} ({reason}); {advice} yourself", file=sys.stderr)
        return None


def stop_at_end_of_text(model: nn.Module, eos_token_id: int | None) -> None:
    """Make `eos_token_id` the model's end of sequence for Hugging Face generation; the pad id defaults to it
    (the training data packs documents with nothing between them but that id)."""
    if eos_token_id is None:
        return
    model.config.eos_token_id = eos_token_id
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.eos_token_id = eos_token_id
        if generation.pad_token_id is None:
            generation.pad_token_id = eos_token_id


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """No transformers progress bars ("Writing model shards", "Loading weights") for one-file models."""
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()
