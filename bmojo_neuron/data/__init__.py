"""Training data: MQAR synthetic recall and packed text, both as `datasets.Dataset`.

`build_datasets(recipe)` is what the training loop calls; every dataset it returns
has int64 ``input_ids`` and ``labels`` columns of one fixed length, in torch format.
`datasets` is imported lazily so importing this package stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bmojo_neuron.data.build_progress import BuildProgress
from bmojo_neuron.data.mqar import IGNORE_INDEX, generate_mqar, mqar_accuracy
from bmojo_neuron.data.text import library_progress_bars, load_text_dataset
from bmojo_neuron.data.tokenizer import BYTE_TOKENIZER, ByteTokenizer, load_tokenizer, vocabulary_in_files

if TYPE_CHECKING:
    from datasets import Dataset

    from bmojo_neuron.recipes import MqarDataSection, Recipe, TextDataSection

EVAL_SEED_OFFSET = 1_000_003  # eval MQAR examples come from a different stream than train


def build_datasets(recipe: Recipe, progress: BuildProgress | None = None) -> tuple[Dataset, Dataset]:
    """(train, eval) datasets for ``recipe.data`` at the training length, in torch format. `progress` gets the
    plain lines of a text cache's build (`text.load_text_dataset`), for a log where no bar is drawn."""
    data = recipe.data
    if data.kind == "mqar":
        train = _mqar(recipe, data.train_examples, data.seed, 1, data.train_spacings)
        evaluation = _mqar(recipe, data.eval_examples, data.seed + EVAL_SEED_OFFSET, 1)
    elif data.kind == "text":
        train, evaluation = _text(recipe, data.block_size, progress)
    else:
        raise ValueError(f"recipe key data.kind: unknown kind {data.kind!r}")
    return train.with_format("torch"), evaluation.with_format("torch")


def build_eval_dataset(recipe: Recipe, length_multiplier: int = 1, progress: BuildProgress | None = None) -> Dataset:
    """The eval split at ``length_multiplier`` times the training length (for `eval.length_multipliers`).

    MQAR stretches each training-length layout (same kv pairs, every pair-to-query
    distance times the multiplier: `mqar_arrays`'s ``spacing``); text is re-packed
    into longer blocks (a separate cache entry), whose build `progress` is told of as in `build_datasets`.
    """
    if length_multiplier < 1:
        raise ValueError(f"length_multiplier is {length_multiplier}; must be >= 1")
    data = recipe.data
    if data.kind == "mqar":
        evaluation = _mqar(recipe, data.eval_examples, data.seed + EVAL_SEED_OFFSET, length_multiplier)
    else:
        _, evaluation = _text(recipe, data.block_size * length_multiplier, progress)
    return evaluation.with_format("torch")


def data_vocabulary(data: MqarDataSection | TextDataSection) -> tuple[int, str]:
    """How many token ids a data section produces (the ids run 0 to that count - 1), and what sets the count:
    MQAR's ``data.vocab_size``, or the size of the text data's tokenizer."""
    if data.kind == "mqar":
        return data.vocab_size, f"data.vocab_size {data.vocab_size}"
    size = len(load_tokenizer(data.tokenizer))
    return size, f"tokenizer {data.tokenizer!r}, {size} ids"


def data_vocabulary_from_files(data: MqarDataSection | TextDataSection) -> tuple[int, str] | None:
    """`data_vocabulary` where no tokenizer need load (no transformers): MQAR's, the byte tokenizer's, and a local
    tokenizer folder's lower bound (`tokenizer.vocabulary_in_files`); None for any other tokenizer."""
    if data.kind == "mqar" or (data.tokenizer or BYTE_TOKENIZER) == BYTE_TOKENIZER:
        return data_vocabulary(data)
    size = vocabulary_in_files(str(data.tokenizer))
    return None if size is None else (size, f"tokenizer {data.tokenizer!r}, {size} ids")


def _mqar(recipe: Recipe, examples: int, seed: int, multiplier: int, spacings: list[int] | None = None) -> Dataset:
    """`examples` MQAR rows at `multiplier` times the training length, stretched by it; `spacings`
    (at multiplier 1: the training set's ``data.train_spacings``) mixes stretches row by row instead."""
    data = recipe.data
    return generate_mqar(
        vocab_size=data.vocab_size,
        seq_len=data.seq_len * multiplier,
        num_kv_pairs=data.num_kv_pairs,
        num_examples=examples,
        seed=seed,
        power_a=data.power_a,
        random_non_queries=data.random_non_queries,
        spacing=spacings if spacings is not None else multiplier,
        stretch_pairs=data.stretch_pairs,
    )


def _text(recipe: Recipe, block_size: int, progress: BuildProgress | None) -> tuple[Dataset, Dataset]:
    data = recipe.data
    return load_text_dataset(
        path=data.path,
        tokenizer=data.tokenizer,
        block_size=block_size,
        cache_dir=data.cache_dir,
        eval_fraction=data.eval_fraction,
        text_column=data.text_column,
        progress=progress,
    )


__all__ = [
    "BuildProgress",
    "IGNORE_INDEX",
    "ByteTokenizer",
    "build_datasets",
    "build_eval_dataset",
    "data_vocabulary",
    "data_vocabulary_from_files",
    "generate_mqar",
    "library_progress_bars",
    "load_tokenizer",
    "mqar_accuracy",
]
