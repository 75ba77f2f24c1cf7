"""Recorded training numbers that a change to the trainer must reproduce bit for bit.

`tests/golden/training_baseline.json` holds, per named run, every record of its
``metrics.jsonl`` (per-step loss, lm loss, aux loss, gradient norm and lr; eval loss,
perplexity and recall) and a fingerprint of its final weights: a SHA-256 over every
tensor's name, dtype, shape and bytes, and per tensor the float64 sum and sum of
squares. The runs are seeded and run on CPU with one thread, so on the machine and
torch build that recorded them the numbers repeat exactly, and `check_run` compares
them with ``==``. Elsewhere (another CPU model or torch version, where
kernels may round differently) it compares with rtol 1e-5, still far tighter than any
change to the algorithm moves a loss.

After an intended change of the numbers, regenerate and review the diff:

    BMOJO_UPDATE_GOLDEN=1 python -m pytest -q tests/test_training_baseline.py \\
        tests/test_pipeline_training.py tests/test_parallel_training.py

(every test file that calls `check_run`: each records its own runs in the one file).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from bmojo_neuron.ops import dispatch

GOLDEN = Path(__file__).parent / "golden" / "training_baseline.json"
# The recipe the recorded runs start from (the default recipe when they were recorded).
RECORDED_RECIPE = str(Path(__file__).parent / "golden" / "recorded-recipe.yaml")
UPDATE = os.environ.get("BMOJO_UPDATE_GOLDEN") == "1"
TOLERANCE = 1e-5  # relative, used only where the recording environment differs


@contextmanager
def reference_ops() -> Iterator[None]:
    """The torch reference ops (``BMOJO_OPS_BACKEND=torch``) for this process and the ranks it starts.

    The recorded numbers are the reference's, bit for bit, and check the trainer. The default
    backend's C kernels (docs/ops.md, "The default: auto") agree with the reference only to
    float32 round-off (tests/test_cpu_c*.py check that), and their bits would move with every
    edit of the C code, so the recorded runs keep the reference."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(dispatch.ENV_VAR, "torch")
        patch.setattr(dispatch, "_active", {})
        yield


@pytest.fixture(scope="module")
def reference_ops_for_module() -> Iterator[None]:
    """`reference_ops` for a whole test module (``pytestmark = pytest.mark.usefixtures(...)`` after importing it),
    module-scoped so that module-scoped fixtures that train run under it too."""
    with reference_ops():
        yield


def environment() -> dict[str, str]:
    """What decides whether the recorded numbers repeat bit for bit: torch build, vector ISA and CPU model.

    The ISA alone is not enough: oneDNN and the vectorised kernels pick blockings and reduction
    orders per CPU model, so an AMD EPYC and an Intel Xeon that both report AVX2 round differently.
    """
    return {"torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability(), "cpu_model": cpu_model()}


def cpu_model() -> str:
    """The first CPU's vendor and model name from /proc/cpuinfo (Linux), else `platform.processor()`."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    first: dict[str, str] = {}
    for line in lines:
        key, _, value = line.partition(":")
        first.setdefault(key.strip(), value.strip())
    return " ".join(filter(None, (first.get("vendor_id"), first.get("model name")))) or platform.machine()


def fingerprint(run_dir: Path) -> dict[str, Any]:
    """The metrics records and the final weights' fingerprint of one run directory."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        record.pop("tokens_per_s", None)  # wall-clock
    weights = load_file(str(run_dir / "final" / "model.safetensors"))
    digest = hashlib.sha256()
    sums = {}
    for name in sorted(weights):
        tensor = weights[name].contiguous()
        digest.update(f"{name}:{tensor.dtype}:{list(tensor.shape)}".encode())
        digest.update(tensor.numpy().tobytes())
        wide = tensor.double()
        sums[name] = [wide.sum().item(), wide.pow(2).sum().item()]
    return {"records": records, "weights_sha256": digest.hexdigest(), "weight_sums": sums}


def _load() -> dict[str, Any]:
    return json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {"environment": environment(), "runs": {}}


def check_run(name: str, run_dir: Path) -> None:
    """Assert that `run_dir` reproduces the recorded run `name` (or record it under BMOJO_UPDATE_GOLDEN=1)."""
    got = fingerprint(run_dir)
    golden = _load()
    if UPDATE:
        golden["environment"] = environment()
        golden["runs"][name] = got
        GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
        return
    assert name in golden["runs"], f"{GOLDEN} has no run {name!r}; record it with BMOJO_UPDATE_GOLDEN=1"
    want = golden["runs"][name]
    assert [r["type"] for r in got["records"]] == [r["type"] for r in want["records"]], name
    if golden["environment"] == environment():
        assert got["records"] == want["records"], f"{name}: the logged numbers changed"
        assert got["weights_sha256"] == want["weights_sha256"], f"{name}: the final weights changed"
        return
    for have, expected in zip(got["records"], want["records"]):
        assert have.keys() == expected.keys(), name
        for key, value in expected.items():
            if isinstance(value, float):
                torch.testing.assert_close(have[key], value, rtol=TOLERANCE, atol=0, msg=f"{name}: {key}")
            else:
                assert have[key] == value, f"{name}: {key}"
    assert got["weight_sums"].keys() == want["weight_sums"].keys(), name
    sizes = {key: value.numel() for key, value in load_file(str(run_dir / "final" / "model.safetensors")).items()}
    for tensor, (total, squares) in want["weight_sums"].items():
        have_total, have_squares = got["weight_sums"][tensor]
        # A sum of entries of both signs can cancel to far below its terms, so a relative error of TOLERANCE
        # in every entry is bounded by TOLERANCE * sum(|w|) <= TOLERANCE * sqrt(numel * squares), not by the sum.
        bound = TOLERANCE * math.sqrt(sizes[tensor] * squares) + 1e-6
        torch.testing.assert_close(have_total, total, rtol=0, atol=bound, msg=f"{name}: {tensor}: sum")
        torch.testing.assert_close(have_squares, squares, rtol=TOLERANCE, atol=1e-6, msg=f"{name}: {tensor}: squares")
