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
    end-of-text id as its eos (`stop_at_end_of_text`); both only where the tokenizer fits (`fitting_tokenizer`)."""
    with quiet_transformers():
        hf_tok = fitting_tokenizer(tokenizer, model.config.vocab_size)
        if hf_tok is not None and (recipe.get("data") or {}).get("kind") == "text":
            stop_at_end_of_text(model, hf_tok.eos_token_id)
        model.save_pretrained(str(directory))
        if hf_tok is not None:
            hf_tok.save_pretrained(str(directory))


def save_tokenizer_files(directory: Path, tokenizer: str, vocab_size: int) -> None:
    """Write the Hugging Face files of `tokenizer` (``byte`` included) into `directory`, so that
    ``pipeline(model=directory)`` finds a tokenizer, where it fits a model of `vocab_size` ids."""
    with quiet_transformers():
        hf_tok = fitting_tokenizer(tokenizer, vocab_size)
        if hf_tok is not None:
            hf_tok.save_pretrained(str(directory))


def fitting_tokenizer(tokenizer: str, vocab_size: int) -> Any:
    """`tokenizer` as a Hugging Face tokenizer (`hf_tokenizer`), or None where no files should go beside a model
    of `vocab_size` ids.

    None when this machine cannot load it (pre-tokenized data, offline: a warning, and the export goes on
    without that convenience) and when it produces ids the model lacks: an MQAR model is trained on task ids
    (64 in cpu-tiny) and named after the byte tokenizer, whose files would make ``pipeline`` encode text into
    ids past the embedding (an IndexError).
    """
    try:
        hf_tok = hf_tokenizer(tokenizer)
    except (OSError, ValueError) as err:
        reason = " ".join(str(err).split())  # transformers' messages span lines; the warning is one
        print(f"warning: the export has no tokenizer files ({reason}); pass the tokenizer to pipeline() (and "
              "a text model's eos_token_id to generate()) yourself", file=sys.stderr)
        return None
    return hf_tok if len(hf_tok) <= vocab_size else None


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
