"""Checkpoints written by earlier versions keep loading: the committed fixtures in tests/golden/checkpoints/.

The fixtures (made by ``tests/golden/checkpoints/make.sh`` from ``fixture.yaml``) are a
one-process run stopped after step 2, the same run finished (step 3 and the ``final``
export) and the run at tp=2 × pp=2 with tied embeddings (a sharded step 3 and its
export). Every form must load for inference and give the recorded logits for a fixed
prompt, compared like `baseline.check_run` compares training numbers (exactly on the
recording machine, rtol 1e-5 elsewhere); the stopped run must resume to the finished
run's numbers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from baseline import UPDATE, environment, reference_ops_for_module  # noqa: F401
from safetensors.torch import load_file

from bmojo_neuron.checkpoints.convert import consolidate_checkpoint, shard_checkpoint
from bmojo_neuron.checkpoints.inference import load_trained
from bmojo_neuron.recipes import load_recipe
from bmojo_neuron.training import train

# The recorded numbers are the torch reference ops' (baseline.reference_ops).
pytestmark = pytest.mark.usefixtures("reference_ops_for_module")

FIXTURES = Path(__file__).parent / "golden" / "checkpoints"
EXPECTED = FIXTURES / "expected.json"
PROMPT = [[1, 5, 9, 2, 14, 3, 8, 8, 0, 11]]
# (what to load, whose weights it holds)
SOURCES = [
    ("one-process", "step 2"),  # a run directory without an export: its latest checkpoint
    ("one-process/step-0000002", "step 2"),
    ("finished", "step 3"),  # its final/ export
    ("finished/step-0000003", "step 3"),
    ("finished/final", "step 3"),
    ("tp2-pp2/step-0000003", "tp2-pp2 step 3"),  # sharded: consolidated on load
    ("tp2-pp2/final", "tp2-pp2 step 3"),
]


def _logits(path: Path) -> list[list[float]]:
    trained = load_trained(path, "cpu")
    with torch.no_grad():
        return trained.model(torch.tensor(PROMPT)).logits[0].tolist()


def _expected() -> dict:
    return json.loads(EXPECTED.read_text()) if EXPECTED.is_file() else {"environment": environment(), "logits": {}}


def _assert_same(got, want, what: str, exact: bool) -> None:
    if exact:
        assert got == want, what
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=what)


def test_every_stored_form_loads_with_the_recorded_logits():
    expected = _expected()
    exact = expected["environment"] == environment()
    seen: dict[str, list] = {}
    for source, weights in SOURCES:
        got = _logits(FIXTURES / source)
        if weights in seen:  # the same weights read through another form
            assert got == seen[weights], f"{source} differs from the other forms of {weights}"
        seen[weights] = got
    if UPDATE:
        EXPECTED.write_text(json.dumps({"environment": environment(), "logits": seen}, indent=1) + "\n")
        return
    for weights, got in seen.items():
        _assert_same(got, expected["logits"][weights], weights, exact)


def test_the_sharded_fixture_consolidates_to_its_export(tmp_path):
    out = consolidate_checkpoint(FIXTURES / "tp2-pp2", tmp_path / "full")
    want = load_file(str(FIXTURES / "tp2-pp2" / "final" / "model.safetensors"))
    got = load_file(str(out / "model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    state = torch.load(out / "training_state.pt", weights_only=False)
    assert state["trainer_state"]["step"] == 3 and "lm_head.weight" not in state["optimizer"]
    # like final/ (export.save_for_hf): the fixture's 16 MQAR task ids do not fit the byte tokenizer its
    # recipe names, so no tokenizer files, whose text ids the embedding would not have
    assert json.loads((out / "bmojo_run.json").read_text())["tokenizer"] == "byte"
    assert not (out / "tokenizer.json").exists() and json.loads((out / "config.json").read_text())["vocab_size"] == 16


@pytest.mark.parametrize("source", ["tp2-pp2", "tp2-pp2/step-0000003"])
def test_shard_refuses_a_sharded_run_or_checkpoint_and_names_consolidate(tmp_path, source):
    """`checkpoint shard` takes one full copy: a sharded run or checkpoint is refused naming `consolidate`, and
    nothing is written."""
    with pytest.raises(ValueError, match=r"not one full copy of a model: convert it with `bmojo-neuron checkpoint "
                                         r"consolidate .* FULL` first"):
        shard_checkpoint(FIXTURES / source, tmp_path / "out", tp=1)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("source", "what"), [("one-process", "a run of one-process checkpoints"),
                                              ("one-process/step-0000002", "a one-process checkpoint")])
def test_a_one_process_checkpoint_is_refused_by_both_naming_init_weights(tmp_path, source, what):
    """`consolidate` cannot read a one-process optimizer (its states are by parameter index), so neither it nor
    `shard` sends the user to the other: both name what does train its weights at other degrees."""
    path = FIXTURES / source
    advice = (f"{path} is {what}: its weights are whole already and its optimizer state (by parameter index) is "
              "not converted ({}); to train it at other parallel degrees, start a new run from its weights: "
              f"bmojo-neuron train RECIPE init.weights={path} parallel.tp=N (step 0, a fresh optimizer)")
    with pytest.raises(ValueError) as refused:
        shard_checkpoint(path, tmp_path / "out", tp=2)
    assert str(refused.value) == advice.format("shard reads a consolidated copy")
    with pytest.raises(ValueError) as refused:
        consolidate_checkpoint(path, tmp_path / "full")
    assert str(refused.value) == advice.format("consolidate joins the files of a sharded one")
    assert sorted(tmp_path.iterdir()) == []


def test_a_fixture_trained_before_the_ssm_residual_default_will_not_resume_with_it(tmp_path):
    """The fixtures' config.json has no ssm_residual (written before it became the default): their layer had
    none, so a recipe asking for it (as today's default does) is refused before any weight is loaded."""
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "one-process", run)
    recipe = load_recipe(str(FIXTURES / "fixture.yaml"), ["model.ssm_residual=true"])
    with pytest.raises(ValueError, match="recipe changed in model.ssm_residual"):
        train(recipe, run, resume=True, progress=False)


def test_the_stopped_fixture_resumes_to_the_finished_run(tmp_path):
    """Resumed from the stored step-2 checkpoint, the run ends where the stored finished run ended.

    The fixtures were written by an earlier version of the code, whose ops may round
    differently from today's, so this compares at rtol 1e-5; bitwise stop-and-resume of
    today's code is tested in test_training_baseline.py.
    """
    if UPDATE:
        pytest.skip("nothing to record")
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "one-process", run)
    result = train(load_recipe(str(FIXTURES / "fixture.yaml")), run, resume=True, progress=False)
    assert result.step == 3

    def numbers(run_dir: Path) -> list[dict]:
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]

    def values(records: list[dict]) -> list[list]:
        return [[v for v in r.values() if not isinstance(v, str)] for r in records]

    def weights(run_dir: Path) -> dict[str, list]:
        return {k: v.tolist() for k, v in load_file(str(run_dir / "final" / "model.safetensors")).items()}

    got, want = numbers(run), numbers(FIXTURES / "finished")
    assert [(r["type"], r["step"]) for r in got] == [(r["type"], r["step"]) for r in want]
    assert [r for r in got if r["step"] > 2], "the resumed run logged nothing"
    _assert_same(values(got), values(want), "metrics", exact=False)
    _assert_same(weights(run), weights(FIXTURES / "finished"), "final weights", exact=False)
