"""Training batches for the Neuron loop: one fixed-shape host batch per optimizer step.

The order is the CPU trainer's `DataOrder` (`bmojo_neuron.training.data_order`) (a seeded permutation per epoch, the
incomplete tail dropped), so a Neuron run sees the very sequences a one-process
run sees: micro-batch ``k`` is ``order.next()``, and data-parallel rank ``d`` takes
block ``d`` of it (``train.batch_size`` is the global micro-batch). The sampler
yields, per optimizer step, the rows of all ``train.grad_accum`` micro-batches of
this rank together, so every step has the same ``(grad_accum × batch/dp, L)``
shape and one host-to-device transfer; the loop slices the micro-batches on device.

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


class Rows(Dataset):
    """``dataset[list of rows]`` as one dict of stacked tensors (one batched read, no per-row collation)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, rows: list[int]) -> dict[str, torch.Tensor]:
        batch = self.dataset[rows]
        return {"input_ids": torch.as_tensor(batch["input_ids"]), "labels": torch.as_tensor(batch["labels"])}


def step_loader(train_data: Any, sampler: StepRows) -> DataLoader:
    """A host DataLoader yielding one step's rows per item (``batch_size=None``: the sampler batches)."""
    return DataLoader(Rows(train_data), sampler=sampler, batch_size=None, num_workers=0)


def micro_batches(batch: dict[str, torch.Tensor], grad_accum: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Split a step batch into its `grad_accum` ``(input_ids, labels)`` micro-batches (static slices)."""
    rows = batch["input_ids"].shape[0] // grad_accum
    return [(batch["input_ids"][i * rows:(i + 1) * rows], batch["labels"][i * rows:(i + 1) * rows])
            for i in range(grad_accum)]
