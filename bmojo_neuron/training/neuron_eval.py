"""Held-out evaluation on the XLA device, outside the training step's graph.

Same numbers as `bmojo_neuron.training.evaluate.evaluate` (token-weighted mean
next-token loss, perplexity, MQAR recall) over the same batches, with two changes
for a compiled device: only whole batches are used (one static shape, one graph),
and the sums stay on the device until the end, so a whole evaluation reads the
host once. Each data-parallel rank scores its block of every global batch of
``train.batch_size`` sequences and the sums are added over the replicas.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from bmojo_neuron.training.evaluate import IGNORE_INDEX, LengthResult, mqar_eval_dataset, repack
from bmojo_neuron.training.neuron_runtime import NeuronRuntime


def _size(dataset: Any) -> int:
    return len(dataset["input_ids"]) if isinstance(dataset, dict) else len(dataset)


def _rows(dataset: Any, start: int, stop: int) -> dict[str, Tensor]:
    if isinstance(dataset, dict):  # `repack` output
        return {key: value[start:stop] for key, value in dataset.items()}
    return dataset[start:stop]


def whole_batches(dataset: Any, batch_size: int, max_batches: int | None) -> int:
    """How many whole batches of `batch_size` the evaluation uses (ValueError when not even one)."""
    n = _size(dataset)
    if n < batch_size:
        raise ValueError(f"the eval set has {n} sequences, fewer than one batch of train.batch_size={batch_size} "
                         "(the Neuron evaluation uses whole batches only: one static shape)")
    return min(n // batch_size, max_batches) if max_batches else n // batch_size


def _batch_sums(model: nn.Module, ids: Tensor, labels: Tensor, mqar: bool) -> Tensor:
    """``[summed nll, labelled tokens, right answers]`` of one batch, on the device."""
    out = model(ids, labels=labels)
    targets = labels[:, 1:]
    scored = targets != IGNORE_INDEX
    count = scored.sum().float()
    correct = ((out.logits[:, :-1].argmax(-1) == targets) & scored).sum().float() if mqar else count * 0
    return torch.stack([out.lm_loss.float() * count, count, correct])


@torch.no_grad()
def evaluate_on_device(model: nn.Module, dataset: Any, batch_size: int, runtime: NeuronRuntime,
                       max_batches: int | None = None, mqar: bool = False) -> dict[str, float]:
    """``{"loss", "perplexity", "tokens"[, "accuracy"]}`` over the first whole batches of `dataset`."""
    batches = whole_batches(dataset, batch_size, max_batches)
    local = batch_size // runtime.dp
    first = runtime.dp_rank * local
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, device=runtime.device)
    runtime.sync()  # materialise the zeros, so every batch below runs one and the same graph
    try:
        for j in range(batches):
            start = j * batch_size + first
            rows = _rows(dataset, start, start + local)
            ids, labels = rows["input_ids"].to(runtime.device), rows["labels"].to(runtime.device)
            sums = sums + _batch_sums(model, ids, labels, mqar)
            runtime.sync()  # one graph per batch, the same every batch
    finally:
        model.train(was_training)
    nll, tokens, correct = runtime.to_cpu(runtime.sum_over_dp(sums)).tolist()
    if tokens == 0:
        raise ValueError("evaluation dataset has no labelled tokens (all labels are -100)")
    loss = nll / tokens
    result = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(tokens)}
    if mqar:
        result["accuracy"] = correct / tokens
    return result


def length_eval_on_device(model: nn.Module, recipe: Any, eval_data: Any, multipliers: Sequence[int],
                          batch_size: int, runtime: NeuronRuntime, max_batches: int | None) -> list[LengthResult]:
    """`bmojo_neuron.training.evaluate.length_generalisation` on the device (one graph per length)."""
    mqar = recipe.data.kind == "mqar"
    base = len(eval_data[0]["input_ids"])
    rows = []
    for m in (int(m) for m in multipliers):
        if m < 1:
            raise ValueError(f"length multipliers must be >= 1, got {m}")
        data = eval_data if m == 1 else mqar_eval_dataset(recipe, base * m) if mqar else repack(eval_data, m)
        if data is None or _size(data) < batch_size:
            have = 0 if data is None else _size(data)
            rows.append(LengthResult(m, base * m, skipped=f"{have} eval sequences at this length, need a whole "
                                                          f"batch of {batch_size}"))
            continue
        result = evaluate_on_device(model, data, batch_size, runtime, max_batches, mqar)
        used = whole_batches(data, batch_size, max_batches) * batch_size
        rows.append(LengthResult(m, base * m, result["loss"], result["perplexity"], result.get("accuracy"), used))
    return rows
