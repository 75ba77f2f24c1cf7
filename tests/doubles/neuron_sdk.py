"""The Neuron SDK on a machine without Neuron: `install` puts the torch-xla and NxD doubles in ``sys.modules``.

Under the real import names (``torch_xla.core.xla_model``,
``torch_xla.distributed.parallel_loader``, ``neuronx_distributed.trainer``,
``...parallel_layers.parallel_state`` ...), so `bmojo_neuron.neuron.import_neuron_module`
finds them as it would find the SDK; ``torch_neuronx``, ``neuronxcc`` and ``nki``
import too. What the doubles do: `doubles.xla`, `doubles.nxd_runtime`, `doubles.nxd_pp`.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Callable, Iterator

import pytest
import torch
import torch.distributed as dist

from .env import PACKAGE_ROOT, Env, XlaLog, bmojo_caller, fake_module
from .nxd_runtime import nxd_modules
from .xla import host_reads_in_steps, xla_modules
from .xla_host import capturable_on_the_device, drop_left_over_modes, follow_factories, host_load

__all__ = ["host_reads_in_steps", "install"]


def install(monkeypatch: Any) -> XlaLog:
    """Put every double into ``sys.modules`` (undone with `monkeypatch`); returns their shared log.

    ``transformers.utils.fx`` is hidden, as in transformers 5 (NxD 0.17 imports it; see
    `bmojo_neuron.nxd_compat`), and whatever stands in for it is removed afterwards.
    During a Neuron run (NxD's parallel state up) what ``torch.load`` reads, and what our code's factory
    calls make without ``device=``, are host tensors (`xla_host.host_load`, `xla_host.follow_factories`), and
    AdamW's ``capturable`` path takes the double's device (`xla_host.capturable_on_the_device`).
    """
    import transformers.utils

    drop_left_over_modes()
    if "PJRT_DEVICE" not in os.environ:  # what ``import torch_xla`` does on a Trn1 host (runtime.py 57-69,
        monkeypatch.setenv("PJRT_DEVICE", "NEURON")  # ``_maybe_select_default_device``: libneuronpjrt found)
    env = Env(XlaLog())
    modules = {**xla_modules(env), **nxd_modules(env)}
    for name in ("torch_neuronx", "neuronxcc", "nki"):  # present and importable: the SDK "is installed"
        modules[name] = fake_module(name, __version__="double")
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setitem(sys.modules, "transformers.utils.fx", None)  # None: "not importable"
    monkeypatch.setattr(transformers.utils, "fx", None, raising=False)
    for name in DIST_COLLECTIVES:
        monkeypatch.setattr(dist, name, _recorded(getattr(dist, name), name, env.log))
    monkeypatch.setattr(torch, "load", host_load(torch.load, lambda: bool(env.grid)))
    follow_factories(monkeypatch, lambda: bool(env.grid))
    capturable_on_the_device(monkeypatch, lambda: bool(env.grid))
    env.log.env = env
    return env.log


# torch.distributed's collectives. On the "xla" process group (torch-xla 2.9
# torch_xla/distributed/xla_backend.py) ``barrier`` returns at once without meeting anyone (lines 230-231) and
# the others run XLA collectives on XLA tensors; the double's group is gloo, where they would work on the host.
# Our Neuron code meets through ``xm.rendezvous`` and reduces through ``xm`` / NxD: a call made by bmojo_neuron
# is recorded in ``XlaLog.dist_calls`` (the doubles' own gloo traffic is not).
DIST_COLLECTIVES = ("barrier", "monitored_barrier", "all_reduce", "all_gather", "all_gather_into_tensor",
                    "all_gather_object", "broadcast", "broadcast_object_list", "reduce", "reduce_scatter",
                    "reduce_scatter_tensor", "gather", "gather_object", "scatter", "scatter_object_list",
                    "all_to_all", "send", "recv", "isend", "irecv")


@contextmanager
def gloo_rank(rank: int, init: str, world: int, timeout_s: float | None = None) -> Iterator[XlaLog]:
    """One rank of a multi-process Neuron test: the torch ops, one thread, a gloo group over the file `init`, and
    every double installed (their log is yielded). The doubles and the group are torn down after the block, which
    should end on a barrier: a rank that leaves early can abort a peer's collective."""
    os.environ["BMOJO_OPS_BACKEND"] = "torch"
    os.environ.pop("WORLD_SIZE", None)
    torch.set_num_threads(1)
    timeout = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world, **timeout)
    patch = pytest.MonkeyPatch()
    log = install(patch)
    try:
        yield log
    finally:
        patch.undo()
        dist.destroy_process_group()


def _recorded(collective: Callable[..., Any], name: str, log: XlaLog) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        if sys._getframe(1).f_code.co_filename.startswith(PACKAGE_ROOT):
            log.dist_calls.append(f"dist.{name} at {bmojo_caller()}")
        return collective(*args, **kwargs)
    return call
