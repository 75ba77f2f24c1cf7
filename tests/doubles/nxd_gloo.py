"""NxD 0.17's tensor-parallel modules with their collectives on torch.distributed (tp = the gloo world).

It lets a gloo run check `NxDTensorParallelFactory`'s wiring numerically, with NxD's
behaviour at the SDK 2.28 release (``aws-neuron/neuronx-distributed`` tag ``v2.28.0``,
0.17.0) where a wrong call gives wrong numbers or dtypes: `doubles.nxd_layers` over the
`GlooWorld` group (the embedding's dtype cast at tp > 1, sequence dimensions defaulting
to 0, NxD's refusals, the loss shifting its input in place, row-parallel reductions in
fp32). ``grads.allreduce_sequence_parallel_gradients(optimizer)`` sums over the
tensor-parallel group the gradients of parameters marked ``sequence_parallel_enabled``.

`modules()` (after the process group exists) maps NxD's module names to the doubles;
`BUILT` records every layer built as ``(kind, args, non-default keyword arguments)``.
"""

from __future__ import annotations

import types

from . import nxd_layers
from .env import fake_module

BUILT: list[tuple[str, tuple, dict]] = []
_MODULES: dict[str, types.ModuleType] = {}


def modules() -> dict[str, types.ModuleType]:
    """NxD's parallel_layers modules over the gloo world (built on first use, once the group exists)."""
    if not _MODULES:
        _MODULES.update(nxd_layers.make(nxd_layers.GlooWorld(), BUILT, fake_module))
    return _MODULES
