"""SIGTERM / SIGINT during `bmojo-neuron train`: the step finishes, a checkpoint is written, the status says why."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_training import TINY_RECIPE, tiny_recipe, train_losses

from bmojo_neuron.checkpoints import layout
from bmojo_neuron.training import train

ROOT = Path(__file__).resolve().parents[1]
STEPS = 12
# The child announces each step on stdout and can be slowed down, so the test knows when to signal.
CHILD = """
import sys, time
from bmojo_neuron import cli
from bmojo_neuron.training.backends.local import LocalBackend
step, pause = LocalBackend.step, float(sys.argv[3])
def announced(self, *args):
    out = step(self, *args)
    print("step done", flush=True)
    time.sleep(pause)
    return out
LocalBackend.step = announced
sys.exit(cli.main(["train", "--recipe", sys.argv[1], "--output-dir", sys.argv[2], "--no-progress"]))
"""


def recipe_overrides() -> dict:
    return {"train.steps": STEPS, "checkpoint.every": 100, "eval.every": 100, "run.threads": 1}


def write_recipe(path: Path) -> Path:
    recipe = json.loads(json.dumps(TINY_RECIPE))
    recipe["train"]["steps"], recipe["checkpoint"]["every"], recipe["eval"]["every"] = STEPS, 100, 100
    recipe["run"]["threads"] = 1
    path.write_text(json.dumps(recipe))  # JSON is YAML
    return path


def start(tmp_path: Path, pause: float) -> tuple[subprocess.Popen, Path]:
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(write_recipe(tmp_path / "tiny.yaml")), str(run_dir),
                              str(pause)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    return child, run_dir


def wait_for_steps(child: subprocess.Popen, count: int) -> None:
    for _ in range(count):
        line = child.stdout.readline()
        assert line, f"the run ended early: {child.stderr.read()}"
        while "step done" not in line:
            line = child.stdout.readline()
            assert line, f"the run ended early: {child.stderr.read()}"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return train(tiny_recipe(**recipe_overrides()), tmp_path_factory.mktemp("uninterrupted"), progress=False)


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_saves_at_the_step_boundary_and_the_resume_is_the_uninterrupted_run(
        uninterrupted, tmp_path, signum, status):
    child, run_dir = start(tmp_path, pause=0.2)
    wait_for_steps(child, 2)
    child.send_signal(signum)
    _, err = child.communicate(timeout=120)
    assert child.returncode == status, err
    name = signal.Signals(signum).name
    assert f"received {name}: finishing this step" in err
    stopped_at = layout.latest_checkpoint(run_dir)
    assert stopped_at is not None and f"stopped by {name} after step" in err and str(stopped_at) in err
    step = int(stopped_at.name.split("-")[1])
    assert 2 <= step < STEPS and not (run_dir / layout.FINAL).exists()
    resumed = train(tiny_recipe(**recipe_overrides()), run_dir, resume=True, progress=False)
    assert train_losses(resumed.metrics) == train_losses(uninterrupted.metrics)  # bitwise


def test_a_second_signal_exits_at_once_and_leaves_no_partial_checkpoint(tmp_path):
    child, run_dir = start(tmp_path, pause=30.0)  # a step that would take 30 s to finish
    wait_for_steps(child, 1)
    child.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    started = time.monotonic()
    child.send_signal(signal.SIGTERM)
    child.communicate(timeout=20)
    assert time.monotonic() - started < 10
    assert child.returncode == -signal.SIGTERM  # the default action: ended by the signal itself
    assert layout.latest_checkpoint(run_dir) is None  # nothing half-written counts as a checkpoint


def test_a_signal_held_while_starting_stops_the_run_at_its_first_step_boundary(tmp_path):
    """A pool worker holds SIGTERM from its first line (`hold_stop_signals`): one that arrives before the
    trainer's handlers exist stops the run after step 1 with a checkpoint, as if it arrived during the step."""
    from bmojo_neuron.training import signals

    previous = {signum: signal.getsignal(signum) for signum in signals.STOP_SIGNALS}
    try:
        signals.hold_stop_signals()
        signal.raise_signal(signal.SIGTERM)  # the default action would end this process
        result = train(tiny_recipe(**recipe_overrides()), tmp_path / "run", progress=False)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    assert result.stop_signal == signal.SIGTERM and result.step == 1
    assert layout.latest_checkpoint(tmp_path / "run").name == "step-0000001"


def test_a_run_sharing_its_output_names_itself_on_every_line(tmp_path, capsys):
    """``progress="shared"`` (a `run.jobs` worker): the eval lines and the signal's notice start with the run's
    name, as its step lines do, so interleaved runs can be told apart."""
    from bmojo_neuron.training import signals

    previous = {signum: signal.getsignal(signum) for signum in signals.STOP_SIGNALS}
    try:
        signals.hold_stop_signals()
        signal.raise_signal(signal.SIGINT)
        train(tiny_recipe(**{**recipe_overrides(), "eval.every": 1}), tmp_path / "run", progress="shared")
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    captured = capsys.readouterr()
    assert "\ntiny: received SIGINT: finishing this step" in captured.err
    assert [line.split(" 3.")[0] for line in captured.out.splitlines()] == [
        "tiny step 1/12  loss", "tiny: step 1: eval loss"]


def signal_after(monkeypatch, method: str, signum: int = signal.SIGTERM) -> list[int]:
    """Make `LocalBackend.<method>` raise `signum` in this process once, after it ran; returns its calls' arguments
    (the length multipliers for ``length_eval``)."""
    from bmojo_neuron.training.backends.local import LocalBackend

    original, calls = getattr(LocalBackend, method), []

    def then_signal(self, *args):
        out = original(self, *args)
        calls.append(args[-1])
        if len(calls) == 1:
            signal.raise_signal(signum)
        return out

    monkeypatch.setattr(LocalBackend, method, then_signal)
    return calls


def test_a_signal_after_the_last_step_skips_the_length_eval_and_the_resume_does_it(tmp_path, monkeypatch, capsys, stop_signals_caught):
    """The last step is checkpointed; a signal during the length eval stops before the next length: no export,
    the signal's result, and --resume does the length eval and the export."""
    recipe = tiny_recipe(**{**recipe_overrides(), "eval.length_multipliers": [1, 2, 4]})
    calls = signal_after(monkeypatch, "length_eval")
    result = train(recipe, tmp_path / "run", progress=False)
    assert (result.stop_signal, result.step, result.final_dir) == (signal.SIGTERM, STEPS, None)
    assert calls == [[1]] and not (tmp_path / "run" / layout.FINAL).exists()
    assert layout.latest_checkpoint(tmp_path / "run").name == f"step-{STEPS:07d}"
    captured = capsys.readouterr()
    assert "received SIGTERM: the last step is checkpointed; skipping the rest of the finish" in captured.err
    assert "SIGTERM came after the last step: skipped the length evaluation at x2, x4 and the export (final/)" \
        in captured.out
    resumed = train(recipe, tmp_path / "run", resume=True, progress=False)
    assert resumed.stop_signal is None and [r.multiplier for r in resumed.length_eval] == [1, 2, 4]
    assert (resumed.final_dir / "model.safetensors").is_file()


def test_a_signal_during_the_export_lets_the_run_end_complete(tmp_path, monkeypatch, capsys, stop_signals_caught):
    signal_after(monkeypatch, "export")
    result = train(tiny_recipe(**recipe_overrides()), tmp_path / "run", progress=False)
    assert result.stop_signal is None and (result.final_dir / "model.safetensors").is_file()
    assert "received SIGTERM: writing final/ first: the run then ends complete, status 0" in capsys.readouterr().err


def test_a_signal_after_every_run_finished_exits_0_and_says_so(tmp_path, monkeypatch, capsys, stop_signals_caught):
    from bmojo_neuron import cli
    from bmojo_neuron.commands import train as command

    summary = command.print_summary

    def signalled_summary(*args):
        signal.raise_signal(signal.SIGTERM)  # held: no trainer runs now
        summary(*args)

    monkeypatch.setattr(command, "print_summary", signalled_summary)
    assert cli.main(["train", "--recipe", str(write_recipe(tmp_path / "tiny.yaml")), "--output-dir",
                     str(tmp_path / "run")]) == 0
    assert capsys.readouterr().err.endswith(
        "received SIGTERM after every run had finished and exported: nothing was interrupted\n")


# A run pool of two long runs; the test signals it while its spawned workers still import torch.
POOL_CHILD = """
import sys
from pathlib import Path
from test_training import tiny_recipe
from bmojo_neuron.training.run_pool import train_in_processes
runs = [(tiny_recipe(**{"run.name": name, "train.steps": 100000, "checkpoint.every": 100000}), Path(sys.argv[1]) / name)
        for name in ("first", "second")]
train_in_processes(runs, jobs=2)
"""


def spawned_workers(parent: int) -> list[int]:
    """The multiprocessing workers whose parent is `parent`, found in /proc."""
    workers = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if ppid == parent and b"spawn_main" in (stat.parent / "cmdline").read_bytes():
                workers.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue  # ended while being read
    return workers


def is_running(pid: int) -> bool:
    """True while `pid` exists and is not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the pool's workers in /proc")
def test_a_second_signal_ends_a_run_pool_and_its_starting_workers_at_once(tmp_path):
    """Two SIGTERMs reach a run pool (`run.jobs`) while its workers still start: every worker is killed, not
    left to stop at its first step, and the pool ends by the signal itself, as a single run does."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT),
                                                          os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, "-c", POOL_CHILD, str(tmp_path)], cwd=ROOT, env=env,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while len(workers := spawned_workers(child.pid)) < 2:
        assert child.poll() is None and time.monotonic() < deadline, "the pool did not start its two workers"
        time.sleep(0.02)
    child.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=60)
    assert child.returncode == -signal.SIGTERM, err
    deadline = time.monotonic() + 10
    while any(is_running(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(is_running(pid) for pid in workers)
    assert all(layout.latest_checkpoint(tmp_path / name) is None for name in ("first", "second"))


def test_a_stopped_rank_tells_torchrun_why_it_exits_143(monkeypatch, tmp_path, capsys):
    """When only the ranks are signalled, torchrun sees each exit 143 and prints its failure summary; the line the
    rank leaves in its torchrun error file says it stopped gracefully, read here with torch's own reader. The
    status stays 143: 0 would make torchrun report an unfinished run as finished (docs/training.md)."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from bmojo_neuron.commands.train import report_stop

    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    assert report_stop([], [], signal.SIGTERM, main=False) == 143
    failure = ProcessFailure(local_rank=1, pid=1, exitcode=143, error_file=str(error_file))
    assert failure.message["message"] == ("stopped by SIGTERM, gracefully (each run that had started is "
                                          "checkpointed); continue with --resume")
    assert capsys.readouterr().err == ""  # not rank 0: nothing printed
