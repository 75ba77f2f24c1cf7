"""`bmojo-neuron plan trn1/<recipe>` output, compared exactly with the reviewed files in tests/golden/plan/.

A change to the launch lines, the environment, the rank layout or the memory
estimate shows up here as a diff to review. After an intended change regenerate
the files and review the diff before committing it:

    BMOJO_UPDATE_GOLDEN=1 python -m pytest -q tests/test_plan_golden.py

Only machine-specific text is normalised: the repository root (were a path to it to
appear) becomes ``<repo>``. The recipes are given by name, so today the output holds
no path at all.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import pytest

from bmojo_neuron.cli import main

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden" / "plan"
RECIPES = sorted(p.stem for p in (ROOT / "recipes" / "trn1").glob("*.yaml"))
UPDATE = os.environ.get("BMOJO_UPDATE_GOLDEN") == "1"


def normalise(text: str) -> str:
    return text.replace(str(ROOT), "<repo>")


def plan_output(name: str, capsys) -> str:
    capsys.readouterr()
    code = main(["plan", f"trn1/{name}"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return normalise(out)


def test_the_trn1_recipes_are_covered():
    assert RECIPES == ["bmojo-1.4b", "bmojo-130m", "bmojo-370m", "bmojo-790m", "prime-llama-3.2-1b-distill",
                       "prime-llama-3.2-1b-finetune", "prime-qwen3-0.6b-distill"]
    stale = sorted({p.stem for p in GOLDEN.glob("*.txt")} - set(RECIPES))
    assert not stale, f"golden files without a recipe: {stale}"


@pytest.mark.parametrize("name", RECIPES)
def test_plan_matches_golden(name, capsys):
    actual = plan_output(name, capsys)
    path = GOLDEN / f"{name}.txt"
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(actual)
    assert path.exists(), f"{path} is missing: BMOJO_UPDATE_GOLDEN=1 python -m pytest -q {Path(__file__).name}"
    expected = path.read_text()
    if actual != expected:
        diff = "".join(difflib.unified_diff(expected.splitlines(True), actual.splitlines(True),
                                            f"golden/{name}.txt", "bmojo-neuron plan"))
        pytest.fail(f"`bmojo-neuron plan trn1/{name}` changed (review, then regenerate with "
                    f"BMOJO_UPDATE_GOLDEN=1):\n{diff}")


def test_normalise_only_touches_the_repository_root():
    text = f"recipe {ROOT}/recipes/trn1/bmojo-130m.yaml\ncache /var/tmp/neuron-compile-cache\n"
    assert normalise(text) == "recipe <repo>/recipes/trn1/bmojo-130m.yaml\ncache /var/tmp/neuron-compile-cache\n"


@pytest.mark.parametrize("args, sentence", [
    (["trn1/bmojo-130m", "data.path=/data"], "a micro-batch of 8 × 2048 tokens per core and\n   {total} GiB of the 16"),
    (["trn1/bmojo-1.4b", "train.batch_size=64", "--nodes", "4"], "on 128 NeuronCores, {total} GiB per NeuronCore"),
])
def test_trn1_walkthrough_quotes_what_plan_prints(args, sentence, capsys):
    """docs/trn1.md's "Expect ..." lines give the HBM total the documented `plan` command prints."""
    capsys.readouterr()
    assert main(["plan", *args]) == 0
    [stage] = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("  0 ")]
    assert sentence.format(total=stage[-1]) in (ROOT / "docs" / "trn1.md").read_text()
