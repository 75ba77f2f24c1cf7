"""Held-out evaluation on the XLA device, outside the training step's graph.

Same numbers as `bmojo_neuron.evaluation.evaluate` (token-weighted mean
next-token loss, perplexity, MQAR recall) over the same batches, with two changes
for a compiled device: only whole batches are used (one static shape, one graph),
and the sums stay on the device until the end, so a whole evaluation reads the
host once. Each data-parallel rank scores its block of every global batch of
``train.batch_size`` sequences and the sums are added over the replicas.

Under pipeline parallelism (`evaluate_pipeline`) the batches go through NxD's
``run_eval`` and the last stage's per-micro-batch stats (`PipelineStats`) are summed,
then added over the stages. NxD fixes the shapes passed between stages at its first
step, so evaluation feeds ``run_eval`` exactly the training step's shape: the host rows
of ``train.grad_accum`` global batches at a time, a short last group padded with
unlabelled rows (they add nothing to the sums). Other sequence lengths cannot go
through that pipeline: length generalisation beyond ×1 is skipped there.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from bmojo_neuron.evaluation import IGNORE_INDEX, LengthResult, mqar_eval_dataset, repack
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
    out = model(ids, labels=labels, use_cache=False)
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
    return _read_summary(runtime.sum_over_dp(sums), runtime, mqar)


def _read_summary(sums: Tensor, runtime: NeuronRuntime, mqar: bool) -> dict[str, float]:
    """`_summary` of the device sums (one host read), or, in a graph-extraction run, their graph cut and
    `EXTRACTION_RESULT` (the values there are zeros from empty stubs: nothing to read)."""
    if runtime.extracting:
        runtime.sync()
        return extraction_result(mqar)
    return _summary(runtime.to_cpu(sums).tolist(), mqar)


def extraction_result(mqar: bool) -> dict[str, float]:
    """What an evaluation reports in a graph-extraction run: no numbers."""
    result = {"loss": math.nan, "perplexity": math.nan, "tokens": 0}
    if mqar:
        result["accuracy"] = math.nan
    return result


def _summary(sums: list[float], mqar: bool) -> dict[str, float]:
    """``{"loss", "perplexity", "tokens"[, "accuracy"]}`` from ``[summed nll, labelled tokens, right answers]``."""
    nll, tokens, correct = sums
    if tokens == 0:
        raise ValueError("evaluation dataset has no labelled tokens (all labels are -100)")
    loss = nll / tokens
    result = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(tokens)}
    if mqar:
        result["accuracy"] = correct / tokens
    return result


def pipeline_eval_inputs(dataset: Any, batch_size: int, batches: int, group: int, dp: int,
                         dp_rank: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Host ``(input_ids, labels)`` of `group` global batches at a time: this data rank's block of each,
    in order; past the last batch the block of the last one is repeated with every label -100."""
    local = batch_size // dp
    for first in range(0, batches, group):
        ids, labels = [], []
        for j in range(first, first + group):
            start = min(j, batches - 1) * batch_size + dp_rank * local
            rows = _rows(dataset, start, start + local)
            ids.append(torch.as_tensor(rows["input_ids"]))
            block = torch.as_tensor(rows["labels"])
            labels.append(block if j < batches else torch.full_like(block, IGNORE_INDEX))
        yield torch.cat(ids), torch.cat(labels)


@torch.no_grad()
def evaluate_pipeline(model: Any, stats: Any, dataset: Any, batch_size: int, group: int, runtime: NeuronRuntime,
                      max_batches: int | None = None, mqar: bool = False) -> dict[str, float]:
    """`evaluate_on_device` through NxD's pipeline (``model.run_eval``); `stats` is the `PipelineStats` of
    `model`, `group` the number of global batches per ``run_eval`` (``train.grad_accum``)."""
    batches = whole_batches(dataset, batch_size, max_batches)
    sums = torch.zeros(3, device=runtime.device)
    runtime.sync()
    for ids, labels in pipeline_eval_inputs(dataset, batch_size, batches, group, runtime.dp, runtime.dp_rank):
        model.run_eval(input_ids=ids, labels=labels)  # NxD cuts its own graphs (mark_step around every task)
        sums = sums + stats.eval_sums(runtime.device)
    totals = runtime.sum_over_pp(runtime.sum_over_dp(sums))  # only the last stage holds numbers
    return _read_summary(totals, runtime, mqar)


PIPELINE_LENGTH_SKIP = ("not available under parallel.pp > 1 on Trainium (NxD's pipeline keeps the first "
                        "step's shapes); run `bmojo-neuron eval` on the exported model")


def length_eval_on_device(model: nn.Module, recipe: Any, eval_data: Any, multipliers: Sequence[int],
                          batch_size: int, runtime: NeuronRuntime, max_batches: int | None,
                          pipeline_stats: Any = None) -> list[LengthResult]:
    """`bmojo_neuron.evaluation.length_generalisation` on the device (one graph per length).

    With `pipeline_stats` (pp > 1) the model is NxD's pipeline: ×1 is evaluated through
    it (`evaluate_pipeline`), longer lengths are skipped (`PIPELINE_LENGTH_SKIP`).
    """
    mqar = recipe.data.kind == "mqar"
    base = len(eval_data[0]["input_ids"])
    rows = []
    for m in (int(m) for m in multipliers):
        if m < 1:
            raise ValueError(f"length multipliers must be >= 1, got {m}")
        if pipeline_stats is not None:
            rows.append(LengthResult(m, base * m, skipped=PIPELINE_LENGTH_SKIP) if m != 1 else
                        _pipeline_row(model, pipeline_stats, recipe, eval_data, batch_size, runtime, max_batches))
            continue
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


def _pipeline_row(model: Any, stats: Any, recipe: Any, eval_data: Any, batch_size: int, runtime: NeuronRuntime,
                  max_batches: int | None) -> LengthResult:
    """The ×1 row of the length table through NxD's pipeline."""
    result = evaluate_pipeline(model, stats, eval_data, batch_size, recipe.train.grad_accum, runtime, max_batches,
                               recipe.data.kind == "mqar")
    used = whole_batches(eval_data, batch_size, max_batches) * batch_size
    return LengthResult(1, len(eval_data[0]["input_ids"]), result["loss"], result["perplexity"],
                        result.get("accuracy"), used)
