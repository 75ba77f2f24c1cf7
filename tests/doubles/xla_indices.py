"""The index numbers of a step's ops: attributes of torch-xla's IR nodes, so part of the graph's hash.

torch-xla v2.9.0 keeps the Python ints that say where an op reads or writes as attributes of its IR node and
hashes them into the node, hence into the graph (``XlaNode``'s ``node_hash_``, torch_xla/csrc/ir.cpp 64-68, merged
by ``XLAGraphExecutor::GetGraphHash``, xla_graph_executor.cpp 517-540): a slice or ``narrow`` start is ``Select``'s
(ops/select.cpp 17: dim, start, end, stride, after ``tensor_methods::slice`` made them canonical, tensor_methods.cpp
3286-3314), ``select`` is a ``narrow`` (tensor_ops.cpp 190-198) to a ``GenericSlice`` (ops/generic_slice.cpp 31),
a slice assignment an ``UpdateSlice`` (ops/update_slice.cpp 32, ``slice_scatter`` aten_xla_type.cpp 3562-3590),
``diagonal`` hashes its offset (ops/diagonal.cpp 19), ``as_strided`` its storage offset (ops/as_strided.cpp 54),
``roll`` its shifts as given (ops/roll.cpp 10), ``tril`` / ``triu`` their diagonal (``full_codegen``). A start that
moves from one step to the next, shapes unchanged, is therefore a new graph at every new value: a compile each.
(A tensor index, ``index_select`` or advanced indexing, is device data: one graph whatever it holds.)

`trace_index_attributes` traces those numbers into the pending graph, canonical as torch-xla makes them, so the
same-graph checks of the runs see a step whose index moves. For the ops that make a view the view itself says it:
its offset into the input's storage, its sizes and strides (``x[:, -1]`` and ``x[:, n - 1]`` of a width-n input
are one slice, as after ``GetCanonicalPosition``); a slice assignment is traced as the view it writes.

Two of torch's own indexing rules reach XLA with it: a 0-dim integer or bool tensor index is read to the host and
used as a number (`read_indices`), a Python list index is made an index tensor from host data (`host_data_indices`).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .env import XlaLog

# Python-level names whose int arguments pick where in the input the op reads (a view of it).
VIEWS = frozenset({"narrow", "select", "__getitem__", "diagonal", "as_strided", "unfold"})
# Names that write through such an index: traced as the view they write.
WRITES = frozenset({"__setitem__"})
# Names whose int arguments are hashed as given: ``roll``'s shifts and dims, ``tril`` / ``triu``'s diagonal.
RAW_NUMBERS = frozenset({"roll", "tril", "triu", "tril_", "triu_"})
INDEXED = VIEWS | WRITES | RAW_NUMBERS


def trace_index_attributes(log: XlaLog, func: Callable, name: str, args: tuple, kwargs: dict) -> None:
    """Trace the index attributes of the op `name` (one of `INDEXED`) on the device tensor ``args[0]``."""
    if name in RAW_NUMBERS:
        numbers = [a for a in (*args[1:], *kwargs.values()) if not isinstance(a, torch.Tensor)]
        log.trace("index", name, numbers)
        return
    source = args[0]
    with torch._C.DisableTorchFunction():
        if name in VIEWS and name != "__getitem__":
            view = func(*args, **kwargs)
        else:  # indexing: the basic part (ints, slices) is the attribute, a tensor index device data
            view = source.__getitem__(_basic_part(args[1]))
        offset = view.storage_offset() - source.storage_offset()
        log.trace("index", name, offset, tuple(view.shape), view.stride())


def read_indices(index: Any) -> list[torch.Tensor]:
    """The 0-dim integer or bool tensors of an indexing `index`: torch reads each one's value to the host
    (``tensor.item<int64_t>()`` / ``item<bool>()`` in ``handleDimInMultiDimIndexing``, ATen/TensorIndexing.h, lines
    516-540 of the torch 2.13 headers installed here, the same branch in 2.9) and indexes with the number: an int
    becomes a ``select``, so its value is an attribute of the graph as well."""
    items = index if isinstance(index, tuple) else (index,)
    return [item for item in items if isinstance(item, torch.Tensor) and item.dim() == 0
            and not item.is_floating_point() and not item.is_complex()]


def host_data_indices(index: Any) -> list[Any]:
    """The Python sequences (lists, ranges) of an indexing `index`: torch makes each an index tensor from the host
    data on the indexed tensor's device (``indexing_tensor_from_data``, torch/csrc/utils/tensor_new.h 45, called
    for a sequence index by torch's Python indexing), which on XLA is an upload of that data at every step, as
    ``torch.tensor(<list>, device=<xla>)`` is."""
    items = index if isinstance(index, tuple) else (index,)
    return [item for item in items if isinstance(item, (list, range))]


def _basic_part(index: Any) -> Any:
    """`index` with every tensor in it taken as a whole-dimension slice (one per dimension it indexes) but a 0-dim
    integer or bool one, taken as the number torch reads from it (`read_indices`): what is left are the ints and
    slices that torch-xla hashes into the graph."""
    items = index if isinstance(index, tuple) else (index,)
    basic: list[Any] = []
    for item in items:
        if read_indices(item):
            basic.append(bool(item.item()) if item.dtype in (torch.bool, torch.uint8) else int(item.item()))
        elif isinstance(item, (torch.Tensor, list, range)):
            dims = item.dim() if isinstance(item, torch.Tensor) and item.dtype in (torch.bool, torch.uint8) else 1
            basic.extend([slice(None)] * max(dims, 1))
        else:
            basic.append(item)
    return tuple(basic)
