"""neuronx-cc's refusals that can be seen in an aten graph (op, dtypes, shapes, constants).

Each rule is written from one page of the Neuron compiler's error-code reference at
the pinned SDK (aws-neuron/aws-neuron-sdk `3c46990d`, `compiler/error-codes/<CODE>.rst`;
neuronx-cc 2.23) and names that code and page in its message, so a CPU trace of the
training step (`tests/test_static_shapes.py`) fails where the compiler would. What a
rule needs to know about torch-xla's lowering is taken from pytorch/xla `v2.9.0` and
cited where used. The codes that cannot be seen at the aten level (instruction
counts, HBM, compiler flags, custom-call targets, the RNG algorithm) are listed in
docs/trn1.md with the reason.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
from torch.fx import Graph, Node
from torch.utils import _pytree as pytree

SDK_DOCS = "aws-neuron-sdk 3c46990d"
INT32_RANGE = (-(2**31), 2**31 - 1)
UINT32_MAX = 2**32 - 1
# EVRF024.rst (its only text on the limit): "The output tensor size limit of 4GB was exceeded", fixed by a
# smaller batch or tensor, or by tensor parallelism of the attention projections. The page says neither 10^9
# nor 2^30 bytes: 2^32 (a 32-bit byte count) is the reading taken here. Nor does it say which tensors count;
# its fixes shrink intermediate tensors (a projection's output), not only the graph's outputs, so every
# tensor a node of the graph makes or takes counts here, each on its own.
OUTPUT_TENSOR_LIMIT_BYTES = 4 * 2**30

# torch-xla v2.9.0 lowers aten::sort as a TopK over the whole dimension (aten_xla_type.cpp,
# XLANativeFunctions::sort -> tensor_methods::topk) and kthvalue through the same sort
# with an iota (xla_lower_util.cpp, CreateTopK / CreateKthValue): all reach the compiler's TopK.
TOPK_OPS = frozenset({"topk", "sort", "argsort", "msort", "kthvalue"})
# Scatters that combine colliding updates (an HLO scatter with an add/mul/min/max combiner).
SCATTER_REDUCE_OPS = frozenset({"scatter_add", "scatter_reduce", "index_add", "index_reduce"})
ACCUMULATING_INDEX_PUT_OPS = frozenset({"index_put", "index_put_", "_unsafe_index_put", "_index_put_impl_"})
SHIFT_RIGHT_OPS = frozenset({"bitwise_right_shift", "__rshift__", "__irshift__", "bitwise_right_shift_"})
SHIFT_RIGHT_DTYPES = (torch.int32, torch.uint32, torch.float32)
# EUOC002.rst / EVRF001.rst: the refused operator of the example (HLO TriangularSolve).
UNSUPPORTED_OPS = frozenset({"triangular_solve", "linalg_solve_triangular"})
MAX_POOL_OPS = frozenset({
    "max_pool1d", "max_pool2d", "max_pool3d", "max_pool1d_with_indices", "max_pool2d_with_indices",
    "max_pool3d_with_indices", "max_pool2d_with_indices_backward", "max_pool3d_with_indices_backward",
})
MAX_POOL_DILATION_ARG = 4  # (input, kernel_size, stride, padding, dilation, ...)
# torch-xla v2.9.0 lowers cummax as one reduce-window over (values, indices): two inputs and
# two initial values (ops/cummax.cpp -> reduction.cpp BuildCumulativeComputationWithIndices).
# cumsum and cumprod are single-operand reduce-windows without dilations (BuildCumulativeComputation).
TWO_OPERAND_REDUCE_WINDOW_OPS = frozenset({"cummax"})

# dtype -> (code, why); NeuronCore v2 types are listed in about-neuron/arch/neuron-features/data-types.rst.
_DTYPE_RULES: dict[torch.dtype, tuple[str, str]] = {
    torch.complex32: ("EVRF004", "complex dtypes are not supported on the Neuron device"),
    torch.complex64: ("EVRF004", "complex dtypes are not supported on the Neuron device"),
    torch.complex128: ("EVRF004", "complex dtypes are not supported on the Neuron device"),
    torch.float8_e4m3fnuz: ("EVRF005", "F8E4M3FNUZ is not supported"),
    torch.float8_e5m2fnuz: ("EVRF005", "F8E5M2FNUZ is not supported"),
    torch.float8_e4m3fn: ("ESPP047", "float8_e4m3fn is an unsupported 8-bit float"),
    torch.float64: ("ESPP004", "float64 is not a NeuronCore v2 data type (data-types.rst lists FP32, TF32, "
                               "BF16, FP16, cFP8, UINT8)"),
    torch.float8_e8m0fnu: ("ESPP004", "float8_e8m0fnu is not a data type code generation supports"),
    torch.float4_e2m1fn_x2: ("ESPP004", "float4_e2m1fn is not a data type code generation supports"),
}


class Violation(NamedTuple):
    node: str
    code: str
    problem: str
    where: str

    def __str__(self) -> str:
        page = f"compiler/error-codes/{self.code}.rst"
        return f"{self.node}: NCC_{self.code} ({page}, {SDK_DOCS}): {self.problem} {self.where}".rstrip()


# ----------------------------------------------------------------------------- node helpers
def op_name(target) -> str | None:
    """The aten overload packet's name of a call_function target (`aten.sort.stable` -> 'sort')."""
    packet = getattr(target, "overloadpacket", None)
    return getattr(packet, "__name__", None)


def source_line(node: Node) -> str:
    """'at File "...", line N, in fn' of the innermost frame that made `node`, if recorded.

    Frames of code torch.fx generated (``File "<eval_with_key>.N ..."``) are left out: a joint graph
    derived from an exported one records only those, which name no line of the model.
    """
    trace = (node.meta.get("stack_trace") or "").splitlines()
    frames = [line.strip() for line in trace
              if line.strip().startswith("File ") and not line.strip().startswith('File "<eval_with_key>')]
    return f"at {frames[-1]}" if frames else ""


def _tensors(value) -> list[torch.Tensor]:
    return [leaf for leaf in pytree.tree_leaves(value) if isinstance(leaf, torch.Tensor)]


def _dtype(arg) -> torch.dtype | None:
    value = arg.meta.get("val") if isinstance(arg, Node) else None
    return value.dtype if isinstance(value, torch.Tensor) else None


def _arg(node: Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _not_float(dtype: torch.dtype | None) -> bool:
    return dtype is not None and not dtype.is_floating_point


def _above_one(values) -> bool:
    return any(isinstance(v, int) and v > 1 for v in pytree.tree_leaves(values))


# ----------------------------------------------------------------------------- the rules
def _dtype_rule(node: Node) -> Iterator[tuple[str, str]]:
    """EVRF004 / EVRF005 / ESPP047 / ESPP004: a value of a dtype the device cannot hold."""
    for dtype in dict.fromkeys(t.dtype for t in _tensors(node.meta.get("val"))):
        if dtype in _DTYPE_RULES:
            code, why = _DTYPE_RULES[dtype]
            yield code, f"{why} ({dtype})"


def _topk_rule(node: Node, name: str) -> Iterator[tuple[str, str]]:
    """EVRF013: TopK (and sort, which torch-xla lowers to TopK) of an integer or boolean tensor.

    The page names int32 and int64 and says to cast to a floating dtype; other integer
    widths and bool are refused here too (no page says the TopK takes them).
    """
    dtype = _dtype(node.args[0]) if node.args else None
    if name in TOPK_OPS and _not_float(dtype):
        yield "EVRF013", f"aten.{name} of a {dtype} tensor is a TopK on integers; sort a floating-point key"


def _scatter_reduce_rule(node: Node, name: str) -> Iterator[tuple[str, str]]:
    """EVRF016: a scatter that reduces (sum/prod/min/max) into an integer or boolean tensor."""
    reduces = name in SCATTER_REDUCE_OPS or (name == "scatter" and _arg(node, 4, "reduce") is not None)
    if name in ACCUMULATING_INDEX_PUT_OPS:
        reduces = bool(_arg(node, 3, "accumulate", False))
    if not reduces:
        return
    dtype = _dtype(node.args[0])  # torch requires the scattered values to share this dtype
    if _not_float(dtype):
        yield "EVRF016", f"aten.{name} reduces into {dtype} data; scatter-reduce needs floating point"


def _value_arguments(node: Node) -> Iterator[object]:
    """The arguments that become constants of the HLO: Scalar slots, and Python numbers in Tensor slots.

    int / int[] slots (dims, sizes, slice bounds such as `x[1:]`'s end, sys.maxsize) are
    shapes the compiler never holds as data, so they are left out.
    """
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return
    for index, argument in enumerate(schema.arguments):
        if str(argument.type).removeprefix("Optional[").removesuffix("]") not in ("number", "Tensor"):
            continue
        value = node.args[index] if index < len(node.args) else node.kwargs.get(argument.name)
        if isinstance(value, int) and not isinstance(value, bool):
            yield value


def _constant_rule(node: Node, name: str) -> Iterator[tuple[str, str]]:
    """ESFH002: a 64-bit integer constant that does not fit 32 bits.

    The page's example is a uint64 constant, and its reason is general: the hardware
    works on 32-bit or narrower types and converts 64-bit integers to 32 bits, so a
    64-bit constant outside the 32-bit range fails. torch's int64 (indices, positions,
    labels) is such a type, so a signed constant must fit int32, an unsigned one uint32.
    """
    dtypes = {_dtype(a) for a in [*node.all_input_nodes, node]}
    signed, unsigned = torch.int64 in dtypes, torch.uint64 in dtypes
    if not (signed or unsigned):
        return
    low, high = (0, UINT32_MAX) if unsigned and not signed else INT32_RANGE
    for value in _value_arguments(node):
        if not low <= value <= high:
            yield "ESFH002", f"aten.{name} uses the 64-bit integer constant {value}, outside [{low}, {high}]"
            return


def _shift_rule(node: Node, name: str) -> Iterator[tuple[str, str]]:
    """EVRF022: shift-right-arithmetic of a value that is not 32-bit (s32, u32, f32)."""
    dtype = _dtype(node.args[0]) if node.args else None
    if name in SHIFT_RIGHT_OPS and dtype is not None and dtype not in SHIFT_RIGHT_DTYPES:
        yield "EVRF022", f"aten.{name} shifts a {dtype} value right; cast it to int32"


def _unsupported_op_rule(node: Node, name: str) -> Iterator[tuple[str, str]]:
    """EUOC002 (EVRF001 is the same refusal from the verifier): an operator the compiler lacks."""
    if name in UNSUPPORTED_OPS:
        yield "EUOC002", f"aten.{name} is an unsupported operator (TriangularSolve)"


def _pool_dilation_rule(node: Node, name: str) -> Iterator[tuple[str, str]]:
    """EVRF018: a reduce-window (max pooling) with window dilation above 1."""
    dilation = _arg(node, MAX_POOL_DILATION_ARG, "dilation", 1)
    if name in MAX_POOL_OPS and _above_one(dilation):
        yield "EVRF018", f"aten.{name} has dilation {dilation} (a reduce-window with window dilation)"


def _reduce_window_operands_rule(node: Node, name: str) -> Iterator[tuple[str, str]]:
    """EVRF019: a reduce-window with more than one input and initial value."""
    if name in TWO_OPERAND_REDUCE_WINDOW_OPS:
        yield "EVRF019", f"aten.{name} is lowered as a reduce-window over (values, indices): four operands"


def _conv_dilation_rule(node: Node, name: str) -> Iterator[tuple[str, str]]:
    """EVRF010: a convolution that dilates both its input (by the stride) and its kernel.

    A transposed convolution dilates its input by its stride; so does the input
    gradient of a strided convolution (convolution_backward). With a kernel dilation
    above 1 as well, the compiler refuses it.
    """
    if name == "convolution":  # (input, weight, bias, stride, padding, dilation, transposed, ...)
        stride, dilation, transposed = node.args[3], node.args[5], node.args[6]
    elif name == "convolution_backward":  # (grad, input, weight, bias_sizes, stride, padding, dilation,
        # transposed, output_padding, groups, output_mask)
        stride, dilation, transposed = node.args[4], node.args[6], node.args[7]
        transposed = transposed or bool(node.args[10][0])  # the input gradient is a transposed convolution
    elif name.startswith("conv_transpose"):  # (input, weight, bias, stride, padding, output_padding, groups, dilation)
        stride, dilation, transposed = _arg(node, 3, "stride", 1), _arg(node, 7, "dilation", 1), True
    else:
        return
    if transposed and _above_one(stride) and _above_one(dilation):
        yield "EVRF010", f"aten.{name} with stride {stride} and dilation {dilation} dilates input and kernel"


NODE_RULES: tuple[Callable[[Node, str], Iterator[tuple[str, str]]], ...] = (
    _topk_rule, _scatter_reduce_rule, _constant_rule, _shift_rule, _unsupported_op_rule,
    _pool_dilation_rule, _reduce_window_operands_rule, _conv_dilation_rule,
)


def tensor_size_problem(shape: tuple[int, ...], dtype: torch.dtype, size: int) -> str | None:
    """EVRF024's problem for one tensor of `shape` and `dtype` holding `size` bytes; None within the limit."""
    if size <= OUTPUT_TENSOR_LIMIT_BYTES:
        return None
    return (f"a tensor of {tuple(shape)} {dtype} is {size} bytes, above the 4 GB output-tensor limit "
            f"(2^32 = {OUTPUT_TENSOR_LIMIT_BYTES})")


def _tensor_size_rule(node: Node) -> Iterator[tuple[str, str]]:
    """EVRF024: a tensor above the 4 GB output-tensor limit (one finding per node: its largest tensor)."""
    sizes = [(t.numel() * t.element_size(), t) for t in _tensors(node.meta.get("val"))]
    sizes = [(size, t) for size, t in sizes if isinstance(size, int)]
    if sizes:
        size, tensor = max(sizes, key=lambda pair: pair[0])
        problem = tensor_size_problem(tuple(tensor.shape), tensor.dtype, size)
        if problem:
            yield "EVRF024", problem


def _node_violations(node: Node) -> Iterator[tuple[str, str]]:
    if node.op in ("call_function", "placeholder", "get_attr"):
        yield from _dtype_rule(node)
        yield from _tensor_size_rule(node)  # a graph output is some node's value, so it is checked there
    name = op_name(node.target) if node.op == "call_function" else None
    if name:
        for rule in NODE_RULES:
            yield from rule(node, name)


def compiler_violations(graph: Graph) -> list[Violation]:
    """Every node of `graph` that neuronx-cc would refuse, by the error-code pages' rules."""
    return [
        Violation(node.name, code, problem, source_line(node))
        for node in graph.nodes
        for code, problem in _node_violations(node)
    ]
