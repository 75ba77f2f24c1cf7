"""Weights packed for the eager decode step, checked against their parameters once per decode state.

At one token per step on a CPU, a projection's cost is mostly its dispatch, not its
arithmetic, so projections that read the same input run as one product over their
weights concatenated. The parameters keep their own layout (checkpoints and
tensor-parallel sharding rely on it); the concatenation is a derived copy kept on the
module, outside its state dict, and used only by the decode step.

A pack is keyed on the storage and version counter of every source tensor: an in-place
update (an optimizer step, `load_state_dict`, ``copy_`` under ``no_grad``) or a new
tensor (`Module.to`, a replaced parameter) rebuilds it. Reading those keys costs as much
as the dispatch a pack saves, so they are read once per decode state (a new cache, a
copy of one), not per token: weights changed in the middle of decoding with one cache,
or written through ``.data`` (which bypasses the version counter), are not seen.

Packs apply only where they give what the modules give, and only eagerly (a compiled step
fuses the products itself, and the keys above are not traceable): without autograd (a copy carries
no gradient back to the parameters) and for plain `nn.Linear` projections (a sharded or
wrapped projection computes more than its weight product); `build` returns None otherwise.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

__all__ = ["linear_weights", "packed", "plain_linears"]

T = TypeVar("T")


def plain_linears(*modules: nn.Module) -> bool:
    """True when every module is exactly `nn.Linear` (no subclass, wrapper or sharded layer)."""
    return all(type(m) is nn.Linear for m in modules)


class _Entry:
    __slots__ = ("key", "value", "state")

    def __init__(self, key: tuple, value: Any, state: Callable[[], Any]) -> None:
        self.key, self.value, self.state = key, value, state

    def __reduce__(self) -> tuple:
        """Pickled (`torch.save` of a whole module) or copied as an entry that matches no state and no key: the
        copy packs its own weights on its first decoded token (a weak reference cannot be pickled)."""
        return _Entry, ((), None, _no_state)


def _no_state() -> None:
    return None


def packed(owner: nn.Module, name: str, state: Any, sources: Callable[[], Sequence[Tensor | None]],
           build: Callable[[], T | None]) -> T | None:
    """`build()` (run without autograd), cached on `owner` under `name`; None where a pack does not apply.

    `state` is the decode state the step advances: while it is the one of the last call the
    pack is used as it is; for a new one, `sources()` are checked and the pack rebuilt if
    any changed. Without autograd and outside `torch.compile` only: otherwise None.
    """
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return None
    entry = owner.__dict__.get(name)
    if entry is not None and entry.state() is state:
        return entry.value
    key = tuple(None if t is None else (t.data_ptr(), t._version, t.dtype, t.device) for t in sources())
    if entry is None or entry.key != key:
        with torch.no_grad():
            entry = _Entry(key, build(), weakref.ref(state))
        owner.__dict__[name] = entry
    else:
        entry.state = weakref.ref(state)
    return entry.value


def linear_weights(*modules: nn.Linear) -> tuple[Tensor, Tensor | None]:
    """One weight (sum of out_features, in_features) and bias for linears that read the same input.

    Without biases the bias is None; if only some have one, the others get zeros.
    """
    weight = torch.cat([m.weight for m in modules])
    if all(m.bias is None for m in modules):
        return weight, None
    bias = torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(m.out_features) for m in modules])
    return weight, bias
