"""AWS's own NKI 0.2 kernels, run unchanged in the emulator (standing in for `nki`) from a checkout.

Sources: aws-neuron/aws-neuron-sdk at 3c46990d (the 0.2-API examples) and aws-neuron/nki-library
at 0759719 (the release matching SDK 2.28). Nothing of theirs is copied here: the tests export the
files from a local git clone named by an environment variable and import them from there; without
one (CI has no network) they skip, saying which variable to set:

    BMOJO_AWS_NEURON_SDK=/path/to/aws-neuron-sdk.git BMOJO_NKI_LIBRARY=/path/to/nki-library.git pytest ...

docs/kernels.md ("Conformance") records which kernels ran, which matched their references, and why
the others cannot run on NeuronCore-v2. The emulator fixes these kernels needed are tested by our
own small kernels in test_nki_rules.py / test_nki_language.py.
"""

from __future__ import annotations

import importlib
import io
import os
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from nki_kernels.emulator import NKILanguageWarning, as_nki, frontend

SDK_COMMIT = "3c46990de45d2ed76e22fe5990f8dcb6a7763f00"
LIBRARY_COMMIT = "0759719"
BF16 = ml_dtypes.bfloat16


def _export(env: str, commit: str, paths: list[str], dest: Path) -> Path:
    """`git archive` `paths` of `commit` from the clone named by $env into dest (or skip)."""
    repo = os.environ.get(env)
    if not repo:
        pytest.skip(f"AWS kernel sources not available: set {env} to a git clone of the repository "
                    f"(commit {commit}); CI has no network")
    try:
        blob = subprocess.run(["git", "-C", repo, "archive", commit, *paths], check=True, capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"{env}={repo}: cannot export {commit}: {exc}")
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def _import(root: Path, module: str):
    """Import `module` from the checkout at `root` with the emulator installed as `nki`."""
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    with as_nki():
        return importlib.import_module(module)


@pytest.fixture(scope="module")
def sdk(tmp_path_factory) -> Path:
    out = _export("BMOJO_AWS_NEURON_SDK", SDK_COMMIT, ["nki/examples"], tmp_path_factory.mktemp("sdk"))
    return out / "nki" / "examples"


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> Path:
    return _export("BMOJO_NKI_LIBRARY", LIBRARY_COMMIT, ["src"], tmp_path_factory.mktemp("nkilib")) / "src"


def _kernels(module) -> list:
    return [v for v in vars(module).values() if getattr(v, "__nki_jit__", False)]


RNG = np.random.default_rng(0)


# ----------------------------------------------------------------------------- aws-neuron-sdk examples
def test_tensor_addition_example(sdk):
    mod = _import(sdk, "tensor_addition.tensor_addition_nki_kernels")
    a, b = RNG.random((256, 1024)).astype(BF16), RNG.random((256, 1024)).astype(BF16)
    out = mod.nki_tensor_add(a, b)
    expected = (a.astype(np.float32) + b.astype(np.float32)).astype(BF16)
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("name,shape", [
    ("nki_matmul_basic_", (64, 128, 512)), ("nki_matmul_tiled_", (256, 256, 1024)),
    ("nki_matmul_hoist_load_", (256, 256, 1024)), ("nki_matmul_block_free_dimension_", (256, 256, 1024)),
    ("nki_matmul_fully_optimized_", (2048, 1024, 1024)),  # its smallest legal shape (blocks of 16x2x8 tiles)
])
def test_matrix_multiplication_examples(sdk, name, shape):
    """All five kernels of the tutorial, bf16 as its torch driver runs them, checked as it checks them:
    allclose(torch.matmul, out, atol=1e-4, rtol=1e-2) (matrix_multiplication_torch.py)."""
    mod = _import(sdk, "matrix_multiplication.matrix_multiplication_nki_kernels")
    m, k, n = shape
    lhs, rhs = RNG.random((m, k)).astype(BF16), RNG.random((k, n)).astype(BF16)
    out = getattr(mod, name)(np.ascontiguousarray(lhs.T), rhs).astype(np.float64)
    expected = lhs.astype(np.float64) @ rhs.astype(np.float64)
    assert np.allclose(expected, out, atol=1e-4, rtol=1e-2)


# ----------------------------------------------------------------------------- nki-library
def test_cumsum(library):
    """Reference and tolerances of nki-library's test_cumsum.py: fp32 cumsum cast to the input dtype,
    absolute 1e-3, relative 1e-3 (fp32) / 1e-2 (bf16); shapes from its fast set (two partition tiles)."""
    mod = _import(library, "nkilib_src.nkilib.core.cumsum.cumsum")
    for shape, dtype, rtol in (((64, 4, 2048), BF16, 1e-2), ((130, 1024), np.float32, 1e-3)):
        x = RNG.standard_normal(shape).astype(dtype)
        out = mod.cumsum(x)
        golden = np.cumsum(x.astype(np.float32), axis=-1).astype(dtype)
        assert out.dtype == golden.dtype
        assert np.allclose(out.astype(np.float32), golden.astype(np.float32), atol=1e-3, rtol=rtol)


# ----------------------------------------------------------------------------- the front end accepts them
FRONT_END_MODULES = [
    ("sdk", "tensor_addition.tensor_addition_nki_kernels"),
    ("sdk", "matrix_multiplication.matrix_multiplication_nki_kernels"),
    ("library", "nkilib_src.nkilib.core.cumsum.cumsum"),
    ("library", "nkilib_src.nkilib.core.embeddings.rope_hf"),
]


@pytest.mark.parametrize("source,module", FRONT_END_MODULES)
def test_front_end_finds_nothing_in_aws_kernels(request, source, module):
    """The language front end's reference set: AWS's 0.2 kernels raise no error and no warning."""
    mod = _import(request.getfixturevalue(source), module)
    kernels = _kernels(mod)
    assert kernels
    with warnings.catch_warnings():
        warnings.simplefilter("error", NKILanguageWarning)
        for kernel in kernels:
            assert frontend._Checker().run(kernel.__nki_func__) == [], kernel.__name__
