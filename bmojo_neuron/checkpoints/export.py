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

from bmojo_neuron.data.tokenizer import save_hf_tokenizer
from bmojo_neuron.fsutil import publish_dir

from .layout import FINAL, RECIPE_FILE, RUN_INFO_FILE, new_tmp_dir
from .manifest import write_manifest


def export_final(
    run_dir: str | Path, model: nn.Module, recipe: dict[str, Any], tokenizer: str, metrics: dict[str, Any]
) -> Path:
    """Atomically write ``<run_dir>/final``: `save_pretrained` + tokenizer files + the run info (tokenizer, recipe, metrics).

    With the tokenizer files beside the weights, ``pipeline("text-generation", model=final)``
    works after ``import bmojo_neuron`` (docs/hf.md).
    """
    run_dir = Path(run_dir)
    tmp = new_tmp_dir(run_dir, FINAL)
    try:
        with quiet_transformers():
            model.save_pretrained(str(tmp))
            _save_tokenizer_files(tokenizer, tmp)
        info = {"tokenizer": tokenizer, "recipe": recipe, "final_metrics": metrics}
        (tmp / RUN_INFO_FILE).write_text(json.dumps(info, indent=2, default=str))
        (tmp / RECIPE_FILE).write_text(json.dumps(recipe, indent=2, default=str))
        write_manifest(tmp)
        publish_dir(tmp, run_dir / FINAL)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return run_dir / FINAL


def _save_tokenizer_files(tokenizer: str, directory: Path) -> None:
    """Tokenizer files for `pipeline`; a tokenizer this machine cannot load (pre-tokenized data, offline)
    costs only that convenience, not the export."""
    try:
        save_hf_tokenizer(tokenizer, directory)
    except (OSError, ValueError) as err:
        print(f"warning: the export has no tokenizer files ({err}); pass the tokenizer to pipeline() yourself",
              file=sys.stderr)


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
