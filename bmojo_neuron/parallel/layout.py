"""How the ranks of a job are split into data-, pipeline- and tensor-parallel groups.

``world = dp × pp × tp`` with tensor parallelism fastest (Megatron's and NxD's
order): ranks ``0..tp-1`` form the first tensor-parallel group, so the ranks that
exchange activations every layer sit next to each other (same node, same chip).
A global rank is ``(dp_rank * pp + pp_rank) * tp + tp_rank``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist


@dataclass(frozen=True)
class ParallelLayout:
    """The coordinates of one rank in a ``dp × pp × tp`` grid (no process groups: pure arithmetic)."""

    tp: int
    pp: int
    dp: int
    rank: int = 0

    def __post_init__(self) -> None:
        for key in ("tp", "pp", "dp"):
            if getattr(self, key) < 1:
                raise ValueError(f"parallel.{key} must be >= 1, got {getattr(self, key)}")
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} is outside a world of {self.world} ranks")

    @classmethod
    def from_world(cls, world: int, tp: int, pp: int, rank: int = 0) -> ParallelLayout:
        """The layout for `world` ranks; dp is what tp × pp leave (an error if they do not divide it)."""
        if tp < 1 or pp < 1:
            raise ValueError(f"parallel.tp and parallel.pp must be >= 1, got tp={tp}, pp={pp}")
        if world % (tp * pp):
            raise ValueError(f"the world size {world} (torchrun --nproc-per-node × nodes) is not divisible by "
                             f"parallel.tp × parallel.pp = {tp} × {pp}")
        return cls(tp, pp, world // (tp * pp), rank)

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def pp_rank(self) -> int:
        return (self.rank // self.tp) % self.pp

    @property
    def dp_rank(self) -> int:
        return self.rank // (self.tp * self.pp)

    def rank_of(self, dp_rank: int, pp_rank: int, tp_rank: int) -> int:
        return (dp_rank * self.pp + pp_rank) * self.tp + tp_rank

    def tp_groups(self) -> list[list[int]]:
        return [[self.rank_of(d, p, t) for t in range(self.tp)] for d in range(self.dp) for p in range(self.pp)]

    def pp_groups(self) -> list[list[int]]:
        return [[self.rank_of(d, p, t) for p in range(self.pp)] for d in range(self.dp) for t in range(self.tp)]

    def dp_groups(self) -> list[list[int]]:
        return [[self.rank_of(d, p, t) for d in range(self.dp)] for p in range(self.pp) for t in range(self.tp)]


@dataclass
class ProcessGroups:
    """This rank's tensor-, pipeline- and data-parallel process groups (and their rank lists)."""

    layout: ParallelLayout
    tp: Any = None
    pp: Any = None
    dp: Any = None
    ranks: dict[str, list[int]] = field(default_factory=dict)

    @classmethod
    def create(cls, layout: ParallelLayout) -> ProcessGroups:
        """Create every group (each rank must call `new_group` for all of them, in the same order)."""
        if not dist.is_initialized():
            raise RuntimeError("ProcessGroups.create needs torch.distributed to be initialised first")
        if dist.get_world_size() != layout.world:
            raise ValueError(f"the layout has {layout.world} ranks but the process group has {dist.get_world_size()}")
        groups = cls(layout)
        for kind, lists in (("tp", layout.tp_groups()), ("pp", layout.pp_groups()), ("dp", layout.dp_groups())):
            for ranks in lists:
                group = dist.new_group(ranks)
                if layout.rank in ranks:
                    setattr(groups, kind, group)
                    groups.ranks[kind] = ranks
        return groups


def torchrun_nodes() -> int:
    """How many nodes a torchrun job spans: ``WORLD_SIZE`` over ``LOCAL_WORLD_SIZE`` (the ranks of this node),
    rounded up; 1 without torchrun. torch's elastic agent sets both for every worker
    (`torch/distributed/elastic/agent/server/local_elastic_agent.py` lines 420-421, torch 2.13)."""
    try:
        world, local = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_WORLD_SIZE", 0))
    except ValueError as error:
        raise ValueError(f"WORLD_SIZE / LOCAL_WORLD_SIZE must be integers: {error}") from None
    return -(-world // local) if local > 0 else 1


def torchrun_env() -> tuple[int, int, int]:
    """``(rank, local_rank, world_size)`` from the variables torchrun sets (``(0, 0, 1)`` without it)."""
    try:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError as error:
        raise ValueError(f"RANK / LOCAL_RANK / WORLD_SIZE must be integers: {error}") from None
