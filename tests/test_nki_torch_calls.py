"""How bmojo_neuron hands tensors to the `nki.jit` kernels, and the call forms NKI 0.2.0 refuses.

Sources (aws-neuron/aws-neuron-sdk at 3c46990d): nki/api/nki/__init__.py (`jit(func=None,
mode="auto", **kwargs)`, modes "jax", "torchxla", "auto"), nki/api/nki/language/__init__.py
(the data types: no float64), nki/deep-dives/nki-migration-guide.rst ("Remove nki.jit
decorator on sub-kernels"), nki/guides/framework_custom_op.rst (kernels called on tensors on
`xm.xla_device()`, inside a `torch.autograd.Function`).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from emulator_helpers import load, rand, store

from bmojo_neuron import ops
from bmojo_neuron.ops import nki_backend
from bmojo_neuron.ops.reference.selective_scan import selective_scan as scan_ref
from nki_kernels import compat
from nki_kernels.emulator import Kernel, nki, nl


def _copy_kernel(a):
    return store(load(a))


# ----------------------------------------------------------------------------- nki.jit
@pytest.mark.parametrize("mode", ["baremetal", "simulation", "torch"])
def test_jit_rejects_modes_nki_020_does_not_support(mode):
    with pytest.raises(ValueError, match=rf"mode must be one of \['jax', 'torchxla', 'auto'\].*{mode!r}"):
        nki.jit(_copy_kernel, mode=mode)
    with pytest.raises(ValueError, match="mode must be one of"):
        nki.jit(mode=mode)


@pytest.mark.parametrize("mode", ["auto", "torchxla", "jax", "trace"])  # "trace": nki-library 0759719 passes it
def test_jit_supported_modes_and_extra_keywords_run_the_kernel(mode):
    a = rand(128, 64)
    kernel = nki.jit(mode=mode, platform_target="trn1")(_copy_kernel)  # **kwargs accepted, as in the stub
    np.testing.assert_array_equal(kernel(a), a)


def test_jit_kernel_called_from_inside_a_kernel_raises():
    """Reached through a container, the sub-kernel escapes the source check (frontend) and is
    refused when called; named directly, the frontend refuses it before the kernel runs."""
    subs = {"copy": nki.jit(_copy_kernel)}

    @nki.jit
    def outer(a):
        return subs["copy"](a)

    with pytest.raises(TypeError, match=r"_copy_kernel is an @nki.jit kernel called from inside another kernel"):
        outer(rand(128, 64))
    # the undecorated function is the 0.2 way to call a sub-kernel
    a = rand(128, 64)
    np.testing.assert_array_equal(nki.jit(lambda x: _copy_kernel(x))(a), a)


@pytest.mark.parametrize("dtype", [np.float64, np.int64])
def test_jit_kernel_refuses_arguments_without_an_nki_dtype(dtype):
    with pytest.raises(TypeError, match=rf"kernel argument 0 has dtype {np.dtype(dtype).name}, which is not"):
        nki.jit(_copy_kernel)(np.zeros((128, 4), dtype=dtype))


# ----------------------------------------------------------------------------- the runners
class _FakeXlaTensor:
    """Just what the device runner reads of a tensor: its device, its dtype, `.float()`."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.device, self.dtype = torch.device("xla"), dtype

    def float(self) -> "_FakeXlaTensor":
        return _FakeXlaTensor(torch.float32)


@pytest.mark.parametrize("dtype,expected", [(torch.float64, torch.float32), (torch.float32, torch.float32),
                                            (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16)])
def test_device_and_emulator_runners_hand_kernels_the_same_dtypes(dtype, expected):
    assert nki_backend.device_runner().to_kernel(_FakeXlaTensor(dtype)).dtype == expected
    emulated = nki_backend.emulator_runner().to_kernel(torch.zeros(3, dtype=dtype))
    assert str(emulated.dtype) == str(expected).removeprefix("torch.")
    assert nki_backend.device_runner().to_kernel(None) is None


def test_device_runner_refuses_tensors_off_the_xla_device():
    with pytest.raises(ValueError, match=r"ops backend 'nki' needs tensors on the XLA device, got one on cpu"):
        nki_backend.device_runner().to_kernel(torch.zeros(3))


def test_emulator_runner_calls_the_jit_kernel_object(monkeypatch):
    """nki-sim goes through `Kernel.__call__`, the call the device runner makes on the real `nki.jit` object."""
    calls = []
    original = Kernel.__call__

    def counted(self, *args, **kwargs):
        calls.append((self.__name__, len(args), kwargs))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Kernel, "__call__", counted)
    g = torch.Generator().manual_seed(0)
    u, delta = torch.randn(1, 4, 128, generator=g), torch.rand(1, 4, 128, generator=g) * 0.1
    A, B, C = -torch.rand(4, 2, generator=g), torch.randn(1, 2, 128, generator=g), torch.randn(1, 2, 128, generator=g)
    y = nki_backend.emulator_ops()["selective_scan"](u.double(), delta.double(), A, B, C)
    expected = scan_ref(u, delta, A, B, C)
    assert y.dtype == torch.float64  # float64 inputs run as float32 and come back in the input's dtype
    torch.testing.assert_close(y.float(), expected, rtol=1e-4, atol=1e-5)
    assert calls == [("selective_scan_fwd", 11, {})], calls  # every parameter positional, kwargs none


def test_nki_sim_unavailable_where_the_kernels_bind_the_real_nki(monkeypatch):
    monkeypatch.setattr(compat, "NKI_AVAILABLE", True)
    ok, reason = ops.available_backends()["nki-sim"]
    assert ok is False and "bound to the real NKI" in reason
