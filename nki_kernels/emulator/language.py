"""Emulated `nki.language` (NKI 0.2.0): buffers, dtypes, creation, loop ranges, tile sizes, ops.

Signatures follow the 0.2.0 stub (`nki/api/nki/language/__init__.py` at aws-neuron-sdk
3c46990d). The arithmetic operators (`add`, `multiply`, ...) and activation functions
(`exp`, `softplus`, ...) are *identifiers* passed to `nisa` instructions through `op=`;
as in 0.2.0, calling one directly on tiles is not supported.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from . import core
from .core import BFLOAT16, allocate

# ---------------------------------------------------------------- dtypes (NumPy dtypes)
bool_ = np.dtype(np.uint8)
int8, int16, int32 = np.dtype(np.int8), np.dtype(np.int16), np.dtype(np.int32)
uint8, uint16, uint32 = np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.uint32)
float16, float32 = np.dtype(np.float16), np.dtype(np.float32)
bfloat16 = BFLOAT16
tfloat32 = np.dtype(np.float32)  # same storage; the PE array rounds inputs, we do not model it

# ---------------------------------------------------------------- buffers
sbuf, psum, hbm, shared_hbm, private_hbm = core.SBUF, core.PSUM, core.HBM, core.SHARED_HBM, core.PRIVATE_HBM


class tile_size:  # noqa: N801 - NKI's name
    """Tile size constants of NeuronCore-v2 (Trn1)."""

    pmax: int = core.PMAX
    psum_fmax: int = core.PSUM_BANK_BYTES // 4
    gemm_stationary_fmax: int = core.GEMM_STATIONARY_FMAX
    gemm_moving_fmax: int = core.GEMM_MOVING_FMAX
    bn_stats_fmax: int = 512
    psum_min_align: int = 4
    sbuf_min_align: int = 1
    total_available_sbuf_size: int = core.SBUF_BYTES_PER_PARTITION * core.PMAX


# ---------------------------------------------------------------- creation
def ndarray(shape, dtype, buffer=None, name=""):
    """New tensor in `buffer` (default sbuf), filled with NaN so uninitialised reads show."""
    return allocate(shape, dtype, buffer, name, fill="nan", instr="nl.ndarray")


def zeros(shape, dtype, buffer=None, name=""):
    """New tensor filled with zeros; on chip this is a memset, charged like `nisa.memset`."""
    tensor = allocate(shape, dtype, buffer, name, fill=0, instr="nl.zeros")
    if tensor.buffer in core.ON_CHIP:
        engine = "vector" if tensor.buffer == core.PSUM else "gpsimd"
        core.state().charge(engine, max(core.MIN_II, tensor.free_size) + core.ACCESS_OVERHEAD)
    return tensor


def ds(start, size):
    """Dynamic slice `start:start+size`."""
    return core.DynSlice(start, size)


# ---------------------------------------------------------------- loop ranges (the emulator runs them in order)
def affine_range(start, stop=None, step=1):
    return range(start, stop, step) if stop is not None else range(start)


def sequential_range(start, stop=None, step=1):
    return range(start, stop, step) if stop is not None else range(start)


def static_range(start, stop=None, step=1):
    return range(start, stop, step) if stop is not None else range(start)


def program_id(axis):
    return 0


def num_programs(axes=None):
    return 1


def program_ndim():
    return 0


def device_print(print_prefix, tensor):
    print(print_prefix, tensor.numpy())


# ---------------------------------------------------------------- operators and activation functions
class _Op:
    """An ALU operator or activation function identifier (`op=` of nisa instructions)."""

    def __init__(self, name: str, fn: Callable[..., np.ndarray], kind: str) -> None:
        self.name, self.fn, self.kind = name, fn, kind
        self.__name__ = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(
            f"nl.{self.name} on tiles is not supported in NKI 0.2.0; pass it as op= to a nisa instruction")

    def __repr__(self) -> str:
        return f"nl.{self.name}"


def _alu(name: str, fn: Callable[..., np.ndarray]) -> _Op:
    return _Op(name, fn, "alu")


def _act(name: str, fn: Callable[[np.ndarray], np.ndarray]) -> _Op:
    return _Op(name, fn, "act")


def _softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(np.float32(0), x).astype(np.float32)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return (1.0 / (1.0 + np.exp(-x))).astype(np.float32)


def _silu_dx(x: np.ndarray) -> np.ndarray:
    s = _sigmoid(x)
    return (s * (1.0 + x * (1.0 - s))).astype(np.float32)


add = _alu("add", np.add)
subtract = _alu("subtract", np.subtract)
multiply = _alu("multiply", np.multiply)
divide = _alu("divide", np.divide)
maximum = _alu("maximum", np.maximum)
minimum = _alu("minimum", np.minimum)
power = _alu("power", np.power)
equal = _alu("equal", lambda a, b: (a == b).astype(np.float32))
not_equal = _alu("not_equal", lambda a, b: (a != b).astype(np.float32))
greater = _alu("greater", lambda a, b: (a > b).astype(np.float32))
greater_equal = _alu("greater_equal", lambda a, b: (a >= b).astype(np.float32))
less = _alu("less", lambda a, b: (a < b).astype(np.float32))
less_equal = _alu("less_equal", lambda a, b: (a <= b).astype(np.float32))

copy = _act("copy", lambda x: x)
exp = _act("exp", np.exp)
log = _act("log", np.log)
softplus = _act("softplus", _softplus)
sigmoid = _act("sigmoid", _sigmoid)
silu = _act("silu", lambda x: x * _sigmoid(x))
silu_dx = _act("silu_dx", _silu_dx)
tanh = _act("tanh", np.tanh)
square = _act("square", np.square)
relu = _act("relu", lambda x: np.maximum(x, 0))
sqrt = _act("sqrt", np.sqrt)
rsqrt = _act("rsqrt", lambda x: 1.0 / np.sqrt(x))
reciprocal = _act("reciprocal", lambda x: 1.0 / x)
abs = _act("abs", np.abs)  # noqa: A001 - NKI's name
sign = _act("sign", np.sign)

ARITHMETIC_OPS = (add, subtract, multiply, divide, maximum, minimum, power, equal, not_equal,
                  greater, greater_equal, less, less_equal)
ACTIVATIONS = (copy, exp, log, softplus, sigmoid, silu, silu_dx, tanh, square, relu, sqrt, rsqrt,
               reciprocal, abs, sign)
