"""Multi-query associative recall (MQAR), the Zoology synthetic recall task.

Definition (after Arora et al., "Zoology", `multiquery_ar`): a sequence starts with
``num_kv_pairs`` key/value pairs ``k1 v1 k2 v2 ...`` (distinct keys from
``[1, V/2)``, distinct values from ``[V/2, V)``). The rest of the sequence holds
every key once more as a query, at slot offsets drawn without replacement from a
power law ``p(g) ∝ g^(power_a - 1)`` (so most queries come soon after the pairs,
a few much later), each query followed by its value. Other positions are filler:
random tokens from ``[0, V)`` (``random_non_queries``) or 0. Labels are the value
token at the answer positions and -100 elsewhere; with the Hugging Face shift the
model predicts the value from the query key.

``spacing = m`` stretches that layout over ``m`` times the length: the example is
drawn as at ``seq_len / m`` (same keys, values and query slots for the same seed) and
every key moves from position ``p`` to ``m * p``, its value staying right after it;
filler fills the rest. All distances between a pair and its query grow ``m``-fold,
which is what a length-generalisation test of recall needs (appending filler alone
would leave most queries next to their pairs). ``stretch_pairs=False`` keeps the
pairs contiguous at the start and stretches only the query region: a query in slot
``g`` moves from ``2·kv + 2g`` to ``2·kv + m·2g``, and the last ``(m - 1)·2·kv``
positions are filler. It separates the two things a stretch changes: the
pair-to-query distances (both layouts) and the look of the kv region (the default only).

A training set may mix spacings (`mqar_mixed_arrays`): row ``i`` is drawn at
``spacings[i % len(spacings)]``. With spacing 1 alone the pairs are always contiguous at
the start, and a model can learn to tell a pair from an answered query by that context;
stretched pairs (filler between them) then look like answered queries to it
(docs/results.md, "Length generalisation").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import numpy as np
    import torch
    from datasets import Dataset

# numpy is imported by the functions that draw or scan examples: the recipe check
# (`check_mqar_args`) and the CLI paths that only check a recipe (`plan`, a bad-input
# error) do without its ~0.2 s import.

IGNORE_INDEX = -100


def check_mqar_args(vocab_size: int, seq_len: int, num_kv_pairs: int) -> None:
    """Raise `ValueError` if the pairs and their queries cannot fit the vocabulary or sequence."""
    if num_kv_pairs < 1:
        raise ValueError(f"num_kv_pairs is {num_kv_pairs}; must be >= 1")
    keys, values = vocab_size // 2 - 1, vocab_size - vocab_size // 2
    if num_kv_pairs > min(keys, values):
        raise ValueError(
            f"vocab_size {vocab_size} has {keys} keys and {values} values; too few for {num_kv_pairs} distinct pairs"
        )
    slots = (seq_len - 2 * num_kv_pairs) // 2
    if slots < num_kv_pairs:
        raise ValueError(
            f"seq_len {seq_len} is too short for {num_kv_pairs} kv pairs: needs 2*{num_kv_pairs} tokens of pairs "
            f"plus {num_kv_pairs} query slots of 2 tokens, i.e. seq_len >= {4 * num_kv_pairs}"
        )


def mqar_arrays(
    vocab_size: int,
    seq_len: int,
    num_kv_pairs: int,
    num_examples: int,
    seed: int,
    power_a: float = 0.01,
    random_non_queries: bool = True,
    spacing: int = 1,
    stretch_pairs: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, labels) int64 arrays of shape (num_examples, seq_len); vectorised.

    `spacing`: stretch the layout of a ``seq_len / spacing`` example by that factor, the kv
    pairs too unless `stretch_pairs` is off (module docstring).
    """
    import numpy as np

    if spacing < 1 or seq_len % spacing:
        raise ValueError(f"spacing is {spacing}; must be >= 1 and divide seq_len {seq_len}")
    base_len = seq_len // spacing
    check_mqar_args(vocab_size, base_len, num_kv_pairs)
    if power_a <= 0:
        raise ValueError(f"power_a is {power_a}; must be > 0")
    rng = np.random.default_rng(seed)
    half = vocab_size // 2
    keys = _distinct(rng, np.arange(1, half), num_examples, num_kv_pairs)
    values = _distinct(rng, np.arange(half, vocab_size), num_examples, num_kv_pairs)

    context = 2 * num_kv_pairs
    slots = (base_len - context) // 2
    weights = power_a * np.arange(1, slots + 1, dtype=np.float64) ** (power_a - 1)
    gaps = _weighted_distinct(rng, weights / weights.sum(), num_examples, num_kv_pairs)
    pair_stretch = spacing if stretch_pairs else 1
    query_pos = pair_stretch * context + spacing * 2 * gaps  # key at query_pos, its value right after
    pair_pos = pair_stretch * np.arange(0, context, 2)[None, :].repeat(num_examples, axis=0)

    if random_non_queries:
        inputs = rng.integers(0, vocab_size, size=(num_examples, seq_len), dtype=np.int64)
    else:
        inputs = np.zeros((num_examples, seq_len), dtype=np.int64)
    np.put_along_axis(inputs, pair_pos, keys, axis=1)
    np.put_along_axis(inputs, pair_pos + 1, values, axis=1)
    np.put_along_axis(inputs, query_pos, keys, axis=1)
    np.put_along_axis(inputs, query_pos + 1, values, axis=1)
    labels = np.full((num_examples, seq_len), IGNORE_INDEX, dtype=np.int64)
    np.put_along_axis(labels, query_pos + 1, values, axis=1)
    return inputs, labels


def mqar_mixed_arrays(
    vocab_size: int,
    seq_len: int,
    num_kv_pairs: int,
    num_examples: int,
    seed: int,
    power_a: float = 0.01,
    random_non_queries: bool = True,
    spacings: Sequence[int] = (1,),
    stretch_pairs: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Like `mqar_arrays`, row ``i`` at spacing ``spacings[i % len(spacings)]``.

    One spacing ``[s]`` gives exactly ``mqar_arrays(..., seed, spacing=s)``; with several, the
    rows of the ``k``-th come from ``mqar_arrays(..., seed + k, spacing=spacings[k])``.
    """
    import numpy as np

    spacings = list(spacings)
    if not spacings:
        raise ValueError("spacings is empty; give at least one spacing")
    args = (vocab_size, seq_len, num_kv_pairs)
    inputs = np.empty((num_examples, seq_len), dtype=np.int64)
    labels = np.empty((num_examples, seq_len), dtype=np.int64)
    for k, spacing in enumerate(spacings):
        rows = np.arange(k, num_examples, len(spacings))
        if len(rows):
            inputs[rows], labels[rows] = mqar_arrays(
                *args, len(rows), seed + k, power_a, random_non_queries, spacing, stretch_pairs
            )
    return inputs, labels


def generate_mqar(
    vocab_size: int,
    seq_len: int,
    num_kv_pairs: int,
    num_examples: int,
    seed: int,
    power_a: float = 0.01,
    random_non_queries: bool = True,
    spacing: int | Sequence[int] = 1,
    stretch_pairs: bool = True,
) -> Dataset:
    """MQAR examples as a `datasets.Dataset` with int64 ``input_ids`` and ``labels`` of length seq_len.

    `spacing`: one spacing (`mqar_arrays`) or a list mixed row by row (`mqar_mixed_arrays`).
    """
    from datasets import Dataset, Features, Sequence, Value

    if num_examples < 1:
        raise ValueError(f"num_examples is {num_examples}; must be >= 1")
    spacings = [spacing] if isinstance(spacing, int) else list(spacing)
    inputs, labels = mqar_mixed_arrays(
        vocab_size, seq_len, num_kv_pairs, num_examples, seed, power_a, random_non_queries, spacings, stretch_pairs
    )
    column = Sequence(Value("int64"), length=seq_len)
    features = Features({"input_ids": column, "labels": column})
    return Dataset.from_dict({"input_ids": inputs, "labels": labels}, features=features)


def mqar_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of answers right: argmax of logits at t-1 against labels[t], over labels != -100."""
    predictions = logits[:, :-1].argmax(dim=-1)
    targets = labels[:, 1:].to(predictions.device)
    scored = targets != IGNORE_INDEX
    total = int(scored.sum())
    if total == 0:
        raise ValueError("mqar_accuracy: labels have no scored positions (all -100)")
    return float((predictions[scored] == targets[scored]).sum()) / total


def chance_recall(vocab_size: int) -> float:
    """Recall of a uniform guess among the value tokens ``[V/2, V)``."""
    return 1.0 / (vocab_size - vocab_size // 2)


def guess_recall(num_kv_pairs: int) -> float:
    """Recall of a uniform guess among the values present in the sequence: above it, keys are matched to values."""
    return 1.0 / num_kv_pairs


def mqar_pairs(input_ids: np.ndarray, labels: np.ndarray) -> list[list[tuple[int, int]]]:
    """Per row, ``(query position, key position)`` of every scored query.

    The query key sits right before each labelled answer; its pair is the first
    earlier occurrence of the bigram (key, answer). Works for any `spacing`; a filler
    bigram equal to a pair before the pair itself (odds about 1 / V^2 per position)
    would be taken for it.
    """
    import numpy as np

    input_ids, labels = np.asarray(input_ids), np.asarray(labels)
    rows = []
    for ids, row_labels in zip(input_ids, labels):
        found = []
        for answer in np.flatnonzero(row_labels != IGNORE_INDEX):
            query = answer - 1
            match = np.flatnonzero((ids[: query - 1] == ids[query]) & (ids[1:query] == row_labels[answer]))
            if len(match):
                found.append((int(query), int(match[0])))
        rows.append(found)
    return rows


def _distinct(rng: np.random.Generator, choices: np.ndarray, rows: int, size: int) -> np.ndarray:
    """`size` distinct draws from `choices` per row (uniform, without replacement)."""
    import numpy as np

    order = np.argsort(rng.random((rows, len(choices))), axis=1)[:, :size]
    return choices[order]


def _weighted_distinct(rng: np.random.Generator, probs: np.ndarray, rows: int, size: int) -> np.ndarray:
    """`size` distinct indices per row drawn without replacement with weights `probs`.

    Gumbel top-k: the top `size` of log p + Gumbel noise are distributed exactly as
    successive weighted draws without replacement.
    """
    import numpy as np

    gumbel = -np.log(-np.log(rng.random((rows, len(probs))) + 1e-300) + 1e-300)
    scores = np.log(probs) + gumbel
    return np.argsort(-scores, axis=1)[:, :size]
