"""Which aten ops torch-xla 2.9 lowers, and a mode that records the ones a step runs that it does not.

An op with no XLA kernel runs on torch-xla's CPU fallback (``xla_fallback``, torch_xla/csrc/aten_fallback.cpp
37-65: ``at::native::cpu_fallback``): its operands are copied to the host, the op runs there and its results are
copied back, which cuts the pending graph and costs a device-host round trip at every step. The ops that have an
XLA kernel are the ones listed in ``codegen/xla_native_functions.yaml`` at v2.9.0 under ``full_codegen``
(lines 11-106), ``supported`` (129-433) and ``autograd`` (453-458); torchgen reads an entry without an overload
name as the default overload only.
(``ir_gen``, 111-121, declares IR nodes and registers no kernel; ``symint``, 434-452, only marks entries of the
other lists.) `parse_native_functions` reads those lists; ``xla_native_functions_v2.9.0.txt`` holds what it reads
from that file, so the tests need no copy of torch-xla.

Besides its own kernels an XLA tensor gets torch's: the CompositeImplicitAutograd ones decompose before the
backend is chosen (a dispatch mode never sees those ops), and the CompositeExplicitAutograd ones are registered
for every backend. torch-xla runs its graphs functionalized (``XLA_DISABLE_FUNCTIONALIZATION`` unset), so an
in-place op reaches it as its functional variant (``add_.Tensor`` as ``add.Tensor``) and a view op as its
``_copy`` variant (``transpose.int`` as ``transpose_copy.int``).

Two listed kernels call the fallback themselves unless ``XLA_EXPERIMENTAL`` (names joined by ":", read once per
process: debug_util.cpp 44-54, 234-237) enables their experiment: ``nonzero`` and ``masked_select``
(aten_xla_type.cpp 2805-2814, 2269-2283), whose output shapes depend on the values. ``index`` and ``index_put``
turn a bool or byte mask among their indices into ``mask.nonzero()`` (``ExpandByteTensors``, ops/index_ops.cpp
49-76), so a boolean-mask read or write on the device falls back the same way. Other kernels fall back for some
arguments: every one taking a ``generator`` when one is given (its numbers come from that CPU generator; the
``generator->defined()`` checks, e.g. aten_xla_type.cpp 1267, 1810, 2562), ``addmm`` when ``beta`` or ``alpha``
is not 1 (898-901), and ``cumprod`` in int64, which an integer or bool input is promoted to without a ``dtype``
(1498-1512, ``PromoteIntegralType`` 291-296: "XLA reduce-window does not support S64 mode"), max pooling with a
dilation other than 1 (2325, 2348, 2380, 2402; aten_autograd_ops.cpp 81, 134, 184, 214),
``_embedding_bag_forward_only`` in mode 1 (mean), with ``scale_grad_by_freq``, ``sparse`` or a ``padding_idx``
(1681-1689), ``scatter`` with a reduction other than
"add" (3395-3406, 3410-3427) and ``scatter_reduce`` but for "sum", "prod", "amin", "amax" with ``include_self``
(3470-3486). `argument_fallback` says which applies.

Not modelled: what a CompositeExplicitAutograd kernel decomposes into (taken as lowered), ``_embedding_bag_backward``
(its kernel always falls back while functionalization is on, 1727-1735, but on the CPU it decomposes before a
dispatch mode sees it), ``norm`` with p = 0 (2822-2872; ``torch.norm`` reaches ``linalg_vector_norm`` instead),
``dot`` of 64-bit integers on TPU and ``full`` with another layout or pinned memory (1596-1604, 1896-1900).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .env import XlaLog, bmojo_caller

LISTS_WITH_KERNELS = ("full_codegen", "supported", "autograd")
OP_LIST = Path(__file__).with_name("xla_native_functions_v2.9.0.txt")
# Keys whose kernels an XLA tensor uses when torch-xla has none of its own.
SHARED_KEYS = ("CompositeImplicitAutograd", "CompositeExplicitAutograd", "CompositeExplicitAutogradNonFunctional")


def parse_native_functions(text: str) -> frozenset[str]:
    """The op names ("name" or "name.overload") listed under the sections of `text` (torch-xla's
    ``codegen/xla_native_functions.yaml``) that register an XLA kernel."""
    names, section = set(), None
    for line in text.splitlines():
        stripped = line.split("#", 1)[0].rstrip()
        if not stripped:
            continue
        if not line.startswith((" ", "-")):  # a top-level key: "full_codegen:", "backend: XLA" ...
            section = stripped.split(":", 1)[0]
        elif section in LISTS_WITH_KERNELS and stripped.lstrip().startswith("- "):
            names.add(stripped.lstrip()[2:].strip())
    return frozenset(names)


def lowered_ops() -> frozenset[str]:
    """The op names of ``xla_native_functions_v2.9.0.txt`` (one a line, ``#`` comments)."""
    lines = OP_LIST.read_text().splitlines()
    return frozenset(line.strip() for line in lines if line.strip() and not line.startswith("#"))


LOWERED = lowered_ops() if OP_LIST.exists() else frozenset()


def _full_name(packet: str, overload: str) -> str:
    return packet if overload in ("", "default") else f"{packet}.{overload}"


def _has_shared_kernel(name: str) -> bool:
    if not torch._C._dispatch_has_kernel(f"aten::{name}"):  # no such op (a variant that does not exist)
        return False
    return any(torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{name}", key) for key in SHARED_KEYS)


def _reaches_xla_as(func: Any) -> list[str]:
    """The names under which `func` may reach torch-xla: its own, its functional variant (in-place ops: the
    overload of the same argument types, as torchgen pairs them, ``bernoulli_.float`` with ``bernoulli.p``) and
    its ``_copy`` variant (view ops, same overload)."""
    packet, overload = func._schema.name.split("::", 1)[1], func._overloadname
    names = [_full_name(packet, overload)]
    if packet.endswith("_") and not packet.endswith("__") and hasattr(torch.ops.aten, packet[:-1]):
        functional = getattr(torch.ops.aten, packet[:-1])
        types = [str(a.type) for a in func._schema.arguments]
        names += [_full_name(packet[:-1], o) for o in functional.overloads()
                  if [str(a.type) for a in getattr(functional, o)._schema.arguments] == types]
    if torch.Tag.view_copy not in func.tags and func.is_view:
        names.append(_full_name(packet + "_copy", overload))
    return names


def falls_back(func: Any) -> bool:
    """Whether torch-xla 2.9 runs the aten op `func` (an ``OpOverload``) on its CPU fallback."""
    known = _FALLS_BACK.get(func)
    if known is None:
        known = _FALLS_BACK[func] = func.namespace == "aten" and func._opname not in CPU_DEVICE_CHOICES and not any(
            name in LOWERED or _has_shared_kernel(name) for name in _reaches_xla_as(func))
    return known


# Kernels torch picks because the double's tensors are on the CPU, where an XLA tensor takes another path:
# ``scaled_dot_product_attention`` asks its fused-kernel choice only of devices that register one
# (``_fused_sdp_choice_stub.is_device_supported``, aten/src/ATen/native/transformers/attention.cpp), and takes the
# composite math path (``_scaled_dot_product_attention_math``: matmuls and a softmax) on XLA.
CPU_DEVICE_CHOICES = frozenset({"_scaled_dot_product_flash_attention_for_cpu",
                                "_scaled_dot_product_flash_attention_for_cpu_backward"})
_FALLS_BACK: dict[Any, bool] = {}  # by op overload: a step runs the same few ops many times
# Listed ops whose XLA kernel calls ``xla_fallback`` unless the experiment of that name is enabled (module docstring).
EXPERIMENT_GATED = frozenset({"nonzero", "masked_select"})
MASK_INDEXING = frozenset({"index", "index_put", "index_put_", "_index_put_impl_"})  # ExpandByteTensors' callers
# Max pooling with a dilation other than 1 (aten_xla_type.cpp 2325, 2348, 2380, 2402; the autograd functions of
# ``max_pool2d`` / ``max_pool3d``, aten_autograd_ops.cpp 17-21, 81, 134, 184, 214).
DILATED_POOLS = frozenset({"max_pool2d", "max_pool3d", "max_pool2d_with_indices", "max_pool3d_with_indices",
                           "max_pool2d_with_indices_backward", "max_pool3d_with_indices_backward"})
SCATTER_REDUCTIONS = frozenset({"sum", "prod", "amin", "amax"})  # scatter_reduce's lowered ones, with include_self


def argument_fallback(func: Any, args: tuple, kwargs: dict) -> str | None:
    """What runs on the CPU fallback when the aten op `func`, which has an XLA kernel, is called with these
    arguments (module docstring), or None when the kernel runs on the device."""
    packet = func._schema.name.split("::", 1)[1]
    name = _full_name(packet, func._overloadname)
    bound = {a.name: v for a, v in zip(func._schema.arguments, args)} | kwargs
    indices = bound.get("indices") if packet in MASK_INDEXING else None
    if packet in EXPERIMENT_GATED:
        return None if _experiment_enabled(packet) else name
    if isinstance(indices, (list, tuple)) and any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                                                  for i in indices):
        return None if _experiment_enabled("nonzero") else f"nonzero (a boolean mask in {name})"
    if isinstance(bound.get("generator"), torch.Generator):
        return f"{name} (given a generator)"
    if packet == "addmm" and (bound.get("beta", 1) != 1 or bound.get("alpha", 1) != 1):
        return f"{name} (beta or alpha not 1)"
    if packet == "cumprod" and _cumprod_in_int64(bound["self"], bound.get("dtype")):
        return f"{name} (in int64)"
    return _shape_or_mode_fallback(packet, name, bound)


def _shape_or_mode_fallback(packet: str, name: str, bound: dict) -> str | None:
    """The kernels that call ``xla_fallback`` for some of their non-tensor arguments (module docstring)."""
    if packet in DILATED_POOLS and any(d != 1 for d in bound.get("dilation", ())):  # IsNonTrivialDilation
        return f"{name} (dilation not 1)"
    if packet == "_embedding_bag_forward_only" and (bound.get("mode", 0) == 1 or bound.get("scale_grad_by_freq")
                                                    or bound.get("sparse") or bound.get("padding_idx", -1) != -1):
        return f"{name} (mode mean, scale_grad_by_freq, sparse or a padding_idx)"
    if packet == "scatter" and bound.get("reduce") not in (None, "add"):
        return f"{name} (reduce {bound['reduce']!r})"
    lowered_reduction = bound.get("reduce") in SCATTER_REDUCTIONS and bound.get("include_self", True)
    if packet == "scatter_reduce" and not lowered_reduction:
        return f"{name} (reduce {bound.get('reduce')!r}, include_self {bound.get('include_self', True)})"
    return None


def _cumprod_in_int64(tensor: torch.Tensor, dtype: torch.dtype | None) -> bool:
    """``IsOperationOnType(PromoteIntegralType(...), self, Long)`` of torch-xla's ``cumprod``."""
    promoted = dtype if dtype is not None else (torch.int64 if not tensor.is_floating_point()
                                                and not tensor.is_complex() else None)
    return promoted == torch.int64 or tensor.dtype == torch.int64


def _experiment_enabled(name: str) -> bool:
    return name in os.environ.get("XLA_EXPERIMENTAL", "").split(":")


class CpuFallbacks(TorchDispatchMode):
    """While the first step of a log runs (`xla_host.enter_step`): records in ``XlaLog.cpu_fallbacks`` every aten
    op torch-xla 2.9 has no kernel for ("op at file:line", the innermost bmojo_neuron frame, or "outside
    bmojo_neuron")."""

    def __init__(self, log: XlaLog) -> None:
        super().__init__()
        self.log = log

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        what = argument_fallback(func, args, kwargs) if func.namespace == "aten" else None
        if what is None and _FALLS_BACK.get(func, True) and falls_back(func):
            what = _full_name(func._schema.name.split("::", 1)[1], func._overloadname)
        if what is not None:
            self.log.cpu_fallbacks.append(f"{what} at {bmojo_caller() or 'outside bmojo_neuron'}")
        return func(*args, **kwargs)
