"""`bmojo-neuron eval`, `inspect` and `generate`: bad options and data are one error line, before any evaluation.

They read a copy of the committed checkpoint fixture ``tests/golden/checkpoints/finished``
(a 2-layer model of vocabulary 16 on MQAR), so a command that writes where it should not
cannot touch the fixture.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from bmojo_neuron import cli
from bmojo_neuron.device import resolve_device

FIXTURE = Path(__file__).parent / "golden" / "checkpoints" / "finished"


@pytest.fixture
def run(tmp_path: Path) -> Path:
    return Path(shutil.copytree(FIXTURE, tmp_path / "run"))


def _error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """The one stderr line of a command that must fail with status 2, having printed nothing else."""
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "Traceback" not in err, (out, err)
    return err.strip()


@pytest.mark.parametrize("command", [["eval", "--lengths", "1"], ["inspect", "--sequences", "1"]])
def test_data_of_a_larger_vocabulary_is_refused_before_evaluating(command, run, tmp_path, capsys):
    out = tmp_path / "out"
    name, *options = command
    argv = [name, str(run), *options, "--device", "cpu", "--output-dir", str(out)]
    assert _error(capsys, [*argv, "--data", "vocab_size=32"]) == (
        "error: the evaluation data has token ids up to 31 (data.vocab_size 32), outside this model's vocabulary "
        "(16); pick --data of the kind the model was trained on")
    assert _error(capsys, [*argv, "--data", "cpu-text"]) == (
        "error: the evaluation data has token ids up to 255 (tokenizer 'byte', 256 ids), outside this model's "
        "vocabulary (16); pick --data of the kind the model was trained on")
    assert not out.exists()


@pytest.mark.parametrize(("option", "value"), [("--batches", "0"), ("--batch-size", "0"), ("--batches", "-1")])
def test_eval_counts_below_one_are_refused(option, value, run, tmp_path, capsys):
    argv = ["eval", str(run), "--lengths", "1", "--device", "cpu", "--output-dir", str(tmp_path), option, value]
    assert _error(capsys, argv) == f"error: {option} must be >= 1, got {value}"


@pytest.mark.parametrize("command", ["eval", "inspect"])
def test_an_output_dir_that_is_a_file_fails_before_evaluating(command, run, tmp_path, capsys):
    file = tmp_path / "taken"
    file.write_text("")
    argv = [command, str(run), "--device", "cpu", "--output-dir", str(file)]
    assert _error(capsys, argv) == (
        f"error: output directory {file} is a file, not a folder; pick another --output-dir")


@pytest.mark.parametrize("command", [["eval", "RUN"], ["inspect", "RUN"], ["train", "cpu-tiny", "--dry-run"]])
def test_an_empty_output_dir_is_refused(command, run, capsys):
    command = [str(run) if arg == "RUN" else arg for arg in command]
    assert _error(capsys, [*command, "--output-dir", ""]) == "error: --output-dir must not be empty"
    assert not (run / "eval").exists()


def test_eval_writes_its_report_into_the_output_dir(run, tmp_path, capsys):
    out = tmp_path / "new" / "eval"
    argv = ["eval", str(run), "--lengths", "1", "--batches", "1", "--device", "cpu", "--output-dir", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr()
    assert f"wrote {out / 'length_eval.json'}" in printed.out
    assert printed.err == (f"evaluating {run / 'final'} at 1x the training length (16 tokens), up to 1 batch of "
                           "4 sequences each\n")  # before the work, which takes tens of seconds at full size
    assert [row["seq_len"] for row in json.loads((out / "length_eval.json").read_text())] == [16]


@pytest.mark.parametrize("command", [["eval"], ["inspect"], ["generate", "--prompt", "x"]])
def test_a_folder_of_runs_names_them_and_the_command_for_one(command, run, tmp_path, capsys):
    """A suite's output dir (one run per model, e.g. the quick start's) is not one model: the error names its runs
    and the command to give one of them, and the table that compares them."""
    suite = tmp_path / "suite"
    suite.mkdir()
    for name in ("mamba", "bmojo"):
        shutil.copytree(run, suite / name)
    (suite / "data-cache").mkdir()  # not a run: not named
    name, *options = command
    argv = [name, str(suite), *options, "--device", "cpu"]
    expected = (f"error: {suite} holds 2 runs (bmojo, mamba), not one model: give one run's folder, e.g. "
                f"bmojo-neuron {name} {suite / 'bmojo'}")
    assert _error(capsys, argv) == expected
    (suite / "summary.txt").write_text("table")
    assert _error(capsys, argv) == f"{expected}; {suite / 'summary.txt'} compares them"
    assert sorted(p.name for p in suite.iterdir()) == ["bmojo", "data-cache", "mamba", "summary.txt"]


@pytest.mark.parametrize("command", [["eval"], ["inspect"], ["generate", "--prompt", "x"]])
def test_a_file_given_for_the_model_names_the_folder_to_give(command, run, tmp_path, capsys):
    name, *options = command
    (tmp_path / "notes.txt").write_text("not a model")
    for file, advice in [(run / "final" / "model.safetensors", f"the folder that holds it, {run / 'final'}"),
                         (run / "step-0000003" / "trainer_state.json", f"the folder that holds it, "
                                                                       f"{run / 'step-0000003'}"),
                         (run / "recipe.json", f"the folder that holds it, {run}"),
                         (tmp_path / "notes.txt", "a run directory, a checkpoint (step-XXXXXXX) or a final export")]:
        assert _error(capsys, [name, str(file), *options, "--device", "cpu"]) == (
            f"error: {file} is a file, not a model's folder: give {advice}")


def test_a_folder_of_runs_as_init_weights_is_named_by_its_key(run, tmp_path, capsys):
    shutil.copytree(run, tmp_path / "suite" / "only")
    argv = ["train", "cpu-tiny", "suite=none", f"init.weights={tmp_path / 'suite'}", "--output-dir",
            str(tmp_path / "new")]
    assert _error(capsys, argv) == (f"error: recipe key init.weights: {tmp_path / 'suite'} holds 1 run (only), not "
                                    f"one model: give one run's folder, e.g. {tmp_path / 'suite' / 'only'}")


def test_init_weights_of_another_model_are_refused_before_the_run_starts(run, tmp_path, capsys):
    """cpu-tiny's model section restates sizes (d 128, BB) that the fixture's model (d 8, BM) does not have: the
    run is refused before its start lines, naming the keys that differ, and the dry run reports the same."""
    argv = ["train", "cpu-tiny", "suite=none", "data.vocab_size=16", "data.num_kv_pairs=2", f"init.weights={run}",
            "--output-dir", str(tmp_path / "new")]
    error = _error(capsys, argv)
    assert error.startswith(f"error: init.weights {run}: its model does not have the recipe's layers (missing [")
    assert error.endswith("; the model section sets hidden_size 128 (the folder's: 8), layer_pattern 'BB' (the "
                          "folder's: 'BM'), num_attention_heads 4 (the folder's: 2), intermediate_size 0 (the "
                          "folder's: 16), memory_size 32 (the folder's: 4), memory_picks 4 (the folder's: 1), "
                          "memory_decay 1.0 (the folder's: 0.99), ssm_head_dim 32 (the folder's: 4), ssm_chunk_size "
                          "32 (the folder's: 8): leave these keys out to take the folder's (the override "
                          "model=none drops the recipe's whole model section)")
    assert not (tmp_path / "new").exists()
    assert cli.main([*argv, "--dry-run"]) == 0
    assert f"  init.weights: PROBLEM: {error.removeprefix('error: ')}\n" in capsys.readouterr().out
    # the advice, followed on the command line: the folder's model whole, and nothing left to refuse
    assert cli.main([*argv, "model=none", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"  init.weights: {run}: ok\n" in out and "  model    BM  d=8  " in out


@pytest.mark.parametrize("command", [["eval"], ["inspect"], ["generate", "--prompt", "x"]])
def test_a_run_that_ended_before_its_first_checkpoint_says_so(command, run, tmp_path, capsys):
    """What a run killed or failed before its first checkpoint leaves (`layout.abandoned_attempt`): its logs."""
    attempt = tmp_path / "attempt"
    (attempt / "tensorboard").mkdir(parents=True)
    for name in ("metrics.jsonl", "recipe.json"):
        shutil.copy(run / name, attempt / name)
    name, *options = command
    assert _error(capsys, [name, str(attempt), *options, "--device", "cpu"]) == (
        f"error: {attempt} holds no checkpoint yet: its run ended before its first checkpoint (only its logs are "
        "there); train it again with the same --output-dir, which starts afresh there and replaces these logs")
    assert sorted(p.name for p in attempt.iterdir()) == ["metrics.jsonl", "recipe.json", "tensorboard"]


@pytest.mark.parametrize(("command", "report"), [(["eval", "--lengths", "1", "--batches", "1"], "length_eval"),
                                                 (["inspect", "--sequences", "1"], "memory")])
def test_each_model_of_a_run_gets_its_own_output_folder(command, report, run, capsys, monkeypatch):
    """The run directory (its final export) and a checkpoint of it write apart: neither overwrites the other.
    The fixture's export holds the same weights as its last checkpoint (step 3), so on the CPU the two
    reports are equal to the bit. Their data is built with the datasets library's bars off (stderr is not a
    terminal here), and the setting is back after."""
    import datasets

    import bmojo_neuron.data

    bars: list[bool] = []
    def recording(real):
        def build(*args, **kwargs):
            bars.append(datasets.is_progress_bar_enabled())
            return real(*args, **kwargs)
        return build

    for builder in ("build_datasets", "build_eval_dataset"):
        monkeypatch.setattr(bmojo_neuron.data, builder, recording(getattr(bmojo_neuron.data, builder)))
    name, *options = command
    written = {}
    for target, folder in [(run, "final"), (run / "step-0000003", "step-0000003")]:
        assert cli.main([name, str(target), *options, "--device", "cpu"]) == 0
        out = run / "eval" / folder
        assert f"wrote {out / (report + '.json')} and {out / (report + '.png')}" in capsys.readouterr().out
        assert (out / (report + ".png")).stat().st_size > 0
        written[folder] = json.loads((out / (report + ".json")).read_text())
        if isinstance(written[folder], dict):  # inspect's report names the model it read
            assert written[folder].pop("source") == str(run / folder)
    assert sorted(p.name for p in (run / "eval").iterdir()) == ["final", "step-0000003"]
    assert written["final"] == written["step-0000003"]
    assert bars == [False, False] and datasets.is_progress_bar_enabled()


def test_the_line_before_the_evaluation_names_a_text_recipe_s_block_size():
    """A text recipe's sequence length is `data.block_size` (an MQAR one's `data.seq_len`); eval prints it on the
    line before the work, for a text run as for the MQAR fixture above."""
    from bmojo_neuron.commands.evaluate import evaluating_line
    from bmojo_neuron.recipes import load_recipe

    text = load_recipe("cpu-text", ["data.block_size=96"])
    assert evaluating_line(Path("runs/x/final"), text, [1, 2], 3, 8) == (
        "evaluating runs/x/final at 1x, 2x the training length (96 tokens), up to 3 batches of 8 sequences each")
    mqar = load_recipe("cpu-tiny", ["data.seq_len=48"])
    assert "(48 tokens)" in evaluating_line(Path("m"), mqar, [1], 1, 4)


def test_other_data_write_beside_the_run_s_own_eval(run, capsys):
    """`--data` results go to a folder of their own inside the model's: the report on the run's own data stays."""
    from bmojo_neuron.commands.evaluate import data_folder_name

    base = ["eval", str(run), "--lengths", "1", "--batches", "1", "--device", "cpu"]
    assert cli.main(base) == 0
    own = (run / "eval" / "final" / "length_eval.json").read_text()
    assert cli.main([*base, "--data", "num_kv_pairs=3"]) == 0
    other = run / "eval" / "final" / "data-num_kv_pairs=3" / "length_eval.json"
    assert f"wrote {other}" in capsys.readouterr().out
    assert (run / "eval" / "final" / "length_eval.json").read_text() == own
    assert json.loads(other.read_text()) != json.loads(own)  # three kv pairs instead of the run's two: other numbers
    assert data_folder_name(["recipes/my recipe.yaml", "seq_len=128"]) == "data-my-recipe_seq_len=128"


def test_a_folder_that_is_the_model_itself_writes_into_its_own_eval(run, tmp_path, capsys):
    export = Path(shutil.copytree(run / "final", tmp_path / "converted"))
    assert cli.main(["eval", str(export), "--lengths", "1", "--batches", "1", "--device", "cpu"]) == 0
    assert f"wrote {export / 'eval' / 'length_eval.json'}" in capsys.readouterr().out


def test_the_table_of_a_folder_without_a_recipe_names_the_model_and_the_data_apart(run, tmp_path, capsys):
    """A primed or converted folder stores no recipe: the recipe ``--data`` names gives the data alone, so the
    table's title names the folder as the model and that recipe as the data (not the recipe as the model)."""
    folder = Path(shutil.copytree(run / "final", tmp_path / "primed"))
    (folder / "bmojo_run.json").unlink()
    (folder / "recipe.json").unlink()
    recipe = json.loads((run / "recipe.json").read_text())
    data = tmp_path / "fixture-data.yaml"
    data.write_text(json.dumps({"run": {"name": "fixture-data"}, "data": recipe["data"]}), encoding="utf-8")
    argv = ["eval", str(folder), "--lengths", "1", "--batches", "1", "--device", "cpu"]
    assert cli.main([*argv, "--data", str(data), "num_kv_pairs=2"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"primed ({folder}), data: fixture-data num_kv_pairs=2"
    assert cli.main(["eval", str(run), *argv[2:]]) == 0  # a run's own data: its name and the folder read
    assert capsys.readouterr().out.splitlines()[0] == f"fixture ({run / 'final'})"


@pytest.mark.parametrize("command", [["eval"], ["inspect"], ["generate", "--prompt", "x"]])
def test_device_choices_of_the_inference_commands(command, run, capsys):
    name, *options = command
    for device in ("tpu", "neuron", "cudax"):
        assert _error(capsys, [name, str(run), *options, "--device", device]) == (
            f"error: --device must be cpu, cuda or auto, got '{device}'")
    with pytest.raises(SystemExit):
        cli.main([name, "--help"])
    assert "cpu, cuda or auto" in capsys.readouterr().out


def test_training_devices_include_neuron():
    with pytest.raises(ValueError, match=r"^run.device must be cpu, cuda, auto or neuron, got 'tpu'$"):
        resolve_device("tpu")
    assert resolve_device("neuron").type == "xla"


def test_generate_help_states_the_defaults_it_uses(capsys):
    args = cli.build_parser().parse_args(["generate", "RUN", "--prompt", "x"])
    assert (args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed) == (64, 1.0, None, None, 0)
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split("options:", 1)[1].split())
    for option, default in [("--max-new-tokens MAX_NEW_TOKENS", "(default 64)"),
                            ("--temperature TEMPERATURE", "(default 1.0)"), ("--top-k TOP_K", "(default: all)"),
                            ("--top-p TOP_P", "(default 1: all)"), ("--seed SEED", "(default 0)")]:
        assert default in help_text.split(option, 1)[1].split(" --", 1)[0], option


def test_generate_on_an_mqar_model_says_its_tokens_are_not_text(run, capsys):
    assert _error(capsys, ["generate", str(run), "--prompt", "hello", "--device", "cpu"]) == (
        "error: the prompt has token id 111, outside this model's vocabulary (16); this model was trained on MQAR "
        "(data.kind: mqar), whose tokens are task ids, not text: `bmojo-neuron eval` and `inspect` measure it")


@pytest.mark.parametrize("new_ids, note", [
    ([5, 6, 7], ""),
    ([5, 0], "note: stopped after 2 of 3 new tokens: the model generated its end-of-sequence token\n"),
])
def test_generate_says_when_it_stopped_at_the_end_of_sequence_token(run, capsys, monkeypatch, new_ids, note):
    import bmojo_neuron.generation as generation

    def fake(trained, prompt, max_new_tokens, *args):
        assert max_new_tokens == 3
        return new_ids, "".join(chr(i) for i in new_ids)

    monkeypatch.setattr(generation, "generate_text", fake)
    assert cli.main(["generate", str(run), "--prompt", "x", "--max-new-tokens", "3", "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert out == "x" + "".join(chr(i) for i in new_ids) + "\n" and err == note


@pytest.mark.parametrize("command", [["eval"], ["generate", "--prompt", "x"]])
def test_a_folder_transformers_cannot_load_is_one_error_line(command, run, tmp_path, capsys):
    """A folder with a config.json is read as an export by `transformers`; one it cannot load (no weights, a
    model_type it does not know, whose message runs over three lines) is one line naming the folder."""
    name, *options = command
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert _error(capsys, [name, str(folder), *options, "--device", "cpu"]) == (
        f"error: {folder} has a config.json but no weights (model.safetensors): not a whole export; copy it again, "
        "or give the run or checkpoint it was made from")
    shutil.copy(run / "final" / "model.safetensors", folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    line = _error(capsys, [name, str(folder), *options, "--device", "cpu"])
    assert line.startswith(f"error: {folder}: not a loadable model (The checkpoint you are trying to load has "
                           "model type `no-such-architecture` but Transformers does not recognize"), line


def test_inspect_says_on_a_terminal_what_it_loads_before_the_wait(run, tmp_path, capsys, monkeypatch):
    """Importing torch and loading the model is most of `inspect`'s time (half a minute on a busy machine): on a
    terminal a line says what is going on before it, and a refusal found after the load follows that line. Off a
    terminal (a script, a log) the refusal stays its one line (`test_an_output_dir_that_is_a_file_fails_...`)."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    argv = ["inspect", str(run), "--sequences", "3", "--device", "tpu"]  # refused after the imports
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines()[0] == (
        f"inspecting {run / 'final'}: loading torch and the model, then tracing the eidetic memory over 3 eval "
        "sequences") and err.splitlines()[1:] == ["error: --device must be cpu, cuda or auto, got 'tpu'"], err


def test_eval_and_generate_say_on_a_terminal_what_they_load_before_the_wait(run, capsys, monkeypatch):
    """As `inspect` does: on a terminal a line says what is loading before torch and the model (seconds, half a
    minute on a busy machine), and a refusal found after the wait follows it; off a terminal the refusal is its
    one line; under torchrun only rank 0 says it (every rank shares the terminal)."""
    said = {"eval": f"eval {run / 'final'}: loading torch and the model, then the evaluation data",
            "generate": f"generate from {run / 'final'}: loading torch and the model"}
    refusal = "error: --device must be cpu, cuda or auto, got 'tpu'"
    for name, options in (("eval", ["--lengths", "1"]), ("generate", ["--prompt", "x"])):
        argv = [name, str(run), *options, "--device", "tpu"]  # refused after the imports
        for terminal, rank, lines in ((True, "0", [said[name], refusal]), (False, "0", [refusal]),
                                      (True, "1", [refusal.replace("error:", "error: rank 1:")])):
            monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal)
            monkeypatch.setenv("RANK", rank)
            monkeypatch.setenv("WORLD_SIZE", "2")
            assert cli.main(argv) == 2
            out, err = capsys.readouterr()
            assert out == "" and err.splitlines() == lines, (name, terminal, rank, err)


def test_eval_data_builds_its_text_cache_where_the_model_keeps_its_data_not_in_the_working_folder(tmp_path):
    """``eval RUN --data cpu-text``: the recipe's cache, ``runs/data-cache``, is relative to wherever eval starts;
    a model in a run uses the cache `train` put beside that run (so the run's own text is found built), a folder
    that is the model the user cache; a cache_dir placed on purpose (absolute, or given in --data) stays."""
    from types import SimpleNamespace

    from bmojo_neuron.commands.evaluate import eval_recipe, with_model_data_cache
    from bmojo_neuron.data.text import DEFAULT_CACHE_DIR
    from bmojo_neuron.recipes import load_recipe

    saved = json.loads((FIXTURE / "recipe.json").read_text())  # an MQAR run's recipe
    run_dir = tmp_path / "exp" / "mqar"
    in_run = SimpleNamespace(source=run_dir / "final", run_dir=run_dir)
    alone = SimpleNamespace(source=tmp_path / "primed", run_dir=tmp_path / "primed")

    def cache(trained, data_args, stored=saved):
        return with_model_data_cache(eval_recipe(stored, data_args), trained, data_args).data.cache_dir

    assert eval_recipe(saved, ["cpu-text"]).data.cache_dir == "runs/data-cache"  # what it would read from the cwd
    assert cache(in_run, ["cpu-text"]) == str(tmp_path / "exp" / "data-cache")
    assert cache(alone, ["cpu-text"]) == cache(alone, ["cpu-text"], stored={}) == str(DEFAULT_CACHE_DIR)
    assert cache(in_run, ["cpu-text", "data.cache_dir=mine"]) == "mine"  # given: as given
    assert cache(in_run, ["cpu-text", f"cache_dir={tmp_path / 'abs'}"]) == str(tmp_path / "abs")
    text_run = load_recipe("cpu-text", [f"data.cache_dir={tmp_path / 'fsx'}"]).to_dict()
    assert cache(in_run, ["block_size=32"], stored=text_run) == str(tmp_path / "fsx")  # the run's own, absolute
    assert with_model_data_cache(eval_recipe(saved, []), in_run, []).data.kind == "mqar"  # nothing to cache
    relative = SimpleNamespace(source=Path("exp/mqar/final"), run_dir=Path("exp/mqar"))
    assert cache(relative, ["cpu-text"]) == str(Path.cwd() / "exp" / "data-cache")
