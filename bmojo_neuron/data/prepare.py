"""Build a recipe's text data cache ahead of training (``bmojo-neuron data prepare``), and say what it holds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bmojo_neuron.data.build_progress import BuildProgress
from bmojo_neuron.data.text import load_text_dataset


def prepare_text(recipe: Any, progress: BuildProgress | None = None) -> dict[str, Any]:
    """Build (or find) the recipe's text cache; where it is, whether it was built now, and its size. `progress`
    gets the build's plain lines (`load_text_dataset`)."""
    d = recipe.data
    cache_root = Path(d.cache_dir).expanduser().resolve() if d.cache_dir else None
    before = _entries(cache_root)
    train, evaluation = load_text_dataset(path=d.path, tokenizer=d.tokenizer, block_size=d.block_size,
                                          cache_dir=d.cache_dir, eval_fraction=d.eval_fraction,
                                          text_column=d.text_column, progress=progress)
    location = dataset_dir(train)
    return {"path": location, "built": location not in before and location.parent == cache_root,
            "train_blocks": len(train), "eval_blocks": len(evaluation), "block_size": d.block_size}


def dataset_dir(split: Any) -> Path:
    """The `save_to_disk` folder a loaded split reads (its arrow files sit in ``<folder>/<split>/``)."""
    return Path(split.cache_files[0]["filename"]).resolve().parent.parent


def _entries(root: Path | None) -> set[Path]:
    return {p.resolve() for p in root.glob("text-*")} if root is not None and root.is_dir() else set()
