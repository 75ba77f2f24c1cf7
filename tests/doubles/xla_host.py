"""Host tensors inside a step on the torch-xla double: what torch-xla 2.9 does when one meets a device tensor.

On the double the "XLA device" is the CPU, so a tensor our code creates inside a step without
``device=`` (``torch.arange(n)``, ``torch.zeros(...)``, ``torch.tensor([...])``, ``torch.from_numpy``)
would look like any other. `HostTensors`, a ``TorchFunctionMode`` pushed when the loader double hands
out a batch (or NxD's ``run_train`` starts under pp) and popped at the step's sync, marks such tensors
made by our code (not by torch, another library or the doubles) as host tensors, keeps the mark through
ops on host tensors only and drops it at ``.to(<device>)``. The plain tensor attributes of the modules NxD
moves to the device are marked at the move (`mark_attributes_left_on_the_host`): ``Module.to`` leaves them.
When an op mixes a host tensor with device tensors it does what torch-xla v2.9.0 does:

- the binary ops lowered through ``GetBinaryOperands`` (``add``, ``sub``, ``mul``, ``div``, ``rsub``,
  ``pow``, ``fmod``, shifts; torch_xla/csrc/aten_xla_type.cpp 345-359, 387-395), ``nll_loss``, indexing
  and ``index_put_`` with host indices (``index`` 1970-1997) copy the host tensor to the device
  (``bridge::GetOrCreateXlaTensor``, aten_xla_bridge.cpp 181-200): it works, as a host-to-device copy at
  every step;
- the code-generated lowerings (``full_codegen``, codegen/xla_native_functions.yaml 11-106: comparisons,
  ``masked_fill``, ``maximum``, ``clamp`` ...) take a host tensor of one element and no dimension as a
  wrapped number (``GetXlaTensorOrCreateForWrappedNumber``, aten_xla_bridge.cpp 169-179: copied over
  too), no other;
- every other lowering takes its operands with ``bridge::GetXlaTensor`` (``mm``, ``bmm``, ``where``,
  ``stack`` ...) and refuses a host tensor: ``RuntimeError: Expected XLA tensor. Got: CPUFloatType``
  (aten_xla_bridge.cpp 101-111; ``cat``'s list message at 114-127; the status message alone unless
  ``TORCH_SHOW_CPP_STACKTRACES``, status.cpp ``ThrowStatusError``);
- an in-place op on a host tensor with a device operand reaches the XLA kernel (torchgen's
  functionalization lets it through when an XLA tensor is among the operands,
  gen_functionalization_type.py), whose ``GetXlaTensor(self)`` refuses it; but ``host.copy_(device)``
  reads the device value back (``_copy_from``, aten_xla_type.cpp 669-692: ``ToTensor`` runs the graph).

The copies (and ``.to(<device>)`` of a host tensor, ``torch.tensor(<host data>, device=...)``,
``host.copy_(device)``) are recorded in ``XlaLog.host_transfers``.

The double's XLA device is ``cpu:0`` (`XLA_DEVICE`; torch-xla's is ``xla:0``): the index tells it from the
host, ``cpu``. Our code reads ``t.device`` of a device tensor as ``cpu:0`` here, so ``device=x.device`` is the
device and an explicit ``device="cpu"`` makes a host tensor; ``.cpu()`` / ``.to("cpu")`` of a device tensor and
the reads of its value (``.item()``, ``.tolist()``, ``float()`` ...) by our code in a step run the graph early
on XLA and are recorded in ``XlaLog.host_reads`` (the copies are host tensors).

What ``torch.load`` reads during a Neuron run is on the host too (`LoadedOnHost`, installed by
`neuron_sdk.install`): a checkpoint's optimizer state not moved to the device fails the step's update.

A buffer registered on a moved module after NxD's move, from a tensor our code made without ``device=``
(`follow_factories`), is marked when the next step begins (`mark_buffers_left_on_the_host`, `doubles.nxd_move`);
any tensor our code made so before the step (one a closure keeps) is a host tensor in it (`on_host`).

A no-dimension host tensor copied into the graph holding 0, 1 or -1 is a constant of the graph, any other
value device data (`trace_uploads`): the constant is traced, so a step whose host scalar changes between those
values and others cuts a different graph, as torch-xla recompiles.

Not modelled: what ops on such a tensor make outside a step, and host tensors made before the step by torch or
another library (a buffer registered after the move; following them would need the mode between steps too, a
Python call at every op of evaluations and checkpoints), host tensors made by torch (but ``torch.load`` and
AdamW's ``step``), another library or the doubles, the host operands of ops torch-xla runs through its CPU
fallback (they take host tensors; `xla_lowerings.CpuFallbacks` records the ops).

A Python number in a step op on a device tensor follows the same rule (`trace_python_scalars`): ``x / 0.5`` takes
0.5 as device data, ``x / 1.0`` (or ``x / 1``) the constant 1, so a number that reaches 0 or ±1 at some step (AdamW's
``bias_correction2 ** 0.5`` without ``capturable``) cuts a different graph there. Only the ops in
`SCALAR_OPERAND_OPS` are followed (their numbers are ``at::Scalar`` operands), and the fill value of a device
``full`` / ``new_full`` (`FILL_VALUE_AT`). The other numbers of an op are not values of the graph: dims, sizes
and indices are attributes of its nodes (``Select`` hashes dim, start, end, stride: ops/select.cpp 17), so any
change to one is a new graph, whatever the number; the double follows shapes through the forwards and batches
it traces, and the index numbers of our code's slicing, ``narrow``, ``select``, ``roll`` ... on a device tensor
(`xla_indices.trace_index_attributes`); a 0-dim device tensor index is a host read too (torch reads it with
``item()``: `xla_indices.read_indices`), a Python list index an upload (`xla_indices.host_data_indices`).
``dropout``'s ``p`` reaches torch-xla as ``bernoulli_(1 - p)`` and a division by ``1 - p`` (torch's
``_dropout_impl``: the fused ``native_dropout``, whose ``p`` is an attribute, is for CUDA, XPU and lazy tensors
only), device data for 0 < p < 1; ``p = 0`` draws nothing, which the random ops traced in NxD's model wrapper show
(`env.DeviceRandomOps`), nor does ``p = 1``, a product with the constant 0 (`env.ZERO_FACTORIES`).
"""

from __future__ import annotations

import functools
import sys
import sysconfig
import weakref
from pathlib import Path
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode
import torch.optim.adam as ADAM  # the module AdamW's step reads its capturable devices from

from torch.utils import _python_dispatch

from .env import ON_XLA_DEVICE, XlaLog, bmojo_caller
from .xla_indices import INDEXED, host_data_indices, read_indices, trace_index_attributes
from .xla_lowerings import CpuFallbacks

HOST = "_bmojo_host_tensor"  # set on a tensor our code made on the host inside a step

# Python-level names whose XLA lowering copies a host operand to the device (aten_xla_type.cpp: DoBinaryOp /
# GetBinaryOperands users add, sub, mul, div, rsub, pow, fmod, __lshift__, __rshift__; nll_loss_forward /
# backward; batch norm; index_copy).
TRANSFERRING = frozenset({
    "add", "add_", "__add__", "__radd__", "__iadd__", "sub", "sub_", "subtract", "__sub__", "__rsub__", "__isub__",
    "rsub", "mul", "mul_", "multiply", "__mul__", "__rmul__", "__imul__", "div", "div_", "divide", "true_divide",
    "__truediv__", "__rtruediv__", "__itruediv__", "__div__", "__rdiv__", "pow", "pow_", "__pow__", "__rpow__",
    "__ipow__", "fmod", "fmod_", "__lshift__", "__rshift__", "index_copy", "index_copy_", "nll_loss",
    "cross_entropy", "batch_norm", "copy_",  # copy_ into a device tensor: ``_copy_from`` 669-692
})
# Indexing: host indices are copied to the device (``index``, ``index_put_``); the indexed tensor must be on it.
INDEXING = frozenset({"__getitem__", "__setitem__", "index", "index_put", "index_put_"})
# full_codegen lowerings (codegen/xla_native_functions.yaml 11-106) our kind of code calls: a one-element,
# no-dimension host tensor is taken as a wrapped number, any other host tensor refused.
WRAPPED_NUMBER_OK = frozenset({
    "eq", "ne", "lt", "le", "gt", "ge", "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__",
    "masked_fill", "masked_fill_", "maximum", "minimum", "clamp", "clamp_", "clip", "clamp_min", "clamp_max",
    "logical_and", "logical_or", "logical_xor", "addcmul", "addcmul_", "addcdiv", "addcdiv_", "tril", "triu",
    "take", "repeat", "bitwise_left_shift", "bitwise_right_shift", "all", "any", "amax", "amin",
})
# Ops whose Python-number operands become values of the graph, with the special-scalar rule (`trace_python_scalars`):
# a number given to a tensor op is a wrapped-number tensor (``x * 0.5``: ``GetBinaryOperands``, aten_xla_type.cpp
# 345-359, through ``GetOrCreateXlaTensor`` to ``XLATensor::GetIrValueForTensor``, tensor.cpp 428-445) or an
# ``at::Scalar`` (``alpha``, ``value``, ``weight``, ``exponent``, ``min`` / ``max``, a Scalar overload's ``other``:
# ``XLAGraphExecutor::GetIrValueForScalar``, xla_graph_executor.cpp 294-300, called by tensor_methods.cpp ``add``
# 1198, ``div`` 1676, ``fill_`` 1871, ``lerp`` 2125, ``mul`` 2490, ``pow`` 2833 / 2858, ``rsub`` 3180, ``sub`` 3544;
# the ``full_codegen`` ops ``addcdiv`` / ``addcmul`` / ``clamp`` / ``masked_fill`` through torchgen's
# ``GetIrValueForScalarFromCodegen``, torch/csrc/lazy/core/lazy_graph_executor.cpp): all test ``IsSpecialScalar``.
SCALAR_OPERAND_OPS = frozenset({
    "add", "add_", "__add__", "__radd__", "__iadd__", "sub", "sub_", "subtract", "__sub__", "__rsub__", "__isub__",
    "rsub", "mul", "mul_", "multiply", "__mul__", "__rmul__", "__imul__", "div", "div_", "divide", "true_divide",
    "__truediv__", "__rtruediv__", "__itruediv__", "__div__", "__rdiv__", "pow", "pow_", "__pow__", "__rpow__",
    "__ipow__", "fmod", "fmod_", "remainder", "remainder_", "lerp", "lerp_", "addcdiv", "addcdiv_", "addcmul",
    "addcmul_", "clamp", "clamp_", "clip", "clip_", "clamp_min", "clamp_max", "masked_fill", "masked_fill_", "fill_",
    "full_like", "where", "eq", "ne", "lt", "le", "gt", "ge", "__eq__", "__ne__", "__lt__", "__le__", "__gt__",
    "__ge__",
})
# Factories whose fill value (at this position of the call) is a Python number of the graph, with the same rule:
# ``full`` (aten_xla_type.cpp 1889-1914 to tensor_methods.cpp ``full``, ``GetIrValueForScalar(fill_value, shape)``)
# given the device, ``new_full`` of a device tensor (the same ``full``). Their sizes are the shape, not values.
FILL_VALUE_AT = {"full": 1, "new_full": 2}
# Factories of a host value (a Python list, a NumPy array): given the device, each call uploads it.
HOST_DATA = frozenset({"tensor", "as_tensor", "asarray"})
LIST_OPERANDS = frozenset({"cat", "concat", "concatenate"})  # ``bridge::GetXlaTensors``: the list message
# Tensor methods that hand a device value to the host: on XLA each runs the pending graph first (``item`` through
# ``_local_scalar_dense``, aten_xla_type.cpp 4164-4175; the others through ``_to_copy`` to the CPU, 725-769).
# ``__format__`` / ``__repr__`` read the value too (torch/_tensor.py: ``item()`` or the printer's ``tolist``).
HOST_READS = frozenset({"item", "tolist", "numpy", "__array__", "__float__", "__int__", "__bool__", "__index__",
                        "__format__", "__repr__"})
# The double's XLA device: torch-xla's is ``xla:0``; on the CPU the index tells it from the host (``cpu``), as our
# code sees it in ``torch_xla.device()`` and, through `HostTensors`, in ``t.device`` of a device tensor.
XLA_DEVICE, HOST_DEVICE = torch.device("cpu", 0), torch.device("cpu")
DEVICE_PROPERTY = torch._C.TensorBase.__dict__["device"]  # ``Tensor.device``: a getset a mode sees as ``__get__``


def is_host(tensor: torch.Tensor) -> bool:
    return getattr(tensor, HOST, False)


def xla_type_string(tensor: torch.Tensor) -> str:
    """``at::Tensor::toString()`` of a CPU tensor: "CPU" + scalar type + "Type" (``CPUFloatType``)."""
    return "CPU" + {torch.float32: "Float", torch.float64: "Double", torch.float16: "Half",
                    torch.bfloat16: "BFloat16", torch.int64: "Long", torch.int32: "Int", torch.int16: "Short",
                    torch.int8: "Char", torch.uint8: "Byte", torch.bool: "Bool"}.get(tensor.dtype, "") + "Type"


def _tensors(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    found = []
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(v for v in value if isinstance(v, torch.Tensor))
    return found


def _mark(out: Any) -> Any:
    for tensor in (out if isinstance(out, (list, tuple)) else (out,)):
        if isinstance(tensor, torch.Tensor) and not on_host(tensor):  # one held already stays unmarked (`on_host`)
            setattr(tensor, HOST, True)
    return out


def names_the_host(device: Any) -> bool:
    """Whether a ``device=`` argument is the host: ``"cpu"`` or ``torch.device("cpu")``, not `XLA_DEVICE`."""
    return isinstance(device, (str, torch.device)) and torch.device(device) == HOST_DEVICE


def _asked_device(args: tuple, kwargs: dict) -> Any:
    """The device ``Tensor.to`` / ``Tensor.cuda`` is given (a ``torch.device``, a string, an index, or another
    tensor: its device), None when only a dtype is."""
    if kwargs.get("device") is not None:
        return kwargs["device"]
    for a in args[1:]:
        if isinstance(a, torch.Tensor):
            return HOST_DEVICE if on_host(a) else XLA_DEVICE
        if isinstance(a, (torch.device, str, int)) and not isinstance(a, bool):
            return a
    return None


class HostTensors(TorchFunctionMode):
    """While ``log.in_step``: marks the tensors bmojo_neuron makes on the host, and rejects (or records) an op
    that mixes one with device tensors as torch-xla 2.9 does (module docstring)."""

    def __init__(self, log: XlaLog) -> None:
        super().__init__()
        self.log = log

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if not self.log.in_step:
            return func(*args, **kwargs)
        if getattr(func, "__self__", None) is DEVICE_PROPERTY:  # ``t.device``: our code sees the XLA device
            return XLA_DEVICE if not on_host(args[0]) and _from_our_code() else func(*args, **kwargs)
        tensors = _tensors(args, kwargs)
        name = getattr(func, "__name__", "")
        if name in FILL_VALUE_AT and _fills_on_the_device(tensors, kwargs):
            trace_fill_value(self.log, FILL_VALUE_AT[name], args, kwargs)
        if not tensors:  # a factory (or no tensor at all): on the host unless given the device
            out = func(*args, **kwargs)
            if not _from_our_code():
                return out
            if kwargs.get("device") is None or names_the_host(kwargs["device"]):
                _mark(out)
            elif getattr(func, "__name__", "") in HOST_DATA:
                self.log.host_transfers.append(f"{func.__name__}(<host data>, device=) at {bmojo_caller() or 'test'}")
                trace_uploads(self.log, [out])
            return out
        host = [t for t in tensors if on_host(t)]
        if name in SCALAR_OPERAND_OPS and len(host) < len(tensors):  # an op on the device
            trace_python_scalars(self.log, args, kwargs)
        if name in INDEXED and args and args[0] is tensors[0] and not on_host(args[0]) and _from_our_code():
            trace_index_attributes(self.log, func, name, args, kwargs)
            if name in INDEXING and any(not on_host(t) for t in read_indices(args[1])):
                self.log.host_reads.append(f"Tensor.{name} with a 0-dim device index (item()) at "
                                           f"{bmojo_caller() or 'test'}")
            if name in INDEXING and host_data_indices(args[1]):
                self.log.host_transfers.append(f"{name} with a Python list index at {bmojo_caller() or 'test'}")
        if not host:
            if (name == "cpu" or name == "to" and names_the_host(_asked_device(args, kwargs))) and _from_our_code():
                return self._to_host(func, name, args, kwargs)  # the device value copied to the host
            if name in HOST_READS and _from_our_code():
                self.log.host_reads.append(f"Tensor.{name} at {bmojo_caller() or 'test'}")
            return func(*args, **kwargs)
        if name in ("to", "cuda") and _asked_device(args, kwargs) is not None \
                and not names_the_host(_asked_device(args, kwargs)):
            self.log.host_transfers.append(f"{name}(<device>) of a host tensor at {bmojo_caller() or 'torch'}")
            trace_uploads(self.log, host)
            out = func(*args, **kwargs)
            return out.clone() if out is args[0] else out  # a new device tensor; the host one stays
        if len(host) == len(tensors):  # host only: the result stays on the host
            return _mark(func(*args, **kwargs))
        trace_uploads(self.log, self._mixed(name, args, tensors, host))
        return func(*args, **kwargs)

    def _to_host(self, func: Callable, name: str, args: tuple, kwargs: dict) -> torch.Tensor:
        """``.cpu()`` / ``.to("cpu")`` of a device tensor: in a step a run of the pending graph and a copy to the
        host (recorded); the copy is a new host tensor (on the double the same device, so copied here)."""
        self.log.host_reads.append(f"Tensor.{name}(<host>) at {bmojo_caller() or 'test'}")
        out = func(*args, **kwargs)
        return _mark(out.clone() if out is args[0] else out)

    def _mixed(self, name: str, args: tuple, tensors: list[torch.Tensor],
               host: list[torch.Tensor]) -> list[torch.Tensor]:
        """An op with host and device tensors: record the transfer it costs on XLA and return the host tensors it
        copies to the device, or raise as torch-xla does."""
        self_arg = args[0] if args and isinstance(args[0], torch.Tensor) else None
        where = bmojo_caller() or "outside bmojo_neuron"
        if self_arg is not None and on_host(self_arg) and _in_place(name):
            if name == "copy_":  # _copy_from: the device value is read back to the host
                self.log.host_transfers.append(f"device-to-host copy_ (runs the graph) at {where}")
                return []
            raise RuntimeError(f"Expected XLA tensor. Got: {xla_type_string(self_arg)}")
        if name in INDEXING:
            if self_arg is not None and on_host(self_arg):
                raise RuntimeError("indices should be either on cpu or on the same device as the indexed tensor "
                                   "(XLA). When using XLA, the indexed tensor must be an XLA tensor.")
            self.log.host_transfers.append(f"{name} with host indices at {where}")
            return host
        if name in TRANSFERRING:
            self.log.host_transfers.append(f"{name} with a host tensor at {where}")
            return host
        if name in WRAPPED_NUMBER_OK and all(t.dim() == 0 and t.numel() == 1 for t in host):
            self.log.host_transfers.append(f"{name} with a host wrapped number at {where}")
            return host
        if name in LIST_OPERANDS:
            listed = next((a for a in args if isinstance(a, (list, tuple))), tensors)
            index = next(i for i, t in enumerate(listed) if on_host(t))
            raise RuntimeError("Expected all tensors in the given list to be XLA tensors. Element at index "
                               f"{index} is not an XLA tensor. Got: {xla_type_string(listed[index])}")
        raise RuntimeError(f"Expected XLA tensor. Got: {xla_type_string(host[0])}")


def trace_uploads(log: XlaLog, uploaded: list[torch.Tensor]) -> None:
    """Host tensors copied into the pending graph. A one-element, no-dimension one holding 0, 1 or -1 goes in as a
    constant of the graph, any other as device data (``XLATensor::GetIrValueForTensor``, torch_xla/csrc/tensor.cpp
    428-445, with torch's ``IsSpecialScalar``, torch/csrc/lazy/core/helpers.cpp, which torch-xla switches on unless
    ``XLA_NO_SPECIAL_SCALARS``, init_python_bindings.cpp 1022-1024): a step whose host scalar holds 0 or 1 at one
    step and another value at the next traces two graphs, a recompile. The constant is traced as an event of the
    graph; device data changes no graph and is not."""
    for tensor in uploaded:
        if tensor.dim() == 0 and not (tensor.is_complex() or tensor.dtype == torch.bool):
            with torch._C.DisableTorchFunction():
                value = tensor.item()
            if value == 0 or abs(value) == 1:
                log.trace("constant", value, tensor.dtype)


def trace_python_scalars(log: XlaLog, args: tuple, kwargs: dict) -> None:
    """The Python numbers of an op on a device tensor (one of `SCALAR_OPERAND_OPS`): torch's ``IsSpecialScalar``
    (torch/csrc/lazy/core/helpers.cpp) makes an integer or floating-point 0, 1 or -1 a constant of the graph, the int
    1 and the float 1.0 alike (``isIntegral(false) || isFloatingPoint()``: a bool is neither, and is device data), any
    other number device data. Either becomes a constant of the op's type (``ScalarOp(value, type)``; a wrapped number
    is cast to it first, ``UnwrapNumber``, torch/csrc/lazy/core/helpers.h), so ``x * 1`` and ``x * 1.0`` trace the
    same graph. The constant is traced, as in `trace_uploads`; device data changes no graph."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and (value == 0 or abs(value) == 1):
            log.trace("constant", float(value))


def trace_fill_value(log: XlaLog, position: int, args: tuple, kwargs: dict) -> None:
    """The fill value of a device ``full`` / ``new_full``, under `trace_python_scalars`' rule; the sizes before it
    are the shape (attributes of the graph, like dims and indices: any change is a new graph, and the double
    follows shapes through the forwards it traces, not op by op)."""
    value = kwargs.get("fill_value", args[position] if len(args) > position else None)
    trace_python_scalars(log, (value,), {})


def _fills_on_the_device(tensors: list[torch.Tensor], kwargs: dict) -> bool:
    """Whether a ``full`` (no tensor: given the device) or ``new_full`` (of a device tensor, not sent to the host)
    makes a device tensor."""
    device = kwargs.get("device")
    if not tensors:
        return device is not None and not names_the_host(device)
    return not on_host(tensors[0]) and (device is None or not names_the_host(device))


def _in_place(name: str) -> bool:
    return name.endswith("_") and not name.endswith("__") or name.startswith("__i") and name not in ("__index__",
                                                                                                    "__int__")


class LoadedOnHost(torch.Tensor):
    """A tensor ``torch.load`` read during a Neuron run (`loaded_on_host`): it is on the host, where torch-xla
    needs ``.to(<device>)`` to make a device tensor of it. A host tensor to `HostTensors` (so a step op that mixes
    it with device tensors meets torch-xla's rules: AdamW's in-place update of a state left on the host fails with
    ``Expected XLA tensor``), and so is what ops on it make (torch's subclass propagation); ``.to(<device>)`` or
    ``.cuda()`` gives a plain tensor, the device copy."""

    _bmojo_host_tensor = True  # `HOST`, read by `is_host`

    @classmethod
    def __torch_function__(cls, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        asked = _asked_device(args, kwargs) if getattr(func, "__name__", "") in ("to", "cuda") else None
        if asked is None or names_the_host(asked):
            return super().__torch_function__(func, types, args, kwargs)
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        return (out.clone() if out is args[0] else out).as_subclass(torch.Tensor)


def loaded_on_host(data: Any) -> Any:
    """What ``torch.load`` returned, its tensors (in dicts, lists and tuples) made `LoadedOnHost`."""
    if isinstance(data, torch.Tensor) and not isinstance(data, torch.nn.Parameter):
        return data.as_subclass(LoadedOnHost)
    if isinstance(data, dict):
        for key, value in data.items():
            data[key] = loaded_on_host(value)
    elif isinstance(data, list):
        data[:] = [loaded_on_host(x) for x in data]
    elif type(data) is tuple:
        return tuple(loaded_on_host(x) for x in data)
    return data


def host_load(load: Callable[..., Any], running: Callable[[], bool]) -> Callable[..., Any]:
    """``torch.load`` whose tensors are `LoadedOnHost` while `running` (NxD's parallel state is up: a Neuron run):
    a checkpoint our resume reads is on the host (``map_location="cpu"``, or CPU tensors saved), as on Trainium."""
    def load_on_host(*args: Any, **kwargs: Any) -> Any:
        data = load(*args, **kwargs)
        return loaded_on_host(data) if running() else data
    return load_on_host


def mark_attributes_left_on_the_host(moved: torch.nn.Module) -> None:
    """NxD moved `moved` to the device: the plain tensor attributes of its modules stay on the host, since
    ``Module.to`` moves only ``_parameters`` and ``_buffers`` (``Module._apply``, torch/nn/modules/module.py);
    a step that reads one meets the rules of a host tensor made inside it."""
    for module in moved.modules():
        for value in vars(module).values():
            if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
                setattr(value, HOST, True)


def mark_buffers_left_on_the_host(modules: list[torch.nn.Module]) -> None:
    """Buffers of the `modules` NxD moved to the device that it did not move (registered after the move, from a
    tensor our code made on the host outside a step, `follow_factories`): host tensors in the step, as on XLA."""
    for module in modules:
        for buffer in module.buffers():
            if not getattr(buffer, ON_XLA_DEVICE, False) and getattr(buffer, MADE_ON_HOST, False):
                setattr(buffer, HOST, True)


def enter_step(log: XlaLog, update: bool = False) -> None:
    """The loader double handed out a batch (or, with `update`, the step goes on after our code's sync with its
    update): the step's ops run under `HostTensors` until its sync. Of the first step the fallback check sees the
    first micro-batch's graph and the update's (the other micro-batches trace the first one's ops)."""
    if log.host_tensors is None:
        mark_buffers_left_on_the_host(log.moved_modules)
        log.host_tensors = HostTensors(log)
        log.host_tensors.__enter__()
    if log.fallback_mode is None and log.fallback_steps_left > 0 and (update or not log.micro_batch_checked):
        log.fallback_mode = CpuFallbacks(log)
        log.fallback_mode.__enter__()


def leave_step(log: XlaLog) -> None:
    """A sync inside a step: `HostTensors` leaves the mode stack (it must be on top: modes nest)."""
    fallbacks, log.fallback_mode = log.fallback_mode, None
    if fallbacks is not None:
        fallbacks.__exit__(None, None, None)
        log.micro_batch_checked = True
        if log.update_traced:  # the step's last graph, its optimizer update, is checked (`XlaLog.update_traced`)
            log.fallback_steps_left -= 1
    log.update_traced = False
    mode, log.host_tensors = log.host_tensors, None
    if mode is not None:
        top = torch._C._get_function_stack_at(torch._C._len_torch_function_stack() - 1)
        assert top is mode, f"a torch function mode entered inside the step is still active at its sync: {top}"
        mode.__exit__(None, None, None)


def drop_left_over_modes() -> None:
    """Pop the `HostTensors` a failed step left on the mode stack (its sync never came)."""
    while torch._C._len_torch_function_stack() and isinstance(
            torch._C._get_function_stack_at(torch._C._len_torch_function_stack() - 1), HostTensors):
        torch._C._pop_torch_function_stack()
    while _python_dispatch._get_current_dispatch_mode_stack() and isinstance(
            _python_dispatch._get_current_dispatch_mode_stack()[-1], CpuFallbacks):
        _python_dispatch._pop_mode()


# Code whose tensors the double does not follow: torch's and the other libraries' (what they make for our code
# is theirs to place), and the doubles' own.
NOT_FOLLOWED = (str(Path(torch.__file__).parent), sysconfig.get_paths()["purelib"], str(Path(__file__).parent))


def _from_our_code() -> bool:
    """Whether the torch call being handled was made by our code, bmojo_neuron's or a test's (frame 0: this
    function, 1: the mode; the wrappers `follow_factories` puts around torch's factories and ``Tensor.to`` are
    passed over)."""
    frame = sys._getframe(2)
    while frame.f_code in WRAPPER_CODE:
        frame = frame.f_back
    return not frame.f_code.co_filename.startswith(NOT_FOLLOWED)


# ------------------------------------------------------------------ host tensors made outside a step

# Set on what a factory called by our code outside a step (a bmojo_neuron module's or a test's), without
# ``device=`` or with the host, returned during a Neuron run: on torch-xla a host tensor.
MADE_ON_HOST = "_bmojo_made_on_host"
# torch's factories of a new tensor that take no tensor to copy a device from (``*_like`` take their input's)
FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "as_tensor", "arange", "rand", "randn", "randint",
             "linspace", "eye", "from_numpy")


def follow_factories(monkeypatch: Any, running: Callable[[], bool]) -> None:
    """Mark what our code's factory calls make on the host while `running` (NxD's parallel state is up), for the
    one check that reads the mark: the optimizer step's states (`check_states_on_device`). ``.to(<device>)`` of a
    marked tensor gives an unmarked copy (on the CPU ``.to`` would return the tensor itself)."""
    for name in FACTORIES:
        monkeypatch.setattr(torch, name, _marking(getattr(torch, name), running))
    to = torch.Tensor.to

    @functools.wraps(to)  # named ``to``: a subclass's ``__torch_function__`` may get this function (`LoadedOnHost`)
    def to_device(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = to(self, *args, **kwargs)
        if out is self and getattr(self, MADE_ON_HOST, False):
            asked = _asked_device((self, *args), kwargs)
            if asked is not None and not names_the_host(asked):
                return out.clone()  # the device copy: a new tensor, unmarked
        return out

    monkeypatch.setattr(torch.Tensor, "to", to_device)
    WRAPPER_CODE.add(to_device.__code__)


WRAPPER_CODE: set = set()  # the code of those wrappers: frames `_from_our_code` passes over


def _marking(factory: Callable[..., Any], running: Callable[[], bool]) -> Callable[..., Any]:
    def make(*args: Any, **kwargs: Any) -> Any:
        out = factory(*args, **kwargs)
        device = kwargs.get("device")
        if (isinstance(out, torch.Tensor) and (device is None or names_the_host(device)) and running()
                and not sys._getframe(1).f_code.co_filename.startswith(NOT_FOLLOWED)):
            setattr(out, MADE_ON_HOST, True)
        return out
    WRAPPER_CODE.add(make.__code__)
    return make


# Host tensors the double knows of without a mark in their ``__dict__`` (which ``torch.save`` would write into a
# checkpoint): AdamW's ``step`` and NxD's host aliases, by id, each with a weak reference that tells a reused id.
_HELD_ON_HOST: dict[int, weakref.ref] = {}


def hold_on_host(tensor: torch.Tensor) -> None:
    """Record `tensor` as a host tensor (`on_host`) without touching its attributes."""
    key = id(tensor)
    _HELD_ON_HOST[key] = weakref.ref(tensor, lambda _ref: _HELD_ON_HOST.pop(key, None))


def on_host(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a host tensor to the double outside a step too: marked in a step or at NxD's move
    (`is_host`, `LoadedOnHost`), made by our code's factory without ``device=`` during a Neuron run
    (`follow_factories`), AdamW's ``step`` (`mark_steps_on_host`) or NxD's host copy of a host tensor."""
    if is_host(tensor) or getattr(tensor, MADE_ON_HOST, False):
        return True
    held = _HELD_ON_HOST.get(id(tensor))
    return held is not None and held() is tensor


def mark_steps_on_host(optimizer: Any) -> None:
    """AdamW keeps each parameter's ``step`` as a 0-dim host tensor (``torch.tensor(0.0, ..., device="cpu")`` in
    ``Adam._init_group``, torch/optim/adam.py, unless ``capturable`` or ``fused``), made inside torch where the
    factory marks do not reach: marked here after each optimizer step, so a host copy of the states sees it as a
    host tensor (NxD's ``move_all_tensor_to_cpu`` hands it back as an alias). A ``capturable`` group's ``step`` is
    made on the parameter's device (``torch.zeros((), ..., device=p.device)``, the same lines) and left unmarked."""
    for group, state in _states_by_group(optimizer):
        step = state.get("step")
        if not group.get("capturable") and isinstance(step, torch.Tensor) and step.dim() == 0 and not on_host(step):
            hold_on_host(step)


def check_states_on_device(optimizer: Any) -> None:
    """At the optimizer step: every state tensor but AdamW's scalar ``step`` (a host tensor AdamW makes itself) must
    be on the device. AdamW updates its states in place with the device gradient (``exp_avg.lerp_(grad, ...)``): an
    in-place op on a host tensor with a device operand, which torch-xla 2.9's ``GetXlaTensor(self)`` refuses
    (aten_xla_bridge.cpp 101-111) with this message. Catches a state our code made with a factory and no
    ``device=`` outside a step (`follow_factories`) as well as one ``torch.load`` left on the host. In a
    ``capturable`` group the ``step`` must be on the device too: ``_single_tensor_adam`` asserts that it is on the
    parameter's device type (torch/optim/adam.py), which a host ``step`` (``cpu``) next to an ``xla`` parameter is
    not."""
    for group, state in _states_by_group(optimizer):
        for key, value in state.items():
            if not isinstance(value, torch.Tensor) or not (getattr(value, MADE_ON_HOST, False) or on_host(value)):
                continue
            if key != "step":
                raise RuntimeError(f"Expected XLA tensor. Got: {xla_type_string(value)}")
            if group.get("capturable"):
                raise AssertionError("If capturable=True, params and state_steps must be on supported devices: "
                                     f"{CAPTURABLE_DEVICES()}.")


def _states_by_group(optimizer: Any) -> list[tuple[dict, dict]]:
    """(param group, state) of each parameter with a state in the optimizer NxD wraps (ZeRO-1: its base)."""
    inner = getattr(optimizer, "base_optimizer", optimizer)
    return [(group, inner.state[p]) for group in inner.param_groups for p in group["params"] if p in inner.state]


# torch's list of the devices a capturable optimizer takes (optim/optimizer.py), read where AdamW reads it; on
# torch-xla it holds "xla", the device type of a parameter there. The double's device is the CPU: during a Neuron
# run `capturable_on_the_device` adds "cpu" to what AdamW reads, standing for "xla", and `check_states_on_device`
# refuses the host ``step`` that torch's own check can no longer tell from the device.
CAPTURABLE_DEVICES = ADAM._get_capturable_supported_devices


def capturable_on_the_device(monkeypatch: Any, running: Callable[[], bool]) -> None:
    """Let AdamW's ``capturable`` path take the double's device-type ``cpu`` while `running` (a Neuron run)."""
    def supported(supports_xla: bool = True) -> list[str]:
        devices = CAPTURABLE_DEVICES(supports_xla)
        return devices + [XLA_DEVICE.type] if running() and "xla" in devices else devices
    monkeypatch.setattr(ADAM, "_get_capturable_supported_devices", supported)
