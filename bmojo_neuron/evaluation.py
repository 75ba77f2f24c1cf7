"""Held-out evaluation: perplexity, MQAR recall, and length generalisation.

Losses are summed over every labelled token and divided once, so the reported loss
is the token-weighted mean next-token cross-entropy and ``perplexity = exp(loss)``.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bmojo_neuron.data import build_eval_dataset
from bmojo_neuron.data.mqar import mqar_accuracy

IGNORE_INDEX = -100


def autocast(device: torch.device, precision: str):
    """bf16 autocast context for ``precision == "bf16"``, else a no-op."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision != "fp32":
        raise ValueError(f"train.precision must be 'fp32' or 'bf16', got {precision!r}")
    return nullcontext()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Any,
    batch_size: int,
    device: torch.device | str = "cpu",
    max_batches: int | None = None,
    precision: str = "fp32",
    mqar: bool = False,
    pipeline: Any = None,
) -> dict[str, float]:
    """Mean loss, perplexity and (``mqar=True``) recall accuracy over the first batches of `dataset`.

    `dataset` yields ``input_ids`` / ``labels`` tensors when sliced (a torch-format
    `datasets.Dataset` or a dict of tensors). ``max_batches=None`` uses all of it.
    Under pipeline parallelism `model` is this rank's stage and `pipeline` its
    `bmojo_neuron.parallel.pipeline.PipelineRunner`: the batches go through the
    pipeline (forward only), the last stage scores them and shares the totals.
    """
    device = torch.device(device)
    n = len(dataset["input_ids"]) if isinstance(dataset, dict) else len(dataset)
    if n == 0:
        raise ValueError("evaluation dataset is empty")
    starts = list(range(0, n, batch_size))[: max_batches or None]
    was_training = model.training
    model.eval()
    nll, tokens, correct = 0.0, 0, 0.0
    try:
        for start in starts:
            batch = _rows(dataset, start, start + batch_size)
            input_ids = batch["input_ids"].to(device)
            labels = batch["labels"].to(device)
            with autocast(device, precision):
                logits = pipeline.logits(input_ids) if pipeline is not None else model(input_ids, use_cache=False).logits
            if logits is None:  # a pipeline stage before the last: its part is done
                continue
            targets = labels[:, 1:]
            count = int((targets != IGNORE_INDEX).sum())
            nll += F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                ignore_index=IGNORE_INDEX, reduction="sum",
            ).item()
            tokens += count
            if mqar and count:
                correct += mqar_accuracy(logits, labels) * count
    finally:
        model.train(was_training)
    if pipeline is not None:
        nll, tokens, correct = pipeline.share([nll, tokens, correct])
        tokens = int(tokens)
    if tokens == 0:
        raise ValueError("evaluation dataset has no labelled tokens (all labels are -100)")
    loss = nll / tokens
    result = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": tokens}
    if mqar:
        result["accuracy"] = correct / tokens
    return result


def _rows(dataset: Any, start: int, stop: int) -> dict[str, torch.Tensor]:
    if isinstance(dataset, dict):
        return {key: value[start:stop] for key, value in dataset.items()}
    return dataset[start:stop]


# ---------------------------------------------------------------- length generalisation


@dataclass
class LengthResult:
    """One row of the length-generalisation table (``skipped`` says why a length has no numbers)."""

    multiplier: int
    seq_len: int
    loss: float | None = None
    perplexity: float | None = None
    accuracy: float | None = None
    sequences: int = 0
    skipped: str | None = None


def repack(dataset: Any, multiplier: int) -> dict[str, torch.Tensor] | None:
    """Join each run of `multiplier` consecutive eval blocks into one longer block.

    Text eval data is a token stream cut into fixed blocks, so consecutive blocks are
    contiguous text. Returns None when fewer than `multiplier` blocks exist.
    """
    data = dataset[:]
    ids, labels = data["input_ids"], data["labels"]
    rows = ids.shape[0] // multiplier
    if rows == 0:
        return None
    keep = rows * multiplier
    return {
        "input_ids": ids[:keep].reshape(rows, -1),
        "labels": labels[:keep].reshape(rows, -1),
    }


def length_generalisation(
    model: nn.Module,
    recipe: Any,
    eval_dataset: Any,
    multipliers: Sequence[int],
    batch_size: int,
    device: torch.device | str = "cpu",
    max_batches: int | None = None,
    precision: str = "fp32",
    pipeline: Any = None,
) -> list[LengthResult]:
    """Evaluate at ``m x`` the training length for each `m` in `multipliers`.

    MQAR: fresh eval data generated at the longer length with the recipe's settings
    (same eval seed). Text: the eval blocks re-packed (`repack`); a length without
    enough eval tokens is skipped with a note. `pipeline`: as in `evaluate` (each length
    gets its own static-shape schedule).
    """
    mqar = recipe.data.kind == "mqar"
    base_len = len(eval_dataset[0]["input_ids"])
    rows = []
    for m in multipliers:
        m = int(m)
        if m < 1:
            raise ValueError(f"length multipliers must be >= 1, got {m}")
        seq_len = base_len * m
        if m == 1:
            data = eval_dataset
        elif mqar:
            data = mqar_eval_dataset(recipe, seq_len)
        else:
            data = repack(eval_dataset, m)
            if data is None:
                rows.append(LengthResult(m, seq_len, skipped=f"only {len(eval_dataset)} eval blocks, need {m}"))
                continue
        n = len(data["input_ids"]) if isinstance(data, dict) else len(data)
        result = evaluate(model, data, batch_size, device, max_batches, precision, mqar, pipeline)
        used = min(n, max_batches * batch_size) if max_batches else n
        rows.append(LengthResult(m, seq_len, result["loss"], result["perplexity"], result.get("accuracy"), used))
    return rows


def mqar_eval_dataset(recipe: Any, seq_len: int) -> Any:
    """The recipe's MQAR eval set regenerated at `seq_len`: same kv pairs, vocabulary and eval seed."""
    base = recipe.data.seq_len
    if seq_len % base:
        raise ValueError(f"MQAR eval length {seq_len} is not a multiple of data.seq_len={base}")
    return build_eval_dataset(recipe, seq_len // base)


def format_length_table(rows: Sequence[LengthResult], title: str = "") -> str:
    """Fixed-width text table of `length_generalisation` rows."""
    has_acc = any(r.accuracy is not None for r in rows)
    header = f"{'length':>8} {'x':>3} {'loss':>8} {'ppl':>10}" + (f" {'recall':>7}" if has_acc else "")
    lines = ([title] if title else []) + [header, "-" * len(header)]
    for r in rows:
        if r.skipped:
            lines.append(f"{r.seq_len:>8} {r.multiplier:>3}  skipped: {r.skipped}")
            continue
        line = f"{r.seq_len:>8} {r.multiplier:>3} {r.loss:>8.4f} {r.perplexity:>10.3f}"
        if has_acc:
            line += f" {r.accuracy:>7.3f}" if r.accuracy is not None else f" {'-':>7}"
        lines.append(line)
    return "\n".join(lines)


def plot_length(rows: Sequence[LengthResult], path: str | Path, title: str = "") -> Path | None:
    """PNG of loss (and recall) against evaluation length; None when no length has numbers."""
    done = [r for r in rows if not r.skipped]
    if not done:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_acc = any(r.accuracy is not None for r in done)
    fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(10 if has_acc else 5, 3.6), squeeze=False)
    x = [r.seq_len for r in done]
    axes[0][0].plot(x, [r.loss for r in done], marker="o")
    axes[0][0].set(xscale="log", xlabel="evaluation length (tokens)", ylabel="eval loss", title="loss")
    axes[0][0].set_xticks(x, [str(v) for v in x])
    if has_acc:
        axes[0][1].plot(x, [r.accuracy for r in done], marker="o", color="tab:green")
        axes[0][1].set(xscale="log", xlabel="evaluation length (tokens)", ylabel="MQAR recall",
                       title="recall", ylim=(0, 1.02))
        axes[0][1].set_xticks(x, [str(v) for v in x])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
