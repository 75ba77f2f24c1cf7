"""AdamW with decay / no-decay parameter groups and a warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

# Mamba's SSM parameters keep their structured init: weight decay would pull the decay
# rates (A_log), skip weights (D) and time-step biases (dt_bias) towards zero.
NO_DECAY_NAMES = ("A_log", "D", "dt_bias")


def decays(name: str, param: nn.Parameter) -> bool:
    """True when `param` gets weight decay: matrices only, never norms, biases or SSM parameters."""
    return param.ndim >= 2 and name.rsplit(".", 1)[-1] not in NO_DECAY_NAMES


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups, ``decay`` and ``no_decay``; each has ``names`` for inspection.

    Tied weights (lm_head / embeddings) appear once: `named_parameters` deduplicates.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if decays(name, param) else no_decay).append((name, param))
    return [
        {"name": "decay", "params": [p for _, p in decay], "names": [n for n, _ in decay],
         "weight_decay": weight_decay},
        {"name": "no_decay", "params": [p for _, p in no_decay], "names": [n for n, _ in no_decay],
         "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: Iterable[float] = (0.9, 0.95),
    eps: float = 1e-8,
    device_type: str = "cpu",
) -> torch.optim.AdamW:
    """AdamW over `parameter_groups`.

    On CPU the plain for-loop implementation is used (``foreach=False, fused=False``):
    it is the one whose results we check bitwise across resume. CUDA gets the fused kernel.
    """
    if lr <= 0:
        raise ValueError(f"optim.lr must be > 0, got {lr}")
    if weight_decay < 0:
        raise ValueError(f"optim.weight_decay must be >= 0, got {weight_decay}")
    b1, b2 = (float(b) for b in betas)
    fast = device_type == "cuda"
    return torch.optim.AdamW(
        parameter_groups(model, weight_decay), lr=lr, betas=(b1, b2), eps=eps,
        foreach=False, fused=fast,
    )


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr for the update with 0-based index `step`.

    Linear warmup ``(step + 1) / warmup_steps`` for the first `warmup_steps` updates,
    then a half cosine from 1 at ``step == warmup_steps`` down to `min_lr_ratio` at
    ``step == total_steps`` (held there afterwards).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """`LambdaLR` applying `lr_factor`; call ``step()`` once per optimizer update."""
    if warmup_steps < 0 or total_steps <= 0:
        raise ValueError(f"need warmup_steps >= 0 and steps > 0, got {warmup_steps}, {total_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup_steps, total_steps, min_lr_ratio)
    )
