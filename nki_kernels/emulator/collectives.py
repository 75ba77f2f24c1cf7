"""`nki.collectives` names, so kernels that mention them import; none of them runs.

The 0.2.0 stub (`nki/api/nki/collectives/__init__.py`) defines `ReplicaGroup` and the
collective functions below. A Trn1 kernel is one program on one NeuronCore (`launch`), so the
emulator has no other rank to exchange data with: every function raises `NKIRuleError` "... is
in NKI 0.2.0 but not emulated" when a kernel reaches it, as the unimplemented `nisa`
instructions do. `ReplicaGroup` keeps the groups of ranks it is given (nki-library's tests build
it as `ReplicaGroup([list(range(n))])`, `test/.../collectives/test_collectives.py` line 325).
"""

from __future__ import annotations

from typing import Any

from . import core
from .language import NKIObject


class ReplicaGroup(NKIObject):
    """A group of ranks taking part in a collective (stub line 10); held, never used here."""

    def __init__(self, groups: Any = None) -> None:
        self.groups = groups


FUNCTIONS = (  # the stub's functions, in its order
    "all_reduce", "all_gather", "reduce_scatter", "all_to_all", "collective_permute",
    "collective_permute_implicit", "collective_permute_implicit_reduce", "rank_id",
    "collective_permute_implicit_current_processing_rank_id",
)
for _name in FUNCTIONS:
    globals()[_name] = core.not_emulated(f"nki.collectives.{_name}")

__all__ = ["ReplicaGroup", *FUNCTIONS]
