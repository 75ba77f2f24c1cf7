"""The trainer reproduces recorded runs bitwise: the recorded recipe (shortened), and the same run stopped and
resumed.

The numbers in tests/golden/training_baseline.json were recorded before the trainer
was restructured; `baseline.check_run` says how they are compared. The tensor × pipeline
parallel run is checked against the same file in tests/test_pipeline_training.py.
"""

from __future__ import annotations

import pytest
from baseline import RECORDED_RECIPE, check_run, reference_ops_for_module  # noqa: F401

from bmojo_neuron.recipes import load_recipe
from bmojo_neuron.training import train

# The recorded numbers are the torch reference ops' (baseline.reference_ops).
pytestmark = pytest.mark.usefixtures("reference_ops_for_module")

# The recorded recipe's B'MOJO model and data, 6 steps: 4 micro-batches per epoch, so the run crosses an
# epoch boundary, evaluates twice (with a x2 length row) and checkpoints at steps 3 and 6.
SHORT = ["train.steps=6", "train.log_every=1", "data.train_examples=128", "data.eval_examples=32",
         "eval.every=3", "eval.batches=1", "checkpoint.every=3", "checkpoint.keep_last=2", "optim.warmup_steps=2"]


def _recipe():
    return load_recipe(RECORDED_RECIPE, SHORT)


def test_cpu_tiny_reproduces_the_recorded_run(tmp_path):
    result = train(_recipe(), tmp_path / "run", progress=False)
    assert result.step == 6 and [r["step"] for r in result.metrics if r["type"] == "eval"] == [3, 6]
    check_run("cpu-tiny", tmp_path / "run")


def test_cpu_tiny_stopped_and_resumed_reproduces_the_recorded_run(tmp_path):
    first = train(_recipe(), tmp_path / "run", progress=False, stop_after=3)
    assert first.step == 3 and first.final_dir is None
    train(_recipe(), tmp_path / "run", resume=True, progress=False)
    check_run("cpu-tiny", tmp_path / "run")  # the uninterrupted run's numbers
