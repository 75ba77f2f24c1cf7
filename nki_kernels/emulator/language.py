"""Emulated `nki.language` (NKI 0.2.0): buffers, dtypes, creation, loop ranges, tile sizes, ops.

Signatures follow the 0.2.0 stub (`nki/api/nki/language/__init__.py` at aws-neuron-sdk
3c46990d). The operators (`add`, `multiply`, ...) and activation functions (`exp`,
`softplus`, ...) are *identifiers* passed to `nisa` instructions through `op=`; as in
0.2.0, calling one directly on tiles is not supported. Which identifier an instruction
accepts comes from the two tables of `nki/api/nki.api.shared.rst`: the ALU operator
table ("Supported Math Operators for NKI ISA", with its "Legal Reduction op" column)
and the activation-function table ("Supported Activation Functions", with each
function's valid input range). `nl.divide` exists in `nki.language` but is in neither
table, so no instruction takes it as `op=`.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable

import ml_dtypes
import numpy as np

from . import core, launch
from .core import BFLOAT16, allocate
from .loops import AffineLoops


class _NKIClass(type):
    """Builds NKI class instances as the compiler does: `@dataclass` changes nothing (guide line 449),
    so a class with no `__init__` written in it or its bases gets `NKIObject.__init__` even
    when `dataclasses` generated one (whose fields would leave out un-annotated attributes)."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if any(vars(klass).get("_nki_own_init") for klass in cls.__mro__):
            return super().__call__(*args, **kwargs)
        obj = cls.__new__(cls)
        NKIObject.__init__(obj, *args, **kwargs)
        return obj


class NKIObject(metaclass=_NKIClass):
    """Base class every user class in a NKI kernel must inherit (and no other class).

    NKI language guide, "Class Support": the compiler only brings in class definitions
    that derive from `NKIObject`; `nki_kernels.emulator.frontend` enforces it. "In NKI all
    classes are similar to Python data classes ... The @dataclass decorator is optional":
    a class without an `__init__` of its own gets one taking its fields, in order, as
    optional arguments (default: the class value, else None), which then calls
    `__post_init__` (guide lines 449-462). nki-library relies on it: `SectionParams(section_idx=...)`
    (`core/attention/attention_cte.py` line 810) declares plain class attributes and no `__init__`.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._nki_own_init = "__init__" in vars(cls)  # written in the class body, before any decorator runs

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        fields = _fields(type(self))
        if len(args) > len(fields):
            raise TypeError(f"{type(self).__name__}() takes {len(fields)} field arguments, got {len(args)}")
        values = dict(zip(fields, args))
        for name, value in kwargs.items():
            if name not in fields:
                raise TypeError(f"{type(self).__name__}() got an unexpected keyword argument {name!r}")
            if name in values:
                raise TypeError(f"{type(self).__name__}() got multiple values for argument {name!r}")
            values[name] = value
        for name in fields:  # as a dataclass initialiser does, also for a frozen one
            object.__setattr__(self, name, values.get(name, getattr(type(self), name, None)))
        post_init = getattr(self, "__post_init__", None)
        if post_init is not None:
            post_init()


def _fields(cls: type) -> list[str]:
    """A NKI class's fields: annotated names, then other plain class attributes, base classes first."""
    fields: list[str] = []
    for klass in reversed(cls.__mro__):
        if klass is object or klass is NKIObject:
            continue
        names = [*vars(klass).get("__annotations__", {}), *vars(klass)]
        for name in names:
            value = vars(klass).get(name)
            plain = not (callable(value) or isinstance(value, (property, staticmethod, classmethod)))
            if not name.startswith("__") and name != "_nki_own_init" and plain and name not in fields:
                fields.append(name)
    return fields


# ---------------------------------------------------------------- dtypes (NumPy dtypes)
bool_ = np.dtype(np.uint8)  # "boolean stored as uint8" (nki.api.shared.rst, dtype table)
int8, int16, int32 = np.dtype(np.int8), np.dtype(np.int16), np.dtype(np.int32)
uint8, uint16, uint32 = np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.uint32)
float16, float32 = np.dtype(np.float16), np.dtype(np.float32)
bfloat16 = BFLOAT16
tfloat32 = np.dtype(np.float32)  # same storage; the PE array rounds inputs, we do not model it
float8_e4m3 = np.dtype(ml_dtypes.float8_e4m3)
float8_e5m2 = np.dtype(ml_dtypes.float8_e5m2)
float8_e4m3fn = np.dtype(ml_dtypes.float8_e4m3fn)
# packed types of the 0.2.0 stub the emulator cannot store (nki-library names them in size tables)
float8_e5m2_x4 = core.NotEmulatedDtype("float8_e5m2_x4")
float8_e4m3fn_x4 = core.NotEmulatedDtype("float8_e4m3fn_x4")
float4_e2m1fn_x4 = core.NotEmulatedDtype("float4_e2m1fn_x4")

# ---------------------------------------------------------------- shared constants
def shared_constant(constant: np.ndarray, dtype: Any = None) -> core.NkiTensor:
    """An HBM tensor holding `constant` (a trace-time tensor of `nki.tensor`), as `dtype`.

    The 0.2.0 stub (`nki/api/nki/language/__init__.py` lines 97-149) says `dtype` "must be
    specified", yet declares it `dtype=None` and nki-library calls
    `nl.shared_constant(ntensor.identity(P_MAX, nl.int8))` (`core/subkernels/
    find_nonzero_indices.py` line 138): without one the constant keeps its own dtype. The data
    are fixed at compile time, so building the tensor costs no instruction.
    """
    if not isinstance(constant, np.ndarray):
        raise TypeError(f"nl.shared_constant: constant must be a trace-time tensor of nki.tensor (zeros, identity, "
                        f"arange), got {type(constant).__name__}")
    target = constant.dtype if dtype is None else core.as_dtype(dtype)
    return core.wrap_hbm(np.ascontiguousarray(constant.astype(target)), name="shared_constant")


def shared_identity_matrix(n: int, dtype: Any = "uint8") -> core.NkiTensor:
    """An n x n identity matrix as a shared constant (stub line 151: "the same behavior" as
    `shared_constant`, default dtype uint8)."""
    return shared_constant(np.eye(n), dtype)


# ---------------------------------------------------------------- buffers
sbuf, psum, hbm, shared_hbm, private_hbm = core.SBUF, core.PSUM, core.HBM, core.SHARED_HBM, core.PRIVATE_HBM


class tile_size(NKIObject):  # noqa: N801 - NKI's name
    """Tile size constants of NeuronCore-v2 (Trn1).

    `total_available_sbuf_size` is bytes *per partition* a kernel may allocate: nki-library
    uses it as the upper bound of its per-partition SBUF allocator (`utils/allocator.py`),
    and reserves the dynamic-DMA scratch and an accelerator word below the physical size
    (`mlp_cte_constants.py`: MAX_AVAILABLE_SBUF_SIZE); core.usable_sbuf_bytes_per_partition gives it
    per generation, this is the emulated NeuronCore-v2's.
    """

    pmax: int = core.PMAX
    psum_fmax: int = core.PSUM_BANK_BYTES // 4
    gemm_stationary_fmax: int = core.GEMM_STATIONARY_FMAX
    gemm_moving_fmax: int = core.GEMM_MOVING_FMAX
    bn_stats_fmax: int = 512
    # The stub declares both (nki/api/nki/language/__init__.py lines 327-331 at 3c46990d) without a value, and
    # no SDK doc or nki-library kernel (0759719) gives or uses one: placeholders, not enforced (docs/kernels.md).
    psum_min_align: int = 4
    sbuf_min_align: int = 1
    total_available_sbuf_size: int = core.SBUF_USABLE_BYTES_PER_PARTITION


# ---------------------------------------------------------------- creation
def ndarray(shape, dtype, buffer=None, name="", address=None):
    """New tensor in `buffer` (default sbuf), filled with NaN so uninitialised reads show.

    `address` (the migration guide's manual placement, (partition, byte offset): bytes as in
    its PSUM example and the SDK's allocator.rst, docs/kernels.md "The emulator") must fit the
    buffer and takes the tile out of the live-tile count; tiles placed at overlapping addresses
    share their bytes (`core.allocate`). A PSUM address must start a bank
    (nki-migration-guide.rst: "The allocation for PSUM tensors must start at the beginning
    of each bank - the compiler will throw an error otherwise").
    """
    if address is not None and buffer == psum and int(address[1]) % core.PSUM_BANK_BYTES:
        raise core.rule_error("nl.ndarray", f"a PSUM address must start a bank (a multiple of "
                              f"{core.PSUM_BANK_BYTES} bytes)", f"address={tuple(address)}, shape {tuple(shape)}")
    return allocate(shape, dtype, buffer, name, fill="nan", instr="nl.ndarray", address=address)


def zeros(shape, dtype, buffer=None, name=""):
    """New tensor filled with zeros; on chip this is a memset, charged like `nisa.memset`."""
    tensor = allocate(shape, dtype, buffer, name, fill=0, instr="nl.zeros")
    if tensor.buffer in core.ON_CHIP:
        engine = "vector" if tensor.buffer == core.PSUM else "gpsimd"
        core.state().issue(engine, "nl.zeros", max(core.MIN_II, tensor.free_size), reads=(), writes=(tensor,))
    return tensor


def ds(start, size):
    """Dynamic slice `start:start+size`."""
    return core.DynSlice(start, size)


# ---------------------------------------------------------------- loop ranges (the emulator runs them in order)
def _range_values(name: str, start: Any, stop: Any, step: Any) -> range:
    """The iterations of `affine_range` / `static_range(start, stop=None, step=1)` (the stub's signature,
    nki/api/nki/language/__init__.py lines 166 and 288): range(start) without a stop, else range(start,
    stop, step). A step given without a stop (`affine_range(8, step=2)`) has no documented meaning (the
    stubs' examples pass one argument or a stop), so it is refused rather than dropped."""
    if stop is None:
        if step != 1:
            raise core.rule_error(f"nl.{name}", "a step without a stop is not documented: not emulated",
                                  f"start={start!r}, step={step!r}")
        return range(start)
    return range(start, stop, step)


def affine_range(start, stop=None, step=1):
    """The iterations in order; a dependency between two iterations (a read or overwrite of what
    another wrote, an overwrite of what another read) is warned about (`loops.AffineLoops`: the
    compiler may reorder the iterations), in cost-only runs too: the check keeps one record per
    distinct access, not per element (docs/kernels.md, "Loop-carried dependencies")."""
    values = _range_values("affine_range", start, stop, step)
    run = core.state()
    if run.affine_loops is None:
        run.affine_loops = AffineLoops()
    return run.affine_loops.iterate(values)


def sequential_range(*args, **kwargs):
    """The iterations in order. The stub's signature is `sequential_range(start, stop, step)`, all three
    required (nki/api/nki/language/__init__.py line 235), while its example (line 271), its note that the
    compiler replaces "any use of Python range(...)" with it (line 244), the language guide (every range
    "equivalent ... to the basic range loop", nki-language-guide.rst line 344) and every call in the SDK's
    0.2 docs and nki-library 0759719 pass Python range's positional forms (stop) or (start, stop[, step]).
    So exactly those are accepted, and keywords only as the stub names them, all three given; other
    forms (`sequential_range(8, step=2)`, a lone `stop=8`) are TypeErrors, as both the stub's signature
    and range refuse them."""
    if kwargs:
        try:
            bound = inspect.signature(_SEQUENTIAL_RANGE_STUB).bind(*args, **kwargs)
        except TypeError as err:
            raise TypeError(f"sequential_range{_call_text(args, kwargs)}: {err}; it takes range's positional "
                            "forms (stop), (start, stop), (start, stop, step), or the stub's keywords start=, "
                            "stop=, step= all three (nki/api/nki/language/__init__.py line 235)") from None
        args = tuple(bound.arguments[name] for name in ("start", "stop", "step"))
    if not 1 <= len(args) <= 3:
        raise TypeError(f"sequential_range{_call_text(args, kwargs)}: takes 1 to 3 positional arguments as range "
                        f"does, got {len(args)}")
    return range(*args)


def _SEQUENTIAL_RANGE_STUB(start, stop, step):  # noqa: N802 - the 0.2.0 stub's signature (line 235)
    """Only its signature is used: what keyword calls of `sequential_range` must bind to."""


def _call_text(args: tuple, kwargs: dict) -> str:
    return "(" + ", ".join([repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]) + ")"


def static_range(start, stop=None, step=1):
    return _range_values("static_range", start, stop, step)


# ---------------------------------------------------------------- the launch grid (rules in `launch`)
def program_id(axis):
    """Index of the running program along `axis` of the launch grid (0 without one)."""
    return launch.program_id(axis)


def num_programs(axes=None):
    """Programs along `axes` of the launch grid, all of them when None (1 without a grid)."""
    return launch.num_programs(axes)


def program_ndim():
    """Axes of the launch grid: 0 for `kernel(...)`, 1 for `kernel[n](...)`."""
    return launch.program_ndim()


def __getattr__(name: str) -> Any:
    # the beta's SPMD grid helpers, named in the SDK's tutorials: say what 0.2.0 takes instead
    if name in ("spmd_dim", "nc"):
        raise AttributeError(launch.NOT_IN_0_2.format(name=name))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def device_print(print_prefix, tensor):
    """Print `tensor` after `print_prefix`. The 0.2.0 stub: the prefix is a string constant
    evaluated at trace time, and the tensor is in SBUF or HBM (not PSUM)."""
    if not isinstance(print_prefix, str):
        raise core.rule_error("nl.device_print", "print_prefix must be a constant string (nki.language stub)",
                              f"got {type(print_prefix).__name__}")
    if tensor.buffer == core.PSUM:
        raise core.rule_error("nl.device_print", "the tensor must be in SBUF or HBM (nki.language stub)",
                              f"{tensor!r}")
    print(print_prefix, tensor.numpy())


# ---------------------------------------------------------------- operators and activation functions
class _Op:
    """An operator or activation-function identifier (`op=` of nisa instructions).

    `kinds` says which table lists it: "arith" / "bitvec" (the ALU operator table),
    "act" (the activation-function table); `reducible` is the table's "Legal Reduction
    op" column; `valid` is the activation table's valid input range as (lo, hi) on |x|
    when `symmetric`, else on x.
    """

    def __init__(self, name: str, fn: Callable[..., np.ndarray] | None, kinds: tuple[str, ...],
                 reducible: bool = False, act_fn: Callable[[np.ndarray], np.ndarray] | None = None,
                 valid: tuple[float, float] | None = None, symmetric: bool = False, unary: bool = False,
                 reducer: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        self.name, self.fn, self.kinds, self.reducible = name, fn, frozenset(kinds), reducible
        self.reducer = reducer  # reduces the last axis (tensor_reduce)
        self.act_fn, self.valid, self.symmetric, self.unary = act_fn, valid, symmetric, unary
        self.__name__ = name

    def is_(self, kind: str) -> bool:
        return kind in self.kinds

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(
            f"nl.{self.name} on tiles is not supported in NKI 0.2.0; pass it as op= to a nisa instruction")

    def __repr__(self) -> str:
        return f"nl.{self.name}"


def _f32(fn: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
    def wrapped(*args: Any) -> np.ndarray:
        with np.errstate(all="ignore"):
            return np.asarray(fn(*args), dtype=np.float32)

    return wrapped


def _fold(fn: Callable[..., np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """Reduce the last axis by applying a binary `fn` left to right (ufuncs use their own reduce)."""
    if isinstance(fn, np.ufunc):
        return lambda x: fn.reduce(x, axis=-1)

    def reduce(x: np.ndarray) -> np.ndarray:
        out = x[..., 0]
        for i in range(1, x.shape[-1]):
            out = fn(out, x[..., i])
        return out

    return reduce


def _arith(name: str, fn: Callable[..., np.ndarray], reducible: bool = False, unary: bool = False,
           act: Callable[[np.ndarray], np.ndarray] | None = None, valid=None, symmetric=False) -> _Op:
    kinds = ("arith", "act") if act is not None else ("arith",)
    return _Op(name, _f32(fn), kinds, reducible, act_fn=_f32(act) if act else None, valid=valid,
               symmetric=symmetric, unary=unary, reducer=_f32(_fold(fn)) if reducible else None)


def _bitvec(name: str, fn: Callable[..., np.ndarray], reducible: bool = False, unary: bool = False) -> _Op:
    return _Op(name, fn, ("bitvec",), reducible, unary=unary, reducer=_fold(fn) if reducible else None)


def _act(name: str, fn: Callable[[np.ndarray], np.ndarray], valid=None, symmetric=False) -> _Op:
    return _Op(name, None, ("act",), act_fn=_f32(fn), valid=valid, symmetric=symmetric)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


_ERF = np.vectorize(math.erf, otypes=[np.float64])


def _erf(x: np.ndarray) -> np.ndarray:
    return _ERF(np.asarray(x, dtype=np.float64))


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def _gelu_dx(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + _erf(x / math.sqrt(2.0))) + x * np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _silu_dx(x: np.ndarray) -> np.ndarray:
    s = _sigmoid(x)
    return s * (1.0 + x * (1.0 - s))


def _softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, x)


def _truthy(a: np.ndarray) -> np.ndarray:
    return np.asarray(a) != 0


# ALU operator table ("Supported Math Operators for NKI ISA"): bitvec rows
invert = _bitvec("invert", lambda a, b=None: np.invert(a), unary=True)
bitwise_and = _bitvec("bitwise_and", np.bitwise_and, reducible=True)
bitwise_or = _bitvec("bitwise_or", np.bitwise_or, reducible=True)
bitwise_xor = _bitvec("bitwise_xor", np.bitwise_xor, reducible=True)
left_shift = _bitvec("left_shift", np.left_shift)
right_shift = _bitvec("right_shift", np.right_shift)
# arithmetic rows (computed in fp32); rsqrt / reciprocal / abs are also activation functions
add = _arith("add", np.add, reducible=True)
subtract = _arith("subtract", np.subtract, reducible=True)
multiply = _arith("multiply", np.multiply, reducible=True)
maximum = _arith("maximum", np.maximum, reducible=True)
minimum = _arith("minimum", np.minimum, reducible=True)
equal = _arith("equal", lambda a, b: a == b)
not_equal = _arith("not_equal", lambda a, b: a != b)
greater_equal = _arith("greater_equal", lambda a, b: a >= b)
greater = _arith("greater", lambda a, b: a > b)
less_equal = _arith("less_equal", lambda a, b: a <= b)
less = _arith("less", lambda a, b: a < b)
logical_and = _arith("logical_and", lambda a, b: _truthy(a) & _truthy(b), reducible=True)
logical_or = _arith("logical_or", lambda a, b: _truthy(a) | _truthy(b), reducible=True)
logical_xor = _arith("logical_xor", lambda a, b: _truthy(a) ^ _truthy(b), reducible=True)
rsqrt = _arith("rsqrt", lambda a, b=None: 1.0 / np.sqrt(a), unary=True, act=lambda x: 1.0 / np.sqrt(x),
               valid=(2.0 ** -87, 2.0 ** 97))
reciprocal = _arith("reciprocal", lambda a, b=None: 1.0 / a, unary=True, act=lambda x: 1.0 / x,
                    valid=(2.0 ** -42, 2.0 ** 42), symmetric=True)
abs = _arith("abs", lambda a, b=None: np.abs(a), unary=True, act=np.abs)  # noqa: A001 - NKI's name
power = _arith("power", np.power)
# in nki.language but in neither table: no instruction accepts it as op=
divide = _Op("divide", _f32(np.divide), ())
logical_not = _Op("logical_not", _f32(lambda a: np.asarray(a) == 0), ())

# activation-function table ("Supported Activation Functions for NKI ISA") with valid input ranges
copy = _act("copy", lambda x: x)
square = _act("square", np.square)
sigmoid = _act("sigmoid", _sigmoid)
relu = _act("relu", lambda x: np.maximum(x, 0))
gelu = _act("gelu", _gelu)
gelu_dx = _act("gelu_dx", _gelu_dx)
gelu_apprx_tanh = _act("gelu_apprx_tanh", _gelu_tanh)
gelu_apprx_sigmoid = _act("gelu_apprx_sigmoid", lambda x: x * _sigmoid(1.702 * x))
gelu_apprx_sigmoid_dx = _act("gelu_apprx_sigmoid_dx",
                             lambda x: _sigmoid(1.702 * x) * (1.0 + 1.702 * x * (1.0 - _sigmoid(1.702 * x))))
silu = _act("silu", lambda x: x * _sigmoid(x))
silu_dx = _act("silu_dx", _silu_dx)
tanh = _act("tanh", np.tanh)
softplus = _act("softplus", _softplus)
mish = _act("mish", lambda x: x * np.tanh(_softplus(x)))
erf = _act("erf", _erf)
erf_dx = _act("erf_dx", lambda x: 2.0 / math.sqrt(math.pi) * np.exp(-x * x))
exp = _act("exp", np.exp)
log = _act("log", np.log, valid=(2.0 ** -64, 2.0 ** 64))
sin = _act("sin", np.sin, valid=(-math.pi, math.pi))
arctan = _act("arctan", np.arctan, valid=(-math.pi / 2, math.pi / 2))
sqrt = _act("sqrt", np.sqrt, valid=(2.0 ** -116, 2.0 ** 118))
sign = _act("sign", np.sign)

ALU_OPS = tuple(op for op in globals().values() if isinstance(op, _Op) and op.kinds & {"arith", "bitvec"})
ACTIVATIONS = tuple(op for op in globals().values() if isinstance(op, _Op) and op.is_("act"))
