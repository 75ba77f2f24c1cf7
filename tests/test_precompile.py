"""`bmojo-neuron precompile`: the command it runs, the checks before, and the cache check after.

A fake `neuron_parallel_compile` is put first on PATH: it records its argv and
environment, writes cache entries into the --cache_dir of NEURON_CC_FLAGS (as the
real tool does after extracting and compiling graphs) and prints the real tool's
log lines, including a failed compile when asked.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

import pytest

from bmojo_neuron.cli import main
from bmojo_neuron.launch.plan import build_plan
from bmojo_neuron.neuron import INSTALL_COMMAND
from bmojo_neuron.recipes import load_recipe

VERSION = "neuronxcc-2.23.6484.0+ab12cd34"
RECIPE = "trn1/bmojo-130m"

FAKE_TOOL = r'''#!{python}
"""Stands in for neuron_parallel_compile: FAKE_NPC_MODE = ok | fail | warm | none, FAKE_NPC_EXIT = status."""
import json, os, shlex, sys
from pathlib import Path

argv = sys.argv[1:]
flags = os.environ.get("NEURON_CC_FLAGS", "")
cache = Path([f.split("=", 1)[1] for f in shlex.split(flags) if f.startswith("--cache_dir=")][-1])
run_dir = Path([a.split("=", 1)[1] for a in argv if a.startswith("run.output_dir=")][0])
Path(os.environ["FAKE_NPC_RECORD"]).write_text(json.dumps({{
    "argv": argv, "env": {{k: os.environ.get(k) for k in ("NEURON_CC_FLAGS", "NEURON_RT_NUM_CORES",
                                                         "NEURON_RT_STOCHASTIC_ROUNDING_EN")}},
    "run_dir_found": sorted(p.name for p in run_dir.iterdir()) if run_dir.exists() else None}}))
run_dir.mkdir(parents=True, exist_ok=True)
(run_dir / "metrics.jsonl").write_text("{{}}\n")  # what the trial training run writes

def entry(name, files):
    folder = cache / "{version}" / ("MODULE_" + name + "+d41d8cd9")
    folder.mkdir(parents=True, exist_ok=True)
    for file, data in files.items():
        (folder / file).write_bytes(data)
    return folder

mode = os.environ.get("FAKE_NPC_MODE", "ok")
if mode in ("ok", "fail"):
    graphs = ["111", "222"] + (["333"] if mode == "fail" else [])
    for g in graphs:
        folder = entry(g, {{"model.hlo_module.pb": b"hlo", "compile_flags.json": b"[]"}})
        print(f"INFO ||NEURON_CC_WRAPPER||: Extracting graphs ({{folder}}/model.hlo_module.pb) for "
              "ahead-of-time parallel compilation. No compilation was done.", flush=True)
    for g in graphs[:2]:
        entry(g, {{"model.neff": b"NEFF" * 100, "model.done": b""}})
    if mode == "fail":
        entry("333", {{"model.log": b"ERROR 1\nERROR 2: NCC_IXTP002 the tensorizer gave up\n"}})
        print("INFO ||NEURON_PARALLEL_COMPILE||: Total failed compilations: 1", flush=True)
elif mode == "warm":
    print(f"INFO ||NCC_WRAPPER||: Using a cached neff at {{cache}}/{version}/MODULE_999+d41d8cd9/model.neff. "
          "Exiting with a successfully compiled graph.", flush=True)
sys.exit(int(os.environ.get("FAKE_NPC_EXIT", "0")))
'''


@pytest.fixture
def setup(tmp_path, monkeypatch):
    """The fake tool first on PATH, a data file, a cache folder; returns a dict of paths."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "neuron_parallel_compile"
    tool.write_text(FAKE_TOOL.format(python=sys.executable, version=VERSION))
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    record = tmp_path / "record.json"
    monkeypatch.setenv("FAKE_NPC_RECORD", str(record))
    for key in ("MASTER_ADDR", "NODE_RANK", "SLURM_NODEID", "SLURM_JOB_ID", "SLURM_STEP_ID", "NEURON_CC_FLAGS",
                "FAKE_NPC_MODE", "FAKE_NPC_EXIT"):
        monkeypatch.delenv(key, raising=False)
    data = tmp_path / "data.txt"
    data.write_text("some text to train on\n" * 10)
    overrides = ["model.num_hidden_layers=2", "model.layer_pattern=BB", "train.batch_size=2",
                 f"data.path={data}", "data.tokenizer=byte"]  # the recipe's hub tokenizer: its own tests
    return {"tmp": tmp_path, "record": record, "cache": tmp_path / "cache", "overrides": overrides,
            "bin": bin_dir}


def precompile(capsys, setup, *extra: str, overrides=None) -> tuple[int, str, str]:
    argv = ["precompile", RECIPE, *(setup["overrides"] if overrides is None else overrides),
            "--instance", "trn1.2xlarge", "--cache-dir", str(setup["cache"]), *extra]
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def recorded(setup) -> dict:
    return json.loads(setup["record"].read_text())


def entry_key(graph: str) -> str:
    return f"{VERSION}/MODULE_{graph}+d41d8cd9"


def test_runs_the_plans_command_with_its_environment(setup, capsys):
    code, out, _ = precompile(capsys, setup, "--steps", "5")
    assert code == 0, out
    rec = recorded(setup)
    recipe = load_recipe(RECIPE, setup["overrides"])
    plan = build_plan(recipe, RECIPE, setup["overrides"], instance="trn1.2xlarge", cache_dir=str(setup["cache"]))
    base = shlex.split(plan.torchrun)
    assert rec["argv"][:len(base)] == base  # the real run's line, untouched
    run_dir = rec["argv"][-1].split("=", 1)[1]
    assert rec["argv"][len(base):] == ["train.steps=5", "eval.every=5", "checkpoint.every=5",
                                       f"run.output_dir={run_dir}"]
    assert rec["env"]["NEURON_CC_FLAGS"] == plan.env["NEURON_CC_FLAGS"]
    assert f"--cache_dir={setup['cache']}" in rec["env"]["NEURON_CC_FLAGS"]
    assert rec["env"]["NEURON_RT_NUM_CORES"] == "1" and rec["env"]["NEURON_RT_STOCHASTIC_ROUNDING_EN"] == "1"  # bf16 without ZeRO-1
    assert "Extracting graphs" in out  # the tool's output is streamed
    assert "2 new" in out and "OK: 2 graphs complete" in out and plan.torchrun in out
    assert not Path(run_dir).exists()  # the scratch run directory is removed


def test_output_dir_is_kept_when_given(setup, capsys):
    run_dir = setup["tmp"] / "trial-run"
    code, _, _ = precompile(capsys, setup, "--output-dir", str(run_dir))
    assert code == 0 and recorded(setup)["argv"][-1] == f"run.output_dir={run_dir}"
    assert (run_dir / "metrics.jsonl").is_file()


def test_failed_compile_fails_and_shows_the_log(setup, capsys, monkeypatch):
    monkeypatch.setenv("FAKE_NPC_MODE", "fail")
    code, out, _ = precompile(capsys, setup)
    assert code == 1
    assert f"FAILED     {entry_key('333')}" in out and "NCC_IXTP002 the tensorizer gave up" in out
    assert "FAILED: 1 of 3 graphs did not compile" in out
    assert entry_key("111") not in out.split("precompile check")[1]  # complete graphs are not listed


def test_a_run_that_compiles_nothing_fails(setup, capsys, monkeypatch):
    monkeypatch.setenv("FAKE_NPC_MODE", "none")
    code, out, _ = precompile(capsys, setup)
    assert code == 1 and "left no graph" in out


def test_tool_exit_status_is_reported(setup, capsys, monkeypatch):
    monkeypatch.setenv("FAKE_NPC_EXIT", "3")
    code, out, _ = precompile(capsys, setup)
    assert code == 1 and "exited with status 3" in out


def test_warm_cache_counts_the_graphs_named_in_the_output(setup, capsys, monkeypatch):
    for graph, files in (("999", ("model.neff", "model.done")), ("555", ("model.log",))):
        folder = setup["cache"] / entry_key(graph)
        folder.mkdir(parents=True)
        for name in files:
            (folder / name).write_bytes(b"x")
    monkeypatch.setenv("FAKE_NPC_MODE", "warm")
    code, out, _ = precompile(capsys, setup)
    # the old failed entry 555 belongs to some other run: neither touched nor named, so not checked
    assert code == 0 and "0 new, 0 updated, 1 already compiled" in out and entry_key("555") not in out


def test_dry_run_runs_nothing(setup, capsys):
    code, out, _ = precompile(capsys, setup, "--dry-run")
    assert code == 0 and not setup["record"].exists()
    assert "neuron_parallel_compile torchrun --nproc-per-node 2" in out and "train.steps=3" in out
    assert f"--cache_dir={setup['cache']}" in out and f"found at {setup['bin']}" in out
    # the graph check is plan's (too slow for every dry run): the line to run it, with the same overrides
    graph_check = shlex.join(["bmojo-neuron", "plan", RECIPE, *setup["overrides"], "--check-graph"])
    assert f"  the step graph against neuronx-cc's refusals: not run here (a minute or more, any machine): " \
           f"{graph_check}\n" in out


def test_a_tokenizer_the_trial_run_could_not_get_fails_before_running(setup, capsys, monkeypatch):
    """The recipe's hub tokenizer, neither in the Hugging Face cache nor reachable (the look-up is replaced by one
    that fails as offline mode does), is refused in one line before the tool starts, as `train` refuses it; a dry
    run names where the tokenizer comes from instead, as `train --dry-run` does, and asks no hub."""
    from bmojo_neuron.data import tokenizer as tokenizers
    from bmojo_neuron.data.hub import HubUnreachable

    asked: list[str] = []

    def offline(name, repo_type):
        asked.append(name)
        raise HubUnreachable("OfflineModeIsEnabled: offline")

    monkeypatch.setattr(tokenizers, "look_up_on_hub", offline)
    monkeypatch.setattr(tokenizers, "_in_hub_cache", lambda name: False)
    hub_tokenizer = [o for o in setup["overrides"] if not o.startswith("data.tokenizer=")]
    code, out, err = precompile(capsys, setup, overrides=hub_tokenizer)
    assert code == 2 and not setup["record"].exists() and out == ""
    assert err.splitlines() == ["error: data.tokenizer 'EleutherAI/gpt-neox-20b': not 'byte', not a local folder "
                                "and not in the local Hugging Face cache, and the hub cannot be reached "
                                "(OfflineModeIsEnabled: offline); download it where online, or point "
                                "data.tokenizer at a folder with its files"]
    assert asked == ["EleutherAI/gpt-neox-20b"]
    code, out, _ = precompile(capsys, setup, "--dry-run", overrides=hub_tokenizer)
    assert code == 0 and asked == ["EleutherAI/gpt-neox-20b"]
    assert "\n  tokenizer: EleutherAI/gpt-neox-20b: not in the local Hugging Face cache, so the run downloads it " \
           "from the hub when it starts (offline it stops there)" in out
    code, out, _ = precompile(capsys, setup, "--dry-run")
    assert code == 0 and "\n  tokenizer: byte (built in, nothing to download)\n" in out


def test_missing_tool_names_the_neuron_packages(setup, capsys, monkeypatch):
    empty = setup["tmp"] / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    code, out, err = precompile(capsys, setup)
    assert code == 2 and out == ""
    assert "neuron_parallel_compile is not on PATH" in err
    assert "torch-neuronx" in err and "neuronx-cc" in err and INSTALL_COMMAND in err


def test_multi_node_fills_in_master_and_rank(setup, capsys, monkeypatch):
    monkeypatch.chdir(setup["tmp"])  # the trial run dir goes next to the real one (runs/<name>) under the CWD
    # several nodes need EFA, so trn1.32xlarge (dp 64: the global batch divides by it)
    overrides = [o if not o.startswith("train.batch_size") else "train.batch_size=64" for o in setup["overrides"]]
    code, _, err = precompile(capsys, setup, "--nodes", "2", "--instance", "trn1.32xlarge", overrides=overrides)
    assert code == 2 and "MASTER_ADDR" in err and not setup["record"].exists()
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.7")
    monkeypatch.setenv("SLURM_NODEID", "5")
    code, _, err = precompile(capsys, setup, "--nodes", "2", "--instance", "trn1.32xlarge", overrides=overrides)
    assert code == 2 and "NODE_RANK" in err and "'5'" in err
    monkeypatch.setenv("SLURM_NODEID", "1")
    code, out, _ = precompile(capsys, setup, "--nodes", "2", "--instance", "trn1.32xlarge", overrides=overrides)
    assert code == 0, out
    argv = recorded(setup)["argv"]
    assert argv[argv.index("--nnodes") + 1] == "2" and argv[argv.index("--node-rank") + 1] == "1"
    assert argv[argv.index("--master-addr") + 1] == "10.0.0.7"
    shared = setup["tmp"] / "runs" / "precompile" / "bmojo-130m-nodes2"  # the same name on every node
    assert argv[-1] == f"run.output_dir={shared}"
    assert shared.is_dir()  # node 1 leaves it; node 0 removes it
    monkeypatch.setenv("SLURM_NODEID", "0")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_STEP_ID", "3")
    assert precompile(capsys, setup, "--nodes", "2", "--instance", "trn1.32xlarge", overrides=overrides)[0] == 0
    in_job = setup["tmp"] / "runs" / "precompile" / "bmojo-130m-slurm77.3"
    assert recorded(setup)["argv"][-1] == f"run.output_dir={in_job}" and not in_job.exists()
    code, out, _ = precompile(capsys, setup, "--nodes", "2", "--instance", "trn1.32xlarge", "--dry-run", overrides=overrides)
    assert code == 0 and "srun --nodes 2 --ntasks-per-node 1" in out and "bmojo-neuron precompile" in out


def test_node_0_clears_a_trial_run_a_killed_precompile_left(setup, capsys, monkeypatch):
    """The multi-node scratch folder's name is fixed (node count, or job step): a precompile killed during its
    hours of compiling leaves a finished trial run there, which the next trial run would refuse. Node 0
    removes it before the tool starts."""
    monkeypatch.chdir(setup["tmp"])
    overrides = [o if not o.startswith("train.batch_size") else "train.batch_size=64" for o in setup["overrides"]]
    stale = setup["tmp"] / "runs" / "precompile" / "bmojo-130m-nodes2"
    (stale / "step-0000003").mkdir(parents=True)
    (stale / "metrics.jsonl").write_text("{}\n")
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.7")
    monkeypatch.setenv("SLURM_NODEID", "0")
    code, out, _ = precompile(capsys, setup, "--nodes", "2", "--instance", "trn1.32xlarge", overrides=overrides)
    assert code == 0, out
    assert f"removing {stale}, left by an earlier precompile" in out
    assert recorded(setup)["run_dir_found"] is None and not stale.exists()  # gone before the tool ran


@pytest.mark.parametrize("extra, overrides, message", [
    (["--steps", "0"], None, "--steps is 0"),
    ([], ["model.num_hidden_layers=2", "model.layer_pattern=BB", "train.batch_size=2"], "data.path"),
    ([], ["train.batch_size=3", "data.path=DATA", "data.tokenizer=byte"], "train.batch_size"),
    ([], ["trian.steps=3"], "trian"),
])
def test_bad_input_fails_before_running(setup, capsys, extra, overrides, message):
    data = next(o for o in setup["overrides"] if o.startswith("data.path="))
    overrides = overrides and [data if o == "data.path=DATA" else o for o in overrides]
    code, out, err = precompile(capsys, setup, *extra, overrides=overrides)
    assert code == 2 and message in err and not setup["record"].exists()


def test_bad_output_dir_fails_before_running(setup, capsys):
    """--output-dir is checked as train checks its run directory: writable, not holding a run, and no folder of
    other files."""
    used = setup["tmp"] / "used"
    (used / "final").mkdir(parents=True)  # a finished run's export
    a_file = setup["tmp"] / "a-file"
    a_file.write_text("")
    others = setup["tmp"] / "project"  # a folder of someone's files, as train refuses it
    others.mkdir()
    (others / "main.py").write_text("")
    for output_dir, message in [
        (used, f"error: --output-dir {used} already holds a run; the trial run would refuse it"),
        (others, f"error: --output-dir {others} is a folder of other files (main.py) and holds no run"),
        (a_file / "run", f"error: --output-dir {a_file / 'run'}: {a_file} is a file, not a folder"),
    ]:
        for dry_run in ([], ["--dry-run"]):
            code, out, err = precompile(capsys, setup, "--output-dir", str(output_dir), *dry_run)
            assert code == 2 and err.startswith(message) and not setup["record"].exists(), err
    code, _, _ = precompile(capsys, setup, "--master-port", "70000")
    assert code == 2 and not setup["record"].exists()


def test_multi_node_refuses_a_cache_folder_on_a_network_filesystem(setup, capsys, monkeypatch, tmp_path):
    """Neuron's training troubleshooting guide: one cache folder shared by several instances over NFS/EFS/FSx
    fails multi-instance runs. With --nodes > 1 a cache on nfs/lustre is refused before anything runs; one node
    may use it (one instance), and an ext4 folder on several nodes is each node's own."""
    import bmojo_neuron.compile_cache.shared_fs as shared_fs

    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(f"22 1 259:1 / / rw,relatime shared:1 - ext4 /dev/root rw\n"
                         f"90 22 0:50 / {setup['cache']} rw,relatime shared:40 - lustre 10.0.0.5@tcp:/fsx rw\n")
    monkeypatch.setattr(shared_fs, "MOUNTINFO", mountinfo)
    monkeypatch.chdir(setup["tmp"])
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.7")
    monkeypatch.setenv("SLURM_NODEID", "1")
    overrides = [o if not o.startswith("train.batch_size") else "train.batch_size=64" for o in setup["overrides"]]
    several = ("--nodes", "2", "--instance", "trn1.32xlarge")
    code, out, err = precompile(capsys, setup, *several, overrides=overrides)
    assert code == 2 and not setup["record"].exists()
    assert f"error: the compile cache {setup['cache']} is on lustre, so all 2 nodes would share" in err
    assert precompile(capsys, setup, *several, "--dry-run", overrides=overrides)[0] == 2  # a dry run says so too
    assert precompile(capsys, setup)[0] == 0  # one node: its own folder, wherever it is
    mountinfo.write_text("22 1 259:1 / / rw,relatime shared:1 - ext4 /dev/root rw\n")
    assert precompile(capsys, setup, *several, overrides=overrides)[0] == 0
