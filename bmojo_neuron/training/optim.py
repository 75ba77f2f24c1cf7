"""AdamW with decay / no-decay parameter groups and a warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math
import re
from typing import Any, Iterable, Mapping

import torch
from torch import nn

# Mamba's SSM parameters keep their structured init: weight decay would pull the decay
# rates (A_log), skip weights (D) and time-step biases (dt_bias) towards zero.
NO_DECAY_NAMES = ("A_log", "D", "dt_bias")


def decays(name: str, param: nn.Parameter) -> bool:
    """True when `param` gets weight decay: matrices only, never norms, biases or SSM parameters."""
    return param.ndim >= 2 and name.rsplit(".", 1)[-1] not in NO_DECAY_NAMES


def multiplier_pattern(name: str, lr_multipliers: Mapping[str, float]) -> str | None:
    """The one pattern of `lr_multipliers` that `name` matches (``re.search``), or None.

    A parameter matching two patterns is an error rather than a silent precedence rule:
    the recipe must say which rate it learns at.
    """
    hits = [pattern for pattern in lr_multipliers if re.search(pattern, name)]
    if len(hits) > 1:
        raise ValueError(f"optim.lr_multipliers: parameter {name} matches more than one pattern: {', '.join(hits)}")
    return hits[0] if hits else None


def parameter_groups(
    model: nn.Module, weight_decay: float, lr: float | None = None,
    lr_multipliers: Mapping[str, float] | None = None,
) -> list[dict]:
    """AdamW groups ``decay`` and ``no_decay``; each has ``names`` for inspection.

    With `lr_multipliers` (regular expression searched in the parameter name -> factor
    of `lr`), the parameters a pattern matches form their own groups,
    ``decay:<pattern>`` / ``no_decay:<pattern>`` (only when non-empty, with the pattern
    in ``lr_pattern``; None in the plain groups), holding ``lr = lr * factor``; the two
    plain groups keep the optimiser's `lr`. The schedule scales every group alike (`LambdaLR` multiplies each group's own initial lr), so the
    ratios hold throughout. A pattern matching no parameter is not an error: one suite
    recipe trains models with different parts.

    Tied weights (lm_head / embeddings) appear once: `named_parameters` deduplicates.
    """
    lr_multipliers = dict(lr_multipliers or {})
    if lr_multipliers and lr is None:
        raise ValueError("parameter_groups: lr_multipliers need the base lr")
    buckets: dict[tuple[bool, str | None], list[tuple[str, nn.Parameter]]] = {(True, None): [], (False, None): []}
    for name, param in model.named_parameters():
        if param.requires_grad:
            key = (decays(name, param), multiplier_pattern(name, lr_multipliers))
            buckets.setdefault(key, []).append((name, param))
    groups = []
    for decay in (True, False):
        for pattern in (None, *lr_multipliers):
            members = buckets.get((decay, pattern))  # a pattern's bucket exists only once it has a member
            if members is None:
                continue
            label = "decay" if decay else "no_decay"
            group = {"name": label if pattern is None else f"{label}:{pattern}", "lr_pattern": pattern,
                     "params": [p for _, p in members], "names": [n for n, _ in members],
                     "weight_decay": weight_decay if decay else 0.0}
            if pattern is not None:
                group["lr"] = lr * float(lr_multipliers[pattern])
            groups.append(group)
    return groups


def describe_lr_multipliers(optimizer: Any) -> str:
    """One line naming each group an lr multiplier made, its tensor count and rate (or that none matched).

    A pattern that matches nothing is allowed, so the run says what each one caught. The
    groups are found by their ``lr_pattern`` entry; an optimizer wrapper that hides its
    groups (no ``param_groups``) reads as no match."""
    caught = [f"{g['name']} {len(g['params'])} tensors lr {g['lr']:.3g}"
              for g in getattr(optimizer, "param_groups", []) if g.get("lr_pattern") is not None]
    return "lr multipliers: " + ("; ".join(caught) if caught else "no parameter matched")


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: Iterable[float] = (0.9, 0.95),
    eps: float = 1e-8,
    device_type: str = "cpu",
    lr_multipliers: Mapping[str, float] | None = None,
) -> torch.optim.AdamW:
    """AdamW over `parameter_groups` (with `lr_multipliers`, some groups learn at a multiple of `lr`).

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
        parameter_groups(model, weight_decay, lr, lr_multipliers), lr=lr, betas=(b1, b2), eps=eps,
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
