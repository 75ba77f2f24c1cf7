"""`bmojo-neuron train`: --recipe, --dry-run, the immediate failure without Neuron, a suite's resume and output;
`bmojo-neuron data prepare`."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_training import TINY_RECIPE

from bmojo_neuron import cli
from bmojo_neuron.checkpoints import layout
from bmojo_neuron.commands.train import require_neuron_if_needed
from bmojo_neuron.locking import LOCK_NAME, DirectoryLock
from bmojo_neuron.neuron import INSTALL_COMMAND, TRAINING_PACKAGES, NeuronUnavailableError

ROOT = Path(__file__).resolve().parents[1]
TRN1 = "recipes/trn1/bmojo-130m.yaml"
FIXTURES = ROOT / "tests" / "golden" / "checkpoints"  # checkpoint fixtures and their recipe


def _cli(*args: str, code: str | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", code] if code else [sys.executable, "-m", "bmojo_neuron.cli", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)


# ------------------------------------------------------------------ no Neuron: fail at once


def test_neuron_recipe_without_neuron_exits_2_naming_packages_and_install_command():
    done = _cli("train", "--recipe", TRN1)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("error: training on Trainium (run.device: neuron) needs the AWS Neuron SDK")
    assert done.stderr.count("\n") == 1  # one line, naming every package that does not import
    for name in TRAINING_PACKAGES:
        assert name in done.stderr
    assert INSTALL_COMMAND in done.stderr and "Traceback" not in done.stderr


def test_the_failure_comes_before_torch_transformers_or_datasets_are_imported():
    code = ("import sys; from bmojo_neuron.cli import main; "
            f"code = main(['train', '{TRN1}', 'train.steps=3']); "
            "print(code, sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))")
    done = _cli(code=code)
    assert done.stdout.strip() == "2 []", done.stderr


class _Placeholders(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """`import <name>` of a PyPI placeholder: the package exists and raises ImportError("WRONG PACKAGE")."""

    def find_spec(self, fullname, path=None, target=None):
        return importlib.machinery.ModuleSpec(fullname, self) if fullname in TRAINING_PACKAGES else None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        raise ImportError(f"WRONG PACKAGE: {module.__name__} is a placeholder")


def test_pypi_placeholders_are_reported_as_such(monkeypatch):
    monkeypatch.setattr(sys, "meta_path", [_Placeholders(), *sys.meta_path])
    for name in TRAINING_PACKAGES:
        monkeypatch.delitem(sys.modules, name, raising=False)
    with pytest.raises(NeuronUnavailableError) as error:
        require_neuron_if_needed(TRN1, [])
    assert str(error.value).count("PyPI placeholder installed (WRONG PACKAGE)") == len(TRAINING_PACKAGES)
    require_neuron_if_needed(TRN1, ["run.device=cpu"])  # another device needs nothing


# ------------------------------------------------------------------ the compile cache of a multi-node run


@pytest.fixture
def trn1_cache_on_lustre(monkeypatch, tmp_path):
    """A Trainium train on this machine (the Neuron check passed), its cache folder (NEURON_CC_FLAGS, as the plan
    exports it) on a Lustre mount, and the data path missing: the check after the cache's is the data's."""
    import bmojo_neuron.compile_cache.shared_fs as shared_fs
    from bmojo_neuron.commands import train

    cache = tmp_path / "fsx" / "neuron-compile-cache"
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text("22 1 259:1 / / rw,relatime shared:1 - ext4 /dev/root rw\n"
                         f"90 22 0:50 / {tmp_path / 'fsx'} rw,relatime shared:40 - lustre 10.0.0.5@tcp:/fsx rw\n")
    monkeypatch.setattr(shared_fs, "MOUNTINFO", mountinfo)
    monkeypatch.setattr(train, "require_neuron_if_needed", lambda name, overrides: None)
    monkeypatch.setenv("NEURON_CC_FLAGS", f"--model-type transformer --cache_dir={cache} -O1")
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "64", "LOCAL_WORLD_SIZE": "32"}.items():
        monkeypatch.setenv(name, value)  # node 0 of two, as torchrun --nnodes 2 --nproc-per-node 32 sets them
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    return cache


def _train_trn1(tmp_path, *overrides) -> list[str]:
    return ["train", TRN1, f"data.path={tmp_path / 'no-data'}", "--output-dir", str(tmp_path / "run"), *overrides]


def test_a_multi_node_train_refuses_a_cache_folder_all_nodes_share(capsys, tmp_path, trn1_cache_on_lustre):
    """Neuron's training troubleshooting guide: one cache folder shared by several instances over NFS/EFS/FSx
    fails multi-instance runs. `train` under torchrun on 2 nodes refuses it first, as `precompile --nodes 2`."""
    assert cli.main(_train_trn1(tmp_path)) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and not (tmp_path / "run").exists()
    assert err.startswith(f"error: the compile cache {trn1_cache_on_lustre} is on lustre, so all 2 nodes would "
                          "share one cache folder")
    assert "bmojo-neuron cache push/pull" in err and "(the cache comes from --cache_dir in NEURON_CC_FLAGS)" in err


def test_a_multi_node_train_warns_of_a_cache_folder_that_may_be_shared(capsys, tmp_path, trn1_cache_on_lustre):
    """virtiofs (a host folder in a VM, a Kata pod's root filesystem) may or may not be one folder for all
    nodes: one warning line, and the run goes on (to the next check, the data's)."""
    fsx = trn1_cache_on_lustre.parent
    (tmp_path / "mountinfo").write_text("22 1 259:1 / / rw,relatime shared:1 - ext4 /dev/root rw\n"
                                        f"90 22 0:50 / {fsx} rw,relatime shared:40 - virtiofs kataShared rw\n")
    assert cli.main(_train_trn1(tmp_path)) == 2
    warning, error = capsys.readouterr().err.splitlines()
    assert warning.startswith(f"warning: the compile cache {trn1_cache_on_lustre} is on virtiofs, a host folder "
                              "shared into this VM or container: if the 2 nodes see one folder there")
    assert warning.endswith("(the cache comes from --cache_dir in NEURON_CC_FLAGS)") and "no-data" in error


@pytest.mark.parametrize("env", [
    {"WORLD_SIZE": "32", "LOCAL_WORLD_SIZE": "32"},  # one node of 32 ranks: its own folder, wherever it is
    {"NEURON_CC_FLAGS": "--cache_dir=s3://bucket/neuron-cache"},  # every node's compiler uses the bucket
])
def test_one_node_or_an_s3_cache_passes_the_check(capsys, monkeypatch, tmp_path, trn1_cache_on_lustre, env):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(trn1_cache_on_lustre.parent.parent)  # an s3:// URL is no folder under the working directory
    assert cli.main(_train_trn1(tmp_path)) == 2
    err = capsys.readouterr().err
    assert "compile cache" not in err and "no-data" in err  # stopped by the next check, the data's


# ------------------------------------------------------------------ --recipe


def test_recipe_given_twice_is_refused(capsys):
    assert cli.main(["train", "cpu-tiny", "--recipe", "cpu-text", "--dry-run"]) == 2
    assert "give the recipe once" in capsys.readouterr().err


def test_recipe_option_takes_overrides(capsys, tmp_path):
    args = ["train", "--recipe", "cpu-tiny", "train.steps=7", "--dry-run", "--output-dir", str(tmp_path / "out")]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert out.count("7 steps x batch 32") == 3  # cpu-tiny: B'MOJO and its two baselines


# ------------------------------------------------------------------ --dry-run


def test_dry_run_of_a_neuron_recipe_prints_the_plan_and_the_checks(capsys, tmp_path):
    run_dir = tmp_path / "run"
    assert cli.main(["train", "--recipe", "trn1/bmojo-790m", "--dry-run", "--output-dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "== bmojo-790m ==" in out and "device neuron" in out
    assert "layout      tp 2 × pp 1 × dp 16" in out and "HBM per NeuronCore" in out
    assert "torchrun --nproc-per-node 32 --nnodes 1" in out and "train trn1/bmojo-790m" in out
    assert "export NEURON_RT_STOCHASTIC_ROUNDING_EN=0" in out  # bf16 + ZeRO-1: NxD's fp32 master weights
    assert "Neuron SDK: missing here" in out and INSTALL_COMMAND in out
    assert "data: PROBLEM: data.path /path/to/your/dataset: no such file or folder" in out
    assert f"output {run_dir}: new run" in out and not run_dir.exists()


def test_dry_run_says_whether_the_run_downloads_its_tokenizer(capsys, tmp_path, monkeypatch):
    """A hub tokenizer missing from the local Hugging Face cache is a download at the run's start (offline, a
    stop): the dry run says so and how to fetch it ahead; once cached, that it is read from the cache."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    args = ["train", TRN1, f"data.path={ROOT / 'README.md'}", "--dry-run", "--output-dir", str(tmp_path / "r")]
    assert cli.main(args) == 0
    name = "EleutherAI/gpt-neox-20b"  # the trn1 recipes' tokenizer
    out = capsys.readouterr().out
    assert (f"tokenizer: {name}: not in the local Hugging Face cache, so the run downloads it from the hub "
            f"when it starts (offline it stops there); fetch it ahead with `hf download {name}`") in out
    snapshot = tmp_path / "hub" / "models--EleutherAI--gpt-neox-20b" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "tokenizer_config.json").write_text("{}")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc")
    assert cli.main(args) == 0
    assert f"tokenizer: {name} (in the local Hugging Face cache: no download)" in capsys.readouterr().out
    assert cli.main(args + ["data.tokenizer=./no/such/folder"]) == 0
    assert "tokenizer: PROBLEM: data.tokenizer './no/such/folder': no such folder" in capsys.readouterr().out


def test_dry_run_refuses_shapes_trainium_cannot_tile(capsys):
    assert cli.main(["train", TRN1, "data.block_size=1000", "--dry-run"]) == 2
    assert "data.block_size: is 1000; on Trainium the sequence length must be a multiple of 128" \
        in capsys.readouterr().err


def test_dry_run_of_a_cpu_recipe_describes_every_run(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun --nproc-per-node 2
    assert cli.main(["train", "cpu-tiny", "parallel.zero1=true", "--dry-run", "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "== bmojo ==" in out and "== bmojo-f ==" in out and "== mamba ==" in out
    assert out.count("parallel tp 1 × pp 1 × dp 2 = 2 ranks (sp False, zero1 True") == 3
    assert "data: MQAR, generated in memory" in out and "launch plan" not in out
    assert not any(tmp_path.iterdir())


def test_a_parallel_run_shows_its_layout_and_a_bad_one_is_refused_before_it_starts(capsys, tmp_path, monkeypatch):
    """Under torchrun (or with parallel.* set) the lines a run starts with include its rank layout, as the dry
    run's do; a layout the world cannot hold is one error line with nothing printed before it."""
    from bmojo_neuron.commands.train import describe, start_lines
    from bmojo_neuron.ops import auto
    from bmojo_neuron.recipes import load_recipe

    plain = load_recipe("cpu-tiny", ["suite=none"])
    # one process: no layout line; the ops line says which backend runs the hot ops
    assert start_lines(plain, 10, tmp_path) == f"{describe(plain, 10, tmp_path)}\n  ops      {auto.describe()}"
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun --nproc-per-node 2
    zero1 = load_recipe("cpu-tiny", ["suite=none", "parallel.zero1=true"])
    assert start_lines(zero1, 10, tmp_path).endswith(
        "\n  parallel tp 1 × pp 1 × dp 2 = 2 ranks (sp False, zero1 True; world from torchrun's WORLD_SIZE)")
    monkeypatch.setenv("WORLD_SIZE", "1")
    argv = ["train", "cpu-tiny", "suite=none", "parallel.tp=2", "model.ssm_n_groups=2", "--output-dir",
            str(tmp_path / "run")]
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == (
        "error: parallel.tp × parallel.pp = 2 × 1 needs 2 ranks and this is one process (world size 1): launch it "
        "with torchrun --nproc-per-node 2 -m bmojo_neuron.cli train RECIPE ... (docs/parallel.md)\n")
    assert not (tmp_path / "run").exists()


def test_train_says_on_a_terminal_what_it_loads_and_its_start_lines_say_where_the_weights_come_from(
        capsys, tmp_path, monkeypatch):
    """Before torch loads (seconds; under torchrun every rank at once) a terminal gets one line, and a refusal
    found after the wait follows it; under torchrun rank 0 alone says it, in a log too (torchrun's output is never
    one error line). The start lines name the first weights: a random init, the folder ``init.weights`` resolves
    to, or the run's checkpoint on --resume."""
    from bmojo_neuron.commands.train import describe, loading_line
    from bmojo_neuron.recipes import load_recipe

    argv = ["train", "cpu-tiny", "suite=none", "parallel.tp=2", "model.ssm_n_groups=2", "--output-dir",
            str(tmp_path / "run")]  # refused once torch is there: one process cannot hold tp 2
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    for rank, world, said in (("0", "1", ["training cpu-tiny: loading torch; the run's lines follow"]),
                              ("1", "2", [])):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("WORLD_SIZE", world)
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.splitlines()
        assert err[:-1] == said and err[-1].startswith("error: "), err
    monkeypatch.setenv("RANK", "0")  # torchrun's rank 0 of 2, its stderr a log: says it all the same
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert cli.main(["train", "cpu-tiny", "suite=none", "parallel.tp=4", "model.ssm_n_groups=4", "--output-dir",
                     str(tmp_path / "run")]) == 2  # 4 ranks wanted, 2 there: refused once torch is there
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "training cpu-tiny on 2 ranks: loading torch in every rank; the run's lines follow"
    assert len(err) == 2 and err[1].startswith("error: "), err
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert loading_line(load_recipe("cpu-tiny"), dry_run=True) == (
        "dry run of cpu-tiny: loading torch to count the parameters of 3 models")

    def weights(overrides: list[str], run_dir: Path, resume: bool = False) -> str:
        lines = describe(load_recipe(str(FIXTURES / "fixture.yaml"), overrides), 10, run_dir, resume).splitlines()
        return next(line for line in lines if line.startswith("  weights  "))[len("  weights  "):]

    finished = FIXTURES / "finished"
    assert weights(["run.seed=3"], tmp_path) == "random init (run.seed 3)"
    assert weights([f"init.weights={finished}"], tmp_path) == (
        f"init.weights {finished} (model folder {finished / 'final'})")
    assert weights([f"init.weights={finished / 'final'}"], tmp_path) == f"init.weights {finished / 'final'}"
    assert weights([f"init.weights={finished}"], finished, resume=True) == (
        "from its checkpoint (--resume; newest step-0000003)")
    assert weights([], tmp_path, resume=True) == "random init (run.seed 5)"  # nothing to resume: starts afresh


def test_dry_run_sees_a_used_run_directory(capsys, tmp_path):
    (tmp_path / "final").mkdir()  # a finished run's export
    assert cli.main(["train", "cpu-text", "--dry-run", "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "already holds a run" in out and "tokenized and packed into" in out


def test_dry_run_sees_the_logs_of_an_abandoned_attempt(capsys, tmp_path):
    """Logs without a checkpoint are what a run that failed early leaves: train starts afresh there."""
    (tmp_path / "metrics.jsonl").write_text("")
    assert cli.main(["train", "cpu-text", "--dry-run", "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert (f"output {tmp_path}: new run, replacing the logs of an attempt that ended before its first "
            "checkpoint") in out and "PROBLEM" not in out


def test_dry_run_sees_a_run_directory_in_use(capsys, tmp_path):
    """A live run's folder (a run still training there) is a PROBLEM naming its holder, as train would refuse it;
    the dry run leaves the lock file as it found it, and once the holder is gone the folder is free again."""
    run_dir = tmp_path / "run"
    argv = ["train", "cpu-tiny", "suite=none", "--dry-run", "--output-dir", str(run_dir)]
    with DirectoryLock(run_dir, purpose="train") as lock:
        held = lock.path.read_text()
        assert cli.main(argv) == 0
        assert (f"output {run_dir}: PROBLEM: in use by {held.strip()}; train would refuse it until that process "
                "ends\n") in capsys.readouterr().out
        assert cli.main([*argv, "--resume"]) == 0
        assert f"output {run_dir}: PROBLEM: in use by" in capsys.readouterr().out
        assert lock.path.read_text() == held and [p.name for p in run_dir.iterdir()] == [LOCK_NAME]
    assert cli.main(argv) == 0
    assert f"output {run_dir}: new run\n" in capsys.readouterr().out


def test_dry_run_sees_a_file_in_the_way_of_the_run_directory(capsys, tmp_path):
    """An output folder that is a file is one PROBLEM line per run, not "new run" beside a disk problem."""
    (tmp_path / "afile").write_text("")
    run_dir = tmp_path / "afile" / "run"
    assert cli.main(["train", "cpu-tiny", "suite=none", "--dry-run", "--output-dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert (f"output {run_dir}: PROBLEM: cannot be made or written: {tmp_path / 'afile'} is a file, not a folder\n"
            in out) and "new run" not in out and "disk" not in out


def test_dry_run_resume_makes_the_recipe_check_of_the_real_resume(capsys, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(FIXTURES / "one-process", run_dir)  # stopped after step 2
    argv = ["train", str(FIXTURES / "fixture.yaml"), "--resume", "--output-dir", str(run_dir), "--no-progress"]
    assert cli.main([*argv, "--dry-run"]) == 0
    assert f"output {run_dir}: resumes from step-0000002" in capsys.readouterr().out
    refusal = (f"error: cannot resume {run_dir / 'step-0000002'}: the recipe changed in model.hidden_size (8 in the "
               "checkpoint, 16 now), optim.lr (0.003 in the checkpoint, 0.01 now)\n")
    changed = [*argv, "model.hidden_size=16", "optim.lr=0.01"]
    assert cli.main([*changed, "--dry-run"]) == 0  # a dry run reports problems, as for every other check
    assert f"output {run_dir}: PROBLEM: {refusal.removeprefix('error: ')}" in capsys.readouterr().out
    assert cli.main(changed) == 2  # the real resume: the same words
    assert capsys.readouterr().err == refusal


def test_a_missing_init_weights_folder_is_named_by_its_key(capsys, tmp_path):
    missing = tmp_path / "no-such"
    argv = ["train", "cpu-tiny", "suite=none", f"init.weights={missing}", "--output-dir", str(tmp_path / "run")]
    assert cli.main([*argv, "--dry-run"]) == 0
    assert f"init.weights: PROBLEM: recipe key init.weights: {missing} does not exist\n" in capsys.readouterr().out
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == f"error: recipe key init.weights: {missing} does not exist\n"
    assert not (tmp_path / "run").exists()  # refused before the run directory was made


def test_a_run_that_fails_before_writing_its_directory_leaves_no_folder(capsys, tmp_path, tmp_path_factory,
                                                                        monkeypatch):
    """A tokenizer folder is first read while the data is built, after the run directory is locked (one that is
    not there is refused before: `test_refusals_read_from_files_come_before_torch_loads`): the failed run
    deletes its lock file and the folders it made (parents too), and keeps a folder that was there before."""
    locked = []
    acquire = DirectoryLock.acquire
    monkeypatch.setattr(DirectoryLock, "acquire", lambda self: locked.append(self.path) or acquire(self))
    empty = tmp_path_factory.mktemp("empty-tokenizer")  # there, but no tokenizer's files in it
    argv = ["train", "cpu-text", f"data.tokenizer={empty}", "train.steps=2", "--no-progress", "--output-dir"]
    refusal = f"error: data.tokenizer '{empty}': not 'byte' and not loadable as a Hugging Face tokenizer"
    run = tmp_path / "new" / "run"
    assert cli.main([*argv, str(run)]) == 2
    assert capsys.readouterr().err.startswith(refusal)
    assert locked == [run / ".lock"] and list(tmp_path.iterdir()) == []
    existing = tmp_path / "existing"
    existing.mkdir()
    assert cli.main([*argv, str(existing)]) == 2
    assert capsys.readouterr().err.startswith(refusal)
    assert list(tmp_path.iterdir()) == [existing] and list(existing.iterdir()) == []
    (existing / "metrics.jsonl").write_text("")  # an earlier attempt's logs and a file of the user's: kept
    (existing / "notes.txt").write_text("mine")
    assert cli.main([*argv, str(existing)]) == 2
    assert capsys.readouterr().err.startswith(refusal)
    assert sorted(p.name for p in existing.iterdir()) == [".lock", "metrics.jsonl", "notes.txt"]


def test_an_override_that_is_not_yaml_is_one_error_line(capsys):
    assert cli.main(["train", "cpu-tiny", "optim.betas=[0.9"]) == 2
    assert capsys.readouterr().err == ("error: override 'optim.betas=[0.9': not valid YAML: while parsing a flow "
                                       "sequence, expected ',' or ']', but got '<stream end>' (at character 5 of "
                                       "the value)\n")


# ------------------------------------------------------------------ a suite


def write_suite(path: Path) -> Path:
    """The tiny test recipe as a suite of two runs (2 steps, a checkpoint after each)."""
    recipe = json.loads(json.dumps(TINY_RECIPE))
    recipe["train"].update(steps=2, grad_accum=1)
    recipe["checkpoint"]["every"] = 1
    recipe["suite"] = [{"name": "first", "overrides": {}},
                       {"name": "second", "overrides": {"model.layer_pattern": "MM"}}]
    path.write_text(json.dumps(recipe))  # JSON is YAML
    return path


def test_a_suite_is_not_trained_into_a_run_directory(capsys, tmp_path):
    """A suite's runs go into <output dir>/<name>: an output dir holding a run of its own (one model of a suite,
    given to continue it) is refused, naming the command that continues that run, instead of a fresh suite
    inside it."""
    recipe, run = write_suite(tmp_path / "suite.yaml"), tmp_path / "first"
    (run / "final").mkdir(parents=True)  # a finished run's export
    (run / "metrics.jsonl").write_text("")
    argv = ["train", str(recipe), "--output-dir", str(run), "--no-progress"]
    problem = (f"{run} holds a run of its own, and this recipe's suite trains into {run}/<name>; to continue that "
               f"run, train it alone: bmojo-neuron train {run / 'recipe.json'} suite=none --resume --output-dir {run}")
    for extra in ([], ["--resume"]):
        assert cli.main([*argv, *extra]) == 2
        assert capsys.readouterr().err == f"error: {problem}\n"
    assert sorted(p.name for p in run.iterdir()) == ["final", "metrics.jsonl"]
    assert cli.main([*argv, "--dry-run"]) == 0
    assert f"output: PROBLEM: {problem}\n" in capsys.readouterr().out


def test_a_suite_run_stores_the_recipe_of_that_run_alone(capsys, tmp_path):
    """Each run of a suite stores its own recipe, without the suite: its recipe.json (the resume command that
    a damaged export names) resumes that run in its directory, not a new suite inside it."""
    recipe, out = write_suite(tmp_path / "suite.yaml"), tmp_path / "out"
    assert cli.main(["train", str(recipe), "run.jobs=1", "--output-dir", str(out), "--no-progress"]) == 0
    second = out / "second"
    stored = json.loads((second / "recipe.json").read_text())
    assert "suite" not in stored and "compare" not in stored
    assert (stored["run"]["name"], stored["model"]["layer_pattern"]) == ("second", "MM")
    capsys.readouterr()
    argv = ["train", str(second / "recipe.json"), "--resume", "--output-dir", str(second), "--no-progress"]
    assert cli.main([*argv, "--dry-run"]) == 0
    assert f"output {second}: resumes from step-0000002\n" in capsys.readouterr().out
    assert cli.main(argv) == 0  # a finished run: redoes the length eval and the export, nothing else
    assert not (second / "first").exists() and not (second / "second").exists()
    assert layout.latest_checkpoint(second).name == "step-0000002" and (second / "final").is_dir()


def test_a_parallel_recipe_at_one_rank_runs_without_a_launcher(tmp_path):
    """ZeRO-1 over one rank shards nothing; run as a plain process (no torchrun, so no MASTER_ADDR) it forms
    a one-rank group of its own and logs the losses of the run without it."""
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(json.dumps(TINY_RECIPE))
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    # the ZeRO-1 run forms a process group, so it runs in a process of its own; the plain one forms none and runs
    # here (a second interpreter would only import torch and transformers again)
    assert cli.main(["train", str(recipe), "--output-dir", str(tmp_path / "plain"), "--no-progress"]) == 0
    done = subprocess.run([sys.executable, "-m", "bmojo_neuron.cli", "train", str(recipe), "parallel.zero1=true",
                           "--output-dir", str(tmp_path / "zero1"), "--no-progress"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    losses = {}
    for name in ("plain", "zero1"):
        records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [r["loss"] for r in records if r["type"] == "train"]
    assert len(losses["plain"]) >= 2
    assert losses["zero1"] == pytest.approx(losses["plain"], rel=1e-5)


def test_a_command_line_override_a_suite_entry_sets_is_noted(capsys, tmp_path):
    """A suite entry's keys win over the command line's (its arms differ on purpose); a note says so."""
    recipe, out = write_suite(tmp_path / "suite.yaml"), str(tmp_path / "out")
    assert cli.main(["train", str(recipe), "model.layer_pattern=BB", "--output-dir", out, "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ("note: second keeps its suite entry's model.layer_pattern='MM', not the command line's "
                            "'BB' (an entry's keys win; suite=none trains the recipe alone)\n")
    assert "model    BB " in captured.out and "model    MM " in captured.out  # first takes the override, second not
    assert cli.main(["train", str(recipe), "model.layer_pattern=MM", "train.steps=1", "--output-dir", out,
                     "--dry-run"]) == 0
    assert capsys.readouterr().err == ""  # the same value, or a key no entry sets: nothing to note


def test_a_suite_whose_recipe_changed_is_refused_before_any_run_starts(capsys, tmp_path):
    """Every run's checkpoint is checked against its recipe before the first run starts: one `error:` line
    (the trainer's words), status 2, and no run trained, also in worker processes (`run.jobs`)."""
    recipe, out = write_suite(tmp_path / "suite.yaml"), tmp_path / "out"
    assert cli.main(["train", str(recipe), "run.jobs=1", "--output-dir", str(out), "--no-progress"]) == 0
    for run in ("first", "second"):
        assert [p.name for p in layout.list_checkpoints(out / run)] == ["step-0000001", "step-0000002"]
    shutil.rmtree(out / "first")  # resumed, it starts from scratch: nothing stops it but the check
    capsys.readouterr()
    changed = ["train", str(recipe), "optim.lr=0.5", "train.steps=3", "run.jobs=2", "--resume", "--output-dir",
               str(out), "--no-progress"]
    assert cli.main([*changed, "--dry-run"]) == 0
    change = "optim.lr (0.01 in the checkpoint, 0.5 now)"  # both values: the override to resume with is shown
    assert (f"output {out / 'second'}: PROBLEM: cannot resume {out / 'second' / 'step-0000002'}: the recipe changed "
            f"in {change}\n") in capsys.readouterr().out
    code = cli.main(changed)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err == f"error: cannot resume {out / 'second' / 'step-0000002'}: the recipe changed in {change}\n"
    assert not (out / "first").exists()  # the run that could start fresh did not start
    assert layout.latest_checkpoint(out / "second").name == "step-0000002"


def test_no_progress_drops_only_the_bar_not_the_step_and_eval_lines(capsys, tmp_path):
    recipe = write_suite(tmp_path / "suite.yaml")
    assert cli.main(["train", str(recipe), "suite=none", "train.log_every=1", "eval.every=2", "--output-dir",
                     str(tmp_path / "out"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert [line.split("  loss")[0] for line in out.splitlines() if " step " in line] == ["tiny step 1/2",
                                                                                        "tiny step 2/2"]
    assert "\nstep 2: eval loss " in out
    assert ", eval recall " in out and "accuracy" not in out  # the MQAR eval's accuracy is printed as recall


def write_three(path: Path) -> Path:
    """`write_suite` with a third run, so one of them can be left unstarted."""
    recipe = json.loads(write_suite(path).read_text())
    recipe["suite"].append({"name": "third", "overrides": {"run.seed": 5}})
    path.write_text(json.dumps(recipe))
    return path


def test_a_stopped_suite_reports_every_run(capsys, tmp_path, monkeypatch):
    """SIGINT stopped a suite run two at a time: each stopped run says where it stopped, the one that never
    started says so, and the status is SIGINT's (the pool's results are faked: no training here)."""
    from bmojo_neuron.training import TrainResult, run_pool

    out = tmp_path / "out"

    def stopped_pool(runs, jobs, resume=False, signals=None):
        assert jobs == 2
        signals.append(signal.SIGINT)
        return [TrainResult(out / "first", 10, 7, stop_signal=signal.SIGINT),
                TrainResult(out / "second", 10, 9, stop_signal=signal.SIGINT)]

    monkeypatch.setattr(run_pool, "train_in_processes", stopped_pool)
    assert cli.main(["train", str(write_three(tmp_path / "suite.yaml")), "run.jobs=2", "--output-dir", str(out),
                     "--no-progress"]) == 130
    assert capsys.readouterr().err.splitlines() == [
        f"first: stopped by SIGINT after step 7; {out / 'first'} has no checkpoint yet: continue with --resume",
        f"second: stopped by SIGINT after step 9; {out / 'second'} has no checkpoint yet: continue with --resume",
        "third: not started (stopped by SIGINT); train again with --resume to run it"]


def test_a_suite_trained_one_at_a_time_starts_no_run_after_a_stopped_one(capsys, tmp_path, monkeypatch):
    import bmojo_neuron.training as training

    out, trained = tmp_path / "out", []

    def first_one_stopped(recipe, run_dir, resume=False, progress=True):
        trained.append(recipe.run.name)
        return training.TrainResult(run_dir, 10, 4, stop_signal=signal.SIGTERM)

    monkeypatch.setattr(training, "train", first_one_stopped)
    assert cli.main(["train", str(write_three(tmp_path / "suite.yaml")), "run.jobs=1", "--output-dir", str(out),
                     "--no-progress"]) == 143
    assert trained == ["first"]
    assert capsys.readouterr().err.splitlines()[1:] == [
        "second: not started (stopped by SIGTERM); train again with --resume to run it",
        "third: not started (stopped by SIGTERM); train again with --resume to run it"]


def test_a_signal_between_two_runs_starts_no_further_run(capsys, tmp_path, monkeypatch, stop_signals_caught):
    import bmojo_neuron.training as training

    out, trained = tmp_path / "out", []

    def finished_then_signalled(recipe, run_dir, resume=False, progress=True):
        trained.append(recipe.run.name)
        signal.raise_signal(signal.SIGTERM)  # after its trainer let go of the signals: held by the command
        return training.TrainResult(run_dir, 10, 2, run_dir / "final", {"loss": 1.0, "perplexity": 2.7})

    monkeypatch.setattr(training, "train", finished_then_signalled)
    assert cli.main(["train", str(write_three(tmp_path / "suite.yaml")), "run.jobs=1", "--output-dir", str(out),
                     "--no-progress"]) == 143
    assert trained == ["first"]
    assert capsys.readouterr().err.splitlines() == [
        f"first: finished; final export in {out / 'first' / 'final'}",
        "second: not started (stopped by SIGTERM); train again with --resume to run it",
        "third: not started (stopped by SIGTERM); train again with --resume to run it"]


# ------------------------------------------------------------------ data prepare


def test_data_prepare_builds_the_cache_once(capsys, tmp_path):
    from bmojo_neuron.data.text import load_text_dataset

    cache = tmp_path / "cache"
    args = ["data", "prepare", "cpu-text", f"data.cache_dir={cache}", "data.block_size=512"]
    assert cli.main(args) == 0
    first, err = capsys.readouterr()
    assert "%|" not in err  # stderr is not a terminal here: no datasets progress bars in the log, plain lines
    entries = list(cache.glob("text-*"))
    stages = [line.split(" ", 2)[1] for line in err.splitlines() if not line.startswith("cpu-text:   ")]
    assert stages == ["building", "tokenizing", "packing", "saving", "built"], err
    assert err.startswith(f"cpu-text: building the data cache {cache.resolve()}/text-"), err
    assert len(entries) == 1 and (entries[0] / "meta.json").is_file()
    train, evaluation = load_text_dataset(block_size=512, cache_dir=cache)  # the recipe's other data settings
    assert f"{entries[0].resolve()} (built now)" in first
    assert f"train  {len(train):,} blocks × 512 tokens = {len(train) * 512:,} tokens" in first
    assert f"eval   {len(evaluation):,} blocks × 512 tokens" in first
    assert cli.main(args) == 0
    out, err = capsys.readouterr()
    assert "(already there)" in out and err == "" and list(cache.glob("text-*")) == entries


def test_data_prepare_names_a_relative_cache_by_one_absolute_path(capsys, tmp_path, monkeypatch):
    """A relative ``data.cache_dir``: the build's first line and the report at the end name the same folder, the
    absolute one (a path relative to the folder the command ran in would not be found from another)."""
    monkeypatch.chdir(tmp_path)
    assert cli.main(["data", "prepare", "cpu-text", "data.cache_dir=cache", "data.block_size=512"]) == 0
    out, err = capsys.readouterr()
    (built,) = (tmp_path / "cache").resolve().glob("text-*")
    assert err.startswith(f"cpu-text: building the data cache {built}: reading "), err
    assert "saving " in err and f" blocks into {built}\n" in err
    assert out.startswith(f"cpu-text: {built} (built now)\n"), out


def test_data_prepare_builds_the_cache_where_train_reads_it(capsys, tmp_path, monkeypatch):
    """A run's text cache is ``<its output dir>/../data-cache``: `train --output-dir DIR` reads DIR/../data-cache,
    a comparison's or suite's runs DIR/data-cache. `data prepare` with the same --output-dir builds it there."""
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "pair.yaml"
    recipe.write_text("data: {kind: text, block_size: 512}\n"
                      "compare: {name: fast, overrides: {optim.lr: 0.002}}\n")
    for name, out, cache in [("cpu-text", tmp_path / "exp" / "one", tmp_path / "exp" / "data-cache"),
                             (str(recipe), tmp_path / "pair", tmp_path / "pair" / "data-cache")]:
        assert cli.main(["train", name, "--dry-run", "--output-dir", str(out)]) == 0
        assert f"tokenized and packed into {cache} on first use" in capsys.readouterr().out
        assert cli.main(["data", "prepare", name, "--output-dir", str(out)]) == 0
        printed = capsys.readouterr().out
        entries = list(cache.glob("text-*"))
        assert len(entries) == 1 and f"{entries[0].resolve()} (built now)" in printed
        assert printed.count("built now") == 1  # the comparison's two runs read one cache: built once
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp", "pair", "pair.yaml"]  # no runs/ in the cwd


def test_a_hub_dataset_the_hub_cannot_serve_is_one_error_at_once(capsys, monkeypatch, tmp_path):
    """With no network (here) the look-up before load_dataset fails at once, instead of load_dataset's five
    retries (about 30 s); with one the name is not on the hub. Offline mode skips the look-up and names the
    Hugging Face cache the dataset is not in."""
    import time

    import datasets.config

    name = "bmojo-neuron-test/no-such-dataset"
    argv = ["data", "prepare", "cpu-text", f"data.path={name}", "--output-dir", str(tmp_path / "run")]
    start = time.monotonic()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: data.path {name}: ")
    assert ("a hub dataset, and the hub cannot be reached" in err and "HF_HUB_OFFLINE=1" in err) or \
        "the hub has no such dataset" in err
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    assert cli.main(argv) == 2
    assert capsys.readouterr().err.startswith(f"error: data.path {name}: a hub dataset, not in the Hugging Face "
                                              "cache, and offline mode is on")
    assert time.monotonic() - start < 10  # both, on a loaded machine; well under a second each when idle
    assert list(tmp_path.iterdir()) == []


def test_a_bad_data_file_is_one_line_of_one_format_in_train_data_prepare_and_eval(capsys, tmp_path):
    """Missing, empty, binary, Latin-1 and UTF-16 files are each refused in the same words by the commands that
    read data, ``error: data.path <file>: <problem>``, as one line before any work: the file's first MiB is read
    before torch loads (eval, inspect: before the model loads, so no `evaluating` line comes first)."""
    model = Path(shutil.copytree(FIXTURES / "finished", tmp_path / "model"))
    files = {"missing.txt": None, "empty.txt": b"", "image.txt": b"\x89PNG\r\n\x1a\n\x00\x00",
             "latin1.txt": "one line\ncaf\xe9\n".encode("latin-1"), "wide.txt": "hi".encode("utf-16")}
    problems = {
        "missing.txt": "no such file or folder (a hub dataset would be named owner/name, e.g. roneneldan/TinyStories)",
        "empty.txt": "no text (an empty file)",
        "image.txt": "not text: a NUL byte at offset 8, as in a binary file; give UTF-8 text (.txt, .md) or JSON "
                     "lines (.jsonl)",
        "latin1.txt": "not UTF-8 text: byte 0xe9 at offset 12 (line 2) invalid continuation byte; convert it, e.g. "
                      f"iconv -f latin1 -t utf-8 {tmp_path / 'latin1.txt'} > latin1.utf8.txt",
        "wide.txt": "not UTF-8 text: UTF-16 (it starts with a UTF-16 byte-order mark); convert it with iconv -f "
                    "utf-16 -t utf-8"}
    for name, data in files.items():
        path = tmp_path / name
        if data is not None:
            path.write_bytes(data)
        commands = [["train", "cpu-text", f"data.path={path}", "--output-dir", str(tmp_path / "run")]]
        if name in ("missing.txt", "latin1.txt"):  # one check (`check_source`) behind all: two files show it
            commands += [["data", "prepare", "cpu-text", f"data.path={path}", "--output-dir", str(tmp_path / "run")],
                         ["eval", str(model), "--data", "cpu-text", f"data.path={path}", "--device", "cpu"],
                         ["inspect", str(model), "--data", "cpu-text", f"data.path={path}", "--device", "cpu"]]
        for argv in commands:
            assert cli.main(argv) == 2
            out, err = capsys.readouterr()
            assert out == "" and err == f"error: data.path {path}: {problems[name]}\n", (argv, err)
    assert not (tmp_path / "run").exists() and not (model / "eval").exists()


def test_bad_data_files_a_used_run_directory_and_bad_counts_are_refused_before_torch_loads(tmp_path):
    """A binary file inside a folder source, a JSON-lines file with a line that is not JSON, and a folder's one whose
    line lacks the recipe's ``data.text_column``: `train`, `data prepare` and `eval --data` each refuse them in the
    one ``data.path`` format, naming the file and line, from a glance at the files before torch, transformers or
    datasets load (the build would find each only after them). A good folder passes the glance, an empty file in it
    too (the build skips it). So do, from their folders and arguments alone, `train` into a run directory that holds
    a run (without --resume), `eval --batches 0`, `kernels profile` of no kernels (before the kernels and their
    emulator import), and `train` of a model with fewer ids than its text's tokenizer (the byte one, or a local
    folder's tokenizer.json), which would otherwise stop at the first step on an index error."""
    from bmojo_neuron.data.text import check_source

    folder, keyless, docs = tmp_path / "corpus", tmp_path / "keyless", tmp_path / "docs.jsonl"
    for root in (folder, keyless):
        (root / "sub").mkdir(parents=True)
        (root / "a.txt").write_text("some text\n")
    (folder / "empty.md").write_bytes(b"")
    (folder / "sub" / "photo.md").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF")
    (keyless / "sub" / "rows.jsonl").write_text('{"text": "one"}\n{"body": "two"}\n')
    docs.write_text('{"text": "one"}\n\n{"text": "two"\n{"text": "three"}\n')
    model, out = FIXTURES / "finished", str(tmp_path / "run")
    used = Path(shutil.copytree(model, tmp_path / "used"))
    tokenizer = tmp_path / "tokenizer"  # 300 ids, in tokenizer.json: more than cpu-text's model has (256)
    tokenizer.mkdir()
    (tokenizer / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordLevel", "unk_token": "w0", "vocab": {
        f"w{i}": i for i in range(300)}}, "added_tokens": []}))
    commands = [["train", "cpu-text", f"data.path={folder}", "--output-dir", out],
                ["data", "prepare", "cpu-text", f"data.path={folder}"],
                ["eval", str(model), "--data", "cpu-text", f"data.path={folder}"],
                ["train", "cpu-text", f"data.path={docs}", "--output-dir", out],
                ["eval", str(model), "--data", f"data.path={docs}"],
                ["data", "prepare", "cpu-text", f"data.path={keyless}", "--output-dir", out],
                ["train", "cpu-tiny", "suite=none", "--output-dir", str(used)],
                ["eval", str(model), "--batches", "0"], ["kernels", "profile", "--kernels", ""],
                ["train", "cpu-text", "model.vocab_size=100", "--output-dir", out],
                ["train", "cpu-text", f"data.tokenizer={tokenizer}", "--output-dir", out]]
    code = ("import sys; from bmojo_neuron.cli import main; "
            f"codes = [main(args) for args in {commands!r}]; "
            "print(codes, sorted(m for m in ('torch', 'transformers', 'datasets', 'nki_kernels') if m in sys.modules))")
    done = _cli(code=code)
    assert done.stdout.splitlines() == [f"{[2] * 11} []"], done.stderr
    photo = (f"error: data.path {folder}: {folder / 'sub' / 'photo.md'}: not text: a NUL byte at offset 4, as in a "
             "binary file; give UTF-8 text (.txt, .md) or JSON lines (.jsonl)")
    line = f"error: data.path {docs}: line 3 is not JSON: Expecting ',' delimiter at column 15"
    key = (f"error: data.path {keyless}: {keyless / 'sub' / 'rows.jsonl'}: line 2 has no key 'text' "
           "(data.text_column; its keys: body)")
    assert done.stderr.splitlines()[:6] == [photo] * 3 + [line] * 2 + [key]
    assert done.stderr.splitlines()[6:8] == [f"error: {used} already holds a run; pass --resume to continue it, or "
                                             "pick another --output-dir", "error: --batches must be >= 1, got 0"]
    assert done.stderr.splitlines()[8].startswith("error: no kernels given: --kernels is empty")
    embedding = "; the embedding needs a row for every id"
    assert done.stderr.splitlines()[9:] == [
        "error: recipe key model.vocab_size: is 100, smaller than the byte tokenizer's 256 ids (data.tokenizer: byte)"
        + embedding, f"error: recipe key model.vocab_size: is 256, smaller than the 300 ids of data.tokenizer "
        f"'{tokenizer}' (its tokenizer.json)" + embedding]
    assert not Path(out).exists() and not (model / "eval").exists()
    (folder / "sub" / "photo.md").unlink()
    assert check_source(str(folder), "text") == "folder"
    docs.write_text('{"text": "one"}\n["two"]\n')  # with the column not known yet (eval of a model's own column)
    with pytest.raises(ValueError, match=r"docs.jsonl: line 2 is a JSON list, not an object$"):
        check_source(str(docs), None)


def _tokenizer_files(folder: Path, ids: int, config: dict) -> None:
    """A WordLevel tokenizer of `ids` tokens, written as JSON (no transformers), `config` its tokenizer_config.json."""
    folder.mkdir(parents=True)
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordLevel", "unk_token": "w0", "vocab": {
        f"w{i}": i for i in range(ids)}}, "added_tokens": []}))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def test_a_tokenizer_without_eos_or_a_cached_hub_one_too_large_is_refused_before_transformers_loads(tmp_path):
    """`train` and `data prepare` of text whose tokenizer folder names no eos token (packing needs one) refuse it in
    one line from its files, before torch or transformers load (the load would find it after seconds); so does
    `train` of a model with fewer ids than a hub tokenizer in the local Hugging Face cache, offline."""
    noeos, out = tmp_path / "noeos", str(tmp_path / "run")
    _tokenizer_files(noeos, 40, {"tokenizer_class": "TokenizersBackend"})
    repo = tmp_path / "hub" / "models--someone--big"
    _tokenizer_files(repo / "snapshots" / ("0" * 40), 300, {"tokenizer_class": "TokenizersBackend", "eos_token": "w0"})
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    commands = [["train", "cpu-text", f"data.tokenizer={noeos}", "--output-dir", out],
                ["data", "prepare", "cpu-text", f"data.tokenizer={noeos}", "--output-dir", out],
                ["train", "cpu-text", "data.tokenizer=someone/big", "--output-dir", out]]
    code = ("import sys; from bmojo_neuron.cli import main; "
            f"codes = [main(args) for args in {commands!r}]; "
            "print(codes, sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"})
    assert done.stdout.splitlines() == ["[2, 2, 2] []"], done.stderr
    no_eos = (f"error: data.tokenizer '{noeos}': has no eos token (neither its tokenizer_config.json nor "
              'special_tokens_map.json names one); packing needs one to separate documents: set "eos_token" in its '
              "tokenizer_config.json")
    assert done.stderr.splitlines() == [no_eos, no_eos, (
        "error: recipe key model.vocab_size: is 256, smaller than the 300 ids of data.tokenizer 'someone/big' (its "
        "tokenizer.json); the embedding needs a row for every id")]
    assert not Path(out).exists()


def test_data_prepare_has_nothing_to_do_for_mqar(capsys):
    assert cli.main(["data", "prepare", "cpu-tiny"]) == 0
    assert "nothing to prepare" in capsys.readouterr().out


def test_no_live_bar_silences_the_data_libraries_bars_and_restores_them(capsys, tmp_path, monkeypatch):
    """Building a text cache without a live bar (output redirected, as here, or --no-progress) prints no
    datasets bars (tokenize, pack, save_to_disk); the process's own setting is back afterwards. The build says
    its stages in plain lines instead, as `data prepare` does: `train` among its run's lines before the first
    step, `eval` (here of another block size, a cache of its own) on stderr, its stdout left to the table."""
    import datasets
    from huggingface_hub.utils import are_progress_bars_disabled

    from bmojo_neuron.data.text import CORPUS_DIR
    from bmojo_neuron.training.progress import shows_live_bar

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert [shows_live_bar(p) for p in (True, "lines", "shared", False)] == [True, False, False, False]
    monkeypatch.undo()

    tiny = ["data.block_size=32", "train.steps=1", "train.batch_size=2", "eval.batches=1",
            "eval.length_multipliers=[1]", "model.hidden_size=32", "model.intermediate_size=32",
            "model.num_hidden_layers=2", "model.layer_pattern=BM", f"data.cache_dir={tmp_path / 'cache'}"]
    assert datasets.is_progress_bar_enabled() and not are_progress_bars_disabled()
    capsys.readouterr()
    assert not sys.stderr.isatty()  # pytest's capture: a run's output redirected
    assert cli.main(["train", "cpu-text", *tiny, "--output-dir", str(tmp_path / "run")]) == 0
    out, err = capsys.readouterr()
    entries = list((tmp_path / "cache").glob("text-*"))
    assert len(entries) == 1  # the cache was built in this run
    for bar in ("tokenize", "pack", "Saving the dataset", "%|", "\r"):
        assert bar not in err, err
    assert datasets.is_progress_bar_enabled() and not are_progress_bars_disabled()
    lines = out.splitlines()
    stages = [next(i for i, line in enumerate(lines) if line.startswith(stage)) for stage in
              (f"building the data cache {entries[0]}: reading {CORPUS_DIR}", "tokenizing 4 documents of "
               f"{CORPUS_DIR} (tokenizer byte)", "packing ", "saving ", "built in ", "cpu-text step 1/1 ")]
    assert stages == sorted(stages) and lines[stages[3]].endswith(f" blocks into {entries[0]}"), out

    import bmojo_neuron.evaluation

    monkeypatch.setattr(bmojo_neuron.evaluation, "plot_length", lambda *args, **kwargs: None)  # matplotlib: 1-2 s
    argv = ["eval", str(tmp_path / "run"), "--data", "block_size=16", "--lengths", "1", "--batches", "1"]
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    built = set((tmp_path / "cache").glob("text-*")) - set(entries)
    assert len(built) == 1 and "building" not in out and "loss" in out
    assert f"cpu-text: building the data cache {built.pop()}: reading {CORPUS_DIR}\n" in err
    assert "\ncpu-text: built in " in err and "%|" not in err, err


def test_text_cache_follows_the_output_dir_and_nothing_lands_in_the_cwd(capsys, tmp_path, monkeypatch):
    """docs/data.md: the text cache is ``<output_dir>/../data-cache``, ``--output-dir`` included."""
    import json

    cwd, root = tmp_path / "cwd", tmp_path / "root"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    tiny = ["data.block_size=32", "train.steps=1", "train.batch_size=2", "eval.batches=1",
            "eval.length_multipliers=[1]", "model.hidden_size=32", "model.intermediate_size=32",
            "model.num_hidden_layers=2", "model.layer_pattern=BM", "--no-progress"]
    assert cli.main(["train", "cpu-text", *tiny, "--output-dir", str(root / "text")]) == 0
    assert json.loads((root / "text" / "recipe.json").read_text())["data"]["cache_dir"] == str(root / "data-cache")
    assert [p.name[:5] for p in (root / "data-cache").iterdir()] == ["text-"]
    assert list(cwd.iterdir()) == []
    capsys.readouterr()
    other = tmp_path / "elsewhere"  # an explicit data.cache_dir wins
    assert cli.main(["train", "cpu-text", f"data.cache_dir={other}", "--dry-run", "--output-dir",
                     str(root / "b")]) == 0
    assert f"tokenized and packed into {other} on first use" in capsys.readouterr().out
    assert cli.main(["train", "cpu-text", "data.path=missing.txt", "--output-dir", str(root / "c")]) == 2
    assert "error: data.path missing.txt: no such file or folder" in capsys.readouterr().err
    assert list(cwd.iterdir()) == [] and not (root / "c").exists()


def test_dry_run_sees_a_data_cache_already_built(capsys, tmp_path):
    """After `data prepare` (same overrides and --output-dir), the dry run names the built cache instead of asking
    for it to be built; other packing settings are another cache, still to build."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a few words of text, repeated. " * 200)
    out = tmp_path / "runs" / "text"
    args = ["cpu-text", f"data.path={corpus}", "data.block_size=32", "--output-dir", str(out)]
    assert cli.main(["data", "prepare", *args]) == 0
    built = capsys.readouterr().out.splitlines()[0].split(": ", 1)[1].split(" (built now)")[0]
    assert cli.main(["train", *args, "--dry-run"]) == 0
    assert f"data: {corpus} (text-file): already tokenized and packed in {built} (a `data prepare` or an earlier " \
           "run)" in capsys.readouterr().out
    assert cli.main(["train", *args, "data.block_size=16", "--dry-run"]) == 0
    assert f"data: {corpus} (text-file): tokenized and packed into {out.parent / 'data-cache'} on first use" \
           in capsys.readouterr().out


def test_dry_run_names_a_relative_data_cache_by_its_absolute_path(capsys, tmp_path, monkeypatch):
    """The dry run names the cache folder as the build and `data prepare` will (one absolute path), not as the
    recipe or the command line gave it."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a few words of text, repeated. " * 200)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "cpu-text", f"data.path={corpus}", "data.cache_dir=rel/cache", "--output-dir",
                     "runs/text", "--dry-run"]) == 0
    assert f"tokenized and packed into {tmp_path / 'rel' / 'cache'} on first use" in capsys.readouterr().out


# ------------------------------------------------------------------ the output folder


def test_an_output_dir_of_unrelated_files_is_refused_before_any_work(capsys, tmp_path):
    """docs/training.md, The output directory: a folder of someone's files and no run (`~`, a project folder) is
    refused in one line naming it, a few of its entries and a subfolder to use; an empty folder trains, and a
    run folder resumes with a file of the user's beside the run, as does a suite's folder holding its runs."""
    home, recipe = tmp_path / "home", write_suite(tmp_path / "suite.yaml")
    for folder in ("Documents", "project"):
        (home / folder).mkdir(parents=True)
    for name in ("notes.txt", "a.py", ".bashrc", ".DS_Store"):
        (home / name).write_text("mine")
    before = sorted(p.name for p in home.iterdir())
    argv = ["train", str(recipe), "suite=none", "--no-progress", "--output-dir"]
    problem = (f"--output-dir {home} is a folder of other files (Documents, a.py, notes.txt, project, ... "
               "(5 entries)) and holds no run (no recipe.json, metrics.jsonl or step-* checkpoint): the run would "
               "write its checkpoints and logs among them; pick a new or empty folder, e.g. --output-dir "
               f"{home / 'tiny'}")
    for extra in ([], ["--resume"]):
        assert cli.main([*argv, str(home), *extra]) == 2
        assert capsys.readouterr().err == f"error: {problem}\n"
    assert sorted(p.name for p in home.iterdir()) == before  # not even a lock file
    assert cli.main([*argv, str(home), "--dry-run"]) == 0
    assert f"output: PROBLEM: {problem}\n" in capsys.readouterr().out

    run = tmp_path / "run"
    run.mkdir()
    (run / ".DS_Store").write_text("")  # what a file manager leaves does not make a folder someone's
    assert cli.main([*argv, str(run)]) == 0
    (run / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert cli.main([*argv, str(run), "--resume", "--dry-run"]) == 0  # the check train makes, as above
    out = capsys.readouterr().out
    assert f"output {run}: resumes from step-0000002\n" in out and "PROBLEM" not in out

    suite_root = tmp_path / "suite"
    (suite_root / "first").mkdir(parents=True)
    (suite_root / "first" / "metrics.jsonl").write_text("")
    (suite_root / "README.md").write_text("mine")
    assert cli.main(["train", str(recipe), "--dry-run", "--output-dir", str(suite_root)]) == 0
    assert "PROBLEM" not in capsys.readouterr().out


def test_a_tilde_is_the_home_folder_and_python_callers_get_the_same_refusal(capsys, tmp_path, monkeypatch):
    """A literal ``~`` (quoted, ``--output-dir=~``, ``run.output_dir=~/x``, YAML) is the home folder wherever an
    output path enters: the CLI, the suite planner, the recipe and `training.train`; and `training.train` called
    from Python refuses a folder of other files with the CLI's error, before writing anything."""
    from bmojo_neuron.recipes import load_recipe
    from bmojo_neuron.training import train
    from bmojo_neuron.recipe_runs import plan_runs

    home, cwd, suite = tmp_path / "home", tmp_path / "cwd", write_suite(tmp_path / "suite.yaml")
    for folder in (home, cwd):
        folder.mkdir()
    (home / "notes.txt").write_text("mine")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    problem = (f"{{}} {home} is a folder of other files (notes.txt) and holds no run (no recipe.json, metrics.jsonl "
               "or step-* checkpoint): the run would write its checkpoints and logs among them; pick a new or empty "
               f"folder, e.g. {{}}{home / 'tiny'}")
    assert cli.main(["train", str(suite), "suite=none", "--output-dir=~"]) == 2
    assert capsys.readouterr().err == f"error: {problem.format('--output-dir', '--output-dir ')}\n"
    alone = load_recipe(str(suite), ["suite=none"])
    with pytest.raises(ValueError) as given:
        train(alone, "~")
    assert str(given.value) == problem.format("output_dir", "output_dir=")
    with pytest.raises(ValueError) as in_recipe:
        train(alone.with_overrides(["run.output_dir=~/"]))  # a bare ~ is YAML's null: the default folder
    assert str(in_recipe.value) == problem.format("run.output_dir", "run.output_dir=")
    assert [p.name for p in home.iterdir()] == ["notes.txt"] and list(cwd.iterdir()) == []

    assert [str(d) for _, d in plan_runs(load_recipe(str(suite)), "~/runs")] == [
        str(home / "runs" / "first"), str(home / "runs" / "second")]
    text = load_recipe("cpu-text", ["run.output_dir=~/runs/text"])
    assert text.run.output_dir == str(home / "runs" / "text")
    assert text.data.cache_dir == str(home / "runs" / "data-cache")
