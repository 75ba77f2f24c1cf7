"""Determinism: the seeds and the order of training batches.

The model is initialised under ``run.seed``; the data order is a permutation of the
training set per epoch drawn from its own generator seeded from ``(seed, epoch)``, so
the next batch is fully given by ``(epoch, position)``. Checkpoints store that
position (`bmojo_neuron.checkpoints.TrainerState`), which makes a resumed run
reproduce the uninterrupted one.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class DataOrder:
    """Micro-batches of indices: a fresh seeded permutation per epoch, the tail dropped.

    The state is ``(epoch, position)``: the micro-batches already taken from epoch
    `epoch`. Given the same seed and state it yields the same batches, which is what
    makes resume exact.
    """

    def __init__(self, size: int, batch_size: int, seed: int, epoch: int = 0, position: int = 0) -> None:
        if size < batch_size:
            raise ValueError(f"the training set has {size} sequences, fewer than train.batch_size={batch_size}")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.per_epoch = size // batch_size
        self.epoch, self.position = epoch, position
        self._perm = self._permutation(epoch)

    def _permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.size, generator=generator)

    def next(self) -> list[int]:
        if self.position >= self.per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
            self._perm = self._permutation(self.epoch)
        start = self.position * self.batch_size
        self.position += 1
        return self._perm[start : start + self.batch_size].tolist()


def position_after(epoch: int, position: int, per_epoch: int, micro_batches: int) -> tuple[int, int]:
    """`DataOrder`'s ``(epoch, position)`` after `micro_batches` more calls of ``next()``."""
    if micro_batches <= 0:
        return epoch, position
    if position >= per_epoch:  # next() first rolls over to the next epoch
        epoch, position = epoch + 1, 0
    total = position + micro_batches
    return epoch + (total - 1) // per_epoch, (total - 1) % per_epoch + 1
