"""Training batches for the Neuron loop: fixed-shape host batches, one per micro-batch (per step under pp).

The order is the CPU trainer's `DataOrder` (`bmojo_neuron.training.data_order`) (a seeded permutation per epoch, the
incomplete tail dropped), so a Neuron run sees the very sequences a one-process
run sees: micro-batch ``k`` is ``order.next()``, and data-parallel rank ``d`` takes
block ``d`` of it (``train.batch_size`` is the global micro-batch). `MicroBatchRows`
yields this rank's rows of one micro-batch per item (``(batch/dp, L)`` every time:
each is a device input of its own, so every micro-batch after a step's first runs the
same graph); `StepRows` yields the rows of all ``train.grad_accum`` micro-batches of a
step together, for NxD's pipeline, which splits them itself.

`MpDeviceLoader` uploads batches from a background thread (it runs ahead of the
step), so the position a checkpoint stores is computed from the step count with
`data_order.position_after`, not read from the sampler.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from bmojo_neuron.training.data_order import DataOrder


class StepRows(Sampler[list[int]]):
    """Per optimizer step: this data rank's row indices of the step's `grad_accum` micro-batches."""

    def __init__(self, size: int, batch_size: int, seed: int, epoch: int, position: int, grad_accum: int,
                 dp_rank: int, dp: int, steps: int) -> None:
        if batch_size % dp:
            raise ValueError(f"train.batch_size ({batch_size}) is the global micro-batch and must be divisible by "
                             f"the data-parallel degree {dp}")
        self.order_args = (size, batch_size, seed, epoch, position)
        DataOrder(*self.order_args)  # fail now (not in the loader thread) on a set smaller than one batch
        self.grad_accum, self.dp_rank, self.local, self.steps = grad_accum, dp_rank, batch_size // dp, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        order = DataOrder(*self.order_args)
        start = self.dp_rank * self.local
        for _ in range(self.steps):
            rows: list[int] = []
            for _ in range(self.grad_accum):
                rows += order.next()[start:start + self.local]
            yield rows


class MicroBatchRows(Sampler[list[int]]):
    """Per micro-batch: this data rank's row indices (`micro_batches` of them: steps × ``train.grad_accum``)."""

    def __init__(self, size: int, batch_size: int, seed: int, epoch: int, position: int, dp_rank: int, dp: int,
                 micro_batches: int) -> None:
        if batch_size % dp:
            raise ValueError(f"train.batch_size ({batch_size}) is the global micro-batch and must be divisible by "
                             f"the data-parallel degree {dp}")
        self.order_args = (size, batch_size, seed, epoch, position)
        DataOrder(*self.order_args)  # fail now (not in the loader thread) on a set smaller than one batch
        self.dp_rank, self.local, self.micro_batches = dp_rank, batch_size // dp, micro_batches

    def __len__(self) -> int:
        return self.micro_batches

    def __iter__(self) -> Iterator[list[int]]:
        order = DataOrder(*self.order_args)
        start = self.dp_rank * self.local
        for _ in range(self.micro_batches):
            yield order.next()[start:start + self.local]


class Rows(Dataset):
    """``dataset[list of rows]`` as one dict of stacked tensors (one batched read, no per-row collation)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, rows: list[int]) -> dict[str, torch.Tensor]:
        batch = self.dataset[rows]
        return {"input_ids": torch.as_tensor(batch["input_ids"]), "labels": torch.as_tensor(batch["labels"])}


def step_loader(train_data: Any, sampler: Sampler[list[int]]) -> DataLoader:
    """A host DataLoader yielding the rows of one sampler item at a time (``batch_size=None``: the sampler
    batches)."""
    return DataLoader(Rows(train_data), sampler=sampler, batch_size=None, num_workers=0)


def steps_of(micro_batches: Iterator[dict[str, torch.Tensor]], grad_accum: int) -> Iterator[Iterator[dict]]:
    """Per step, an iterator over its `grad_accum` micro-batches, each fetched only when the step asks for it
    (from ``MpDeviceLoader``, whose fetch cuts the graph of the micro-batch before)."""
    while True:
        yield (next(micro_batches) for _ in range(grad_accum))
