"""A double of torch-xla 2.9 (``pytorch/xla`` v2.9.0) on the CPU, one replica per process.

- ``torch_xla.sync`` runs the queued step closures in order (`XlaLog.sync`);
  ``xm.mark_step`` and ``xm.xla_device`` are 2.9's deprecated aliases of ``torch_xla.sync``
  and ``torch_xla.device``: each call warns (``DeprecationWarning``, as
  ``typing_extensions.deprecated`` does) and, made by bmojo_neuron, is recorded in
  ``XlaLog.deprecated``; ``MpDeviceLoader`` hands its keyword arguments to
  ``ParallelLoader`` only when iterated (an unknown one is a TypeError there), and its
  per-device iterator calls ``torch_xla.sync`` before every batch it hands out
  (``batches_per_execution=1``) and once more when the loader is exhausted;
- ``xm.get_local_ordinal`` is there (2.9 keeps it, undeprecated; the Neuron guide's
  "removed since 2.7" is wrong for it): ``runtime.local_ordinal()``, which is
  ``LOCAL_RANK`` under torchrun; ``xm.is_master_ordinal(local)`` asks the local or
  the global ordinal;
- ``xm.set_rng_state`` takes an unsigned 64-bit seed only (TypeError otherwise, as its pybind11 binding);
- ``xm.rendezvous`` takes a ``bytes`` payload only (TypeError) and all replicas only
  (ValueError), syncs, meets the other ranks, syncs again (and a third time when a payload is
  not empty: its all-gathers are graphs of their own) and returns every rank's payload;
- ``xm.get_rng_state`` / ``set_rng_state`` play torch's lazy-tensor generator (`env.XlaLog.sync`,
  `env.XlaLog.random_op`): every sync steps the seed, every random op NxD's model wrapper traces
  steps the running seed that ``get_rng_state`` returns;
- ``xm.all_reduce`` with one replica in the world returns a clone and ignores ``scale``
  (as torch-xla 2.9 does unless ``XLA_ALWAYS_ALLREDUCE``, which only changes that case:
  not modelled, docs/trn1.md); otherwise it sums over this rank's group of ``groups``, all
  ranks when ``groups`` is None (a gloo all-reduce when that group has several ranks), out of
  place for a tensor, in place for a list of tensors (one coalesced all-reduce in the graph);
- ``xm.all_gather`` concatenates the shards of the caller's group along ``dim`` (gloo when
  the group has several ranks), groups of one size asserted without ``pin_layout``;
- the functions torch-xla 2.7 removed from ``xla_model`` (``xrt_world_size``,
  ``get_ordinal``) are absent (AttributeError), as is everything the double does not play;
- the ``"xla"`` process-group backend (here gloo) comes with
  ``torch_xla.distributed.xla_backend``;
- ``torch_xla.utils.checkpoint.checkpoint`` is the reentrant checkpoint (keyword
  arguments refused, ``use_reentrant=False`` refused, RNG state preserved);
- every callable has torch-xla 2.9's exact signature (``tests/test_doubles.py``).

`host_reads_in_steps` finds the host reads of a tensor value that on XLA would run a
step's graph early.
"""

from __future__ import annotations

import operator
import os
import sys
import types
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.utils.checkpoint
import torch.distributed as dist

from .env import ON_DEVICE, PACKAGE_ROOT, Env, XlaLog, bmojo_caller, fake_module
from .xla_host import XLA_DEVICE, enter_step, on_host

# What the graph between a rendezvous' first two syncs holds: the all-gather of every replica's payload size
# (the same graph at every rendezvous, so it compiles once).
RENDEZVOUS_GRAPH = [("all_gather", "None", "0", "(1,)", "torch.int32")]


def _deprecated(log: XlaLog, name: str, replacement: str) -> None:
    """What ``typing_extensions.deprecated`` does at a call of `name` in torch-xla 2.9 (a DeprecationWarning
    at the caller), and a record in `log` when the caller is bmojo_neuron code."""
    warnings.warn(f"Use {replacement} instead", DeprecationWarning, stacklevel=3)
    caller = sys._getframe(2).f_code.co_filename
    if caller.startswith(PACKAGE_ROOT):
        log.deprecated.append(f"xm.{name} at {bmojo_caller()}")


def xla_modules(env: Env) -> dict[str, types.ModuleType]:
    """torch-xla's modules by import name, recording into ``env.log``."""
    device, log = XLA_DEVICE, env.log

    def sync(wait=False, reset_scope=True):
        caller = sys._getframe(1).f_code
        if caller.co_name == "mark_step" and caller.co_filename == __file__:
            caller = sys._getframe(2).f_code
        log.sync("loader" if caller.co_filename == __file__ and caller.co_name == "__next__" else "code")

    def mark_step(wait=False, reset_scope=True):
        _deprecated(log, "mark_step", "torch_xla.sync")
        sync(wait, reset_scope)

    def add_step_closure(closure, args=(), run_async=False):
        log.closures.append(lambda a=args: closure(*a))

    def all_reduce(reduce_type, inputs, scale=1.0, groups=None, pin_layout=True):
        assert reduce_type == "sum", reduce_type
        if world_size() == 1:  # torch-xla 2.9: a no-op with one device, `scale` not applied
            return inputs.clone() if isinstance(inputs, torch.Tensor) else inputs
        if isinstance(inputs, torch.Tensor):
            return env.reduce(inputs, groups, scale)
        # a list: one coalesced all-reduce in place (``_xla_all_reduce_inplace``), the list itself returned
        log.trace("all_reduce", groups, [tuple(t.shape) for t in inputs], inputs[0].dtype if inputs else None)
        for tensor in inputs:
            tensor.copy_(env.reduce(tensor, groups, scale, trace=False))
        return inputs

    def all_gather(value, dim=0, groups=None, output=None, pin_layout=True, channel_id=None,
                   use_global_device_ids=None):
        """xla_model.py 456-561: the shards of this rank's group (every replica without `groups`) concatenated
        along `dim` (here in rank order, through gloo), even with one replica in the world; without
        `pin_layout` the groups must be of one size (with it, torch-xla pads and all-reduces instead)."""
        if output is not None or channel_id is not None or use_global_device_ids is not None:
            raise NotImplementedError("the torch-xla double models all_gather(value, dim, groups, pin_layout)")
        if groups and not pin_layout:
            assert all(len(group) == len(groups[0]) for group in groups), \
                "Replica groups must have the same number of replicas/shards."
        log.trace("all_gather", groups, dim, tuple(value.shape), value.dtype)
        mine = next(g for g in (groups or [list(range(world_size()))]) if env.rank() in g)
        if len(mine) == 1:
            return value.clone()
        parts = [torch.empty_like(value) for _ in mine]
        dist.all_gather(parts, value.contiguous(), group=env.group_of(mine))
        return torch.cat(parts, dim)

    def xla_device(n=None, devkind=None):
        _deprecated(log, "xla_device", "torch_xla.device")
        return device

    def get_rng_state(device=None):
        return log.rng  # the running seed (init_python_bindings.cpp 752-755: GetRunningSeed)

    def set_rng_state(seed, device=None):
        # torch-xla 2.9 hands the seed to ``_xla_set_rng_seed(uint64_t seed, ...)`` (csrc/init_python_bindings.cpp):
        # pybind11 refuses a float or an int outside [0, 2**64) with a TypeError
        if isinstance(seed, float) or not hasattr(seed, "__index__") or not 0 <= operator.index(seed) < 2**64:
            raise TypeError(f"_xla_set_rng_seed(): incompatible function arguments (seed: uint64), got {seed!r}")
        log.set_seed(operator.index(seed))

    def get_local_ordinal():
        return local_ordinal()  # xla_model.py 86-94: still there in 2.9, not deprecated

    def is_master_ordinal(local=True):
        return (local_ordinal() if local else global_ordinal()) == 0  # xla_model.py 97-110

    def rendezvous(tag, payload=b"", replicas=[]):
        """``xla_rendezvous`` (xla_model.py 1306-1358): a sync, an all-gather of the payload sizes and a second
        sync; when some payload is not empty, an all-gather of the padded payloads and a third sync."""
        if replicas and len(replicas) != world_size():  # all replicas or none named
            raise ValueError("Only global rendezvous is supported")
        if not isinstance(payload, bytes):
            raise TypeError("`payload` must be bytes, not {}".format(type(payload)))
        sync()
        log.rendezvous.append(tag)
        payloads: list[Any] = [payload]
        if dist.is_initialized() and dist.get_world_size() > 1:
            payloads = [None] * dist.get_world_size()
            dist.all_gather_object(payloads, payload)  # every rank waits for all: a barrier
        log.trace("all_gather", None, 0, (1,), torch.int32)  # the sizes: RENDEZVOUS_GRAPH
        sync()
        longest = max(len(p) for p in payloads)
        if longest < 1:
            return [b"" for _ in payloads]
        log.trace("all_gather", None, 0, (longest,), torch.uint8)  # the payloads, padded to the longest
        sync()
        return payloads

    env.rendezvous, env.all_reduce = rendezvous, all_reduce
    xm = fake_module(
        "torch_xla.core.xla_model", REDUCE_SUM="sum", xla_device=xla_device, mark_step=mark_step,
        add_step_closure=add_step_closure, all_reduce=all_reduce, all_gather=all_gather, rendezvous=rendezvous,
        get_rng_state=get_rng_state, set_rng_state=set_rng_state, is_master_ordinal=is_master_ordinal,
        get_local_ordinal=get_local_ordinal,
    )

    class MpDeviceLoader:
        """``MpDeviceLoader(loader, device, **kwargs)`` (parallel_loader.py 253-287): keeps `kwargs` and hands them
        to ``ParallelLoader`` at each ``iter()``, so a wrong keyword fails there, not when built."""

        def __init__(self, loader, device, **kwargs):
            self._loader, self._device, self._parallel_loader_kwargs = loader, device, kwargs

        def __iter__(self) -> Iterator[Any]:
            parallel = ParallelLoader(self._loader, [self._device], **self._parallel_loader_kwargs)
            return _PerDeviceLoader(parallel, log, sync)

        def __len__(self) -> int:
            return len(self._loader)

    def world_size():
        return dist.get_world_size() if dist.is_initialized() else 1

    def global_ordinal():
        return env.rank()

    def torch_xla_device(index=None):
        return device

    _register_xla_backend()
    runtime = fake_module("torch_xla.runtime", world_size=world_size, global_ordinal=global_ordinal,
                          local_ordinal=local_ordinal)
    checkpoint = fake_module("torch_xla.utils.checkpoint", checkpoint=reentrant_checkpoint)
    return {
        "torch_xla": fake_module("torch_xla", __version__="2.9.0+double", sync=sync,
                                 device=torch_xla_device, runtime=runtime),
        "torch_xla.utils": fake_module("torch_xla.utils", checkpoint=checkpoint),
        "torch_xla.utils.checkpoint": checkpoint,
        "torch_xla.core": fake_module("torch_xla.core", xla_model=xm),
        "torch_xla.core.xla_model": xm,
        "torch_xla.runtime": runtime,
        "torch_xla.distributed": fake_module("torch_xla.distributed"),
        "torch_xla.distributed.parallel_loader": fake_module(
            "torch_xla.distributed.parallel_loader", MpDeviceLoader=MpDeviceLoader, ParallelLoader=ParallelLoader),
        "torch_xla.distributed.xla_backend": fake_module("torch_xla.distributed.xla_backend"),
    }


def local_ordinal() -> int:
    """``runtime.local_ordinal()`` (runtime.py 143-149): ``PJRT_LOCAL_PROCESS_RANK`` x devices per process (1 on
    Neuron) + the device index (0); under torchrun torch-xla's Neuron set-up sets that variable from
    ``LOCAL_RANK`` when torch_xla is imported (_internal/neuron.py 89)."""
    return _pjrt_env("PJRT_LOCAL_PROCESS_RANK", "LOCAL_RANK", "0")


def local_process_count() -> int:
    """``runtime.local_process_count()`` (runtime.py 96-98): ``PJRT_LOCAL_PROCESS_COUNT``, 1 when unset; under
    torchrun torch-xla's Neuron set-up sets it from ``LOCAL_WORLD_SIZE`` (_internal/neuron.py 71-72)."""
    return _pjrt_env("PJRT_LOCAL_PROCESS_COUNT", "LOCAL_WORLD_SIZE", "1")


def _pjrt_env(name: str, torchrun_name: str, default: str) -> int:
    from torch.distributed import is_torchelastic_launched

    return int(os.environ.get(torchrun_name if is_torchelastic_launched() else name, default))


class ParallelLoader:
    """torch-xla 2.9's ``ParallelLoader`` as ``MpDeviceLoader.__iter__`` builds it (parallel_loader.py 85-120): its
    signature checks the keywords (a TypeError naming the first unknown one), ``torch.device`` each device."""

    def __init__(self, cpu_loader, devices, batchdim=0, batches_per_execution=1, loader_prefetch_size=16,
                 device_prefetch_size=8, host_to_device_transfer_threads=1, input_sharding=None):
        if batches_per_execution != 1 or input_sharding is not None:
            raise NotImplementedError("the torch-xla double models batches_per_execution=1 without input_sharding")
        self._cpu_loader, self._devices = cpu_loader, [torch.device(x) for x in devices]
        self.batches = iter(cpu_loader)

    def per_device_samples(self) -> int:
        return len(self._cpu_loader) // len(self._devices)


def reentrant_checkpoint(function, *args, use_reentrant=True, **kwargs):
    """torch-xla 2.9's ``torch_xla.utils.checkpoint.checkpoint``: reentrant only, no keyword arguments but
    ``preserve_rng_state``; the forward runs without grad and again, with grad, in backward."""
    preserve = kwargs.pop("preserve_rng_state", True)
    if kwargs:
        raise ValueError("Unexpected keyword arguments: " + ",".join(kwargs))
    if not use_reentrant:
        raise ValueError("XLA currently does not support use_reentrant==False")
    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=True, preserve_rng_state=preserve)


def _register_xla_backend() -> None:
    if "xla" not in dist.Backend.backend_list:
        def create(store, rank, size, timeout):
            return dist.ProcessGroupGloo(store, rank, size, timeout)
        dist.Backend.register_backend("xla", create, devices=["cpu"])


class _PerDeviceLoader:
    """``PerDeviceLoader.next()`` (parallel_loader.py 39-56) with ``batches_per_execution=1``: a sync before every
    batch, and one more when the loader is exhausted, before ``StopIteration``."""

    def __init__(self, loader: ParallelLoader, log: XlaLog, sync: Callable[..., None]) -> None:
        self._loader, self.batches, self.log, self._sync = loader, loader.batches, log, sync

    def __iter__(self) -> _PerDeviceLoader:
        return self

    def __len__(self) -> int:
        return self._loader.per_device_samples()

    def __next__(self) -> Any:
        self._sync()
        batch = next(self.batches, None)
        if batch is None:
            self._sync()
            raise StopIteration
        self.log.fetches += 1
        self.log.trace("batch", sorted((k, tuple(v.shape)) for k, v in batch.items()))
        on_device = {k: v.to(XLA_DEVICE) for k, v in batch.items()}  # the upload comes before the step's graph
        self.log.in_step = True
        for tensor in on_device.values():
            setattr(tensor, ON_DEVICE, True)  # NxD's pipeline refuses device batches
        enter_step(self.log)  # host tensors made in the step are followed until its sync (`xla_host`)
        return on_device


# Every Tensor method that hands a device value to the host: on XLA each runs the pending graph first.
# ``__format__`` / ``__repr__`` read the value too (torch/_tensor.py: ``item()`` for a 0-dim tensor, the
# printer's ``tolist`` otherwise); a host tensor (`xla_host`) reads nothing from the device.
HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "cpu", "numpy", "__format__",
              "__repr__", "__array__")


@contextmanager
def host_reads_in_steps(log: XlaLog) -> Iterator[list[str]]:
    """Record every host read of a tensor value (``.item()``, ``.tolist()``, ``float()``, ``.cpu()`` ...) made by
    bmojo_neuron code between a loader fetch and the step's sync: on XLA each one would run the graph early."""
    found: list[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def watch(name: str) -> Callable:
        original = originals[name]

        def read(self: torch.Tensor, *args: Any) -> Any:
            caller = sys._getframe(1)  # the code that asked for the value (torch internals do not count)
            if log.in_step and not on_host(self) and caller.f_code.co_filename.startswith(PACKAGE_ROOT):
                found.append(f"Tensor.{name} at {Path(caller.f_code.co_filename).name}:{caller.f_lineno}")
            return original(self, *args)
        return read

    for name in HOST_READS:
        setattr(torch.Tensor, name, watch(name))
    try:
        yield found
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
