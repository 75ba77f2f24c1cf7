"""SIGKILL at random moments of the checkpoint save path loses nothing that was saved, and leaves nothing damaged.

A helper process (forked from the suite's fork server, `rank_processes`, which has
imported torch and the package already) forks, dozens of times, a saver that writes
checkpoints back to back (write, manifest, publish, `latest`, prune) and kills it after
a random delay. After each kill: the newest intact checkpoint is at least the last save
the saver reported finished, it loads and verifies against its manifest, and no
half-written directory is taken for a checkpoint. The helper, not pytest, forks the
savers: libgomp's thread pool does not survive a fork of a process that used it.

Random delays land between two steps of a save only by chance, so a second test stops
a save after each of its steps in turn, deterministically and in well under a second.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
import traceback
from pathlib import Path

import pytest
from rank_processes import start_ranks

KILLS = 30
DEADLINE_S = 240


def _tiny_training_state():
    """(config, model, AdamW, scheduler) of a two-layer model: its checkpoint saves in milliseconds."""
    from bmojo_neuron import BMojoConfig, BMojoForCausalLM
    from bmojo_neuron.training.optim import build_optimizer, build_scheduler

    config = BMojoConfig(vocab_size=32, hidden_size=16, num_hidden_layers=2, layer_pattern="MB",
                         num_attention_heads=2, num_key_value_heads=1, intermediate_size=32, window_size=4,
                         fading_window=4, memory_chunk=4, memory_size=4, memory_picks=1, ssm_state_size=8,
                         ssm_head_dim=8, ssm_chunk_size=16)
    model = BMojoForCausalLM(config)
    optimizer = build_optimizer(model, 1e-3, 0.1)
    return config, model, optimizer, build_scheduler(optimizer, 1, 10, 0.1)


def _save_forever(run_dir: Path, model, optimizer, scheduler, step: int, write: int) -> None:
    """The saver: save back to back, report each finished save's step on the pipe."""
    from bmojo_neuron.checkpoints import local
    from bmojo_neuron.checkpoints.state import TrainerState

    n = step
    while True:
        n += 1
        local.save_checkpoint(run_dir, model, optimizer, scheduler, TrainerState(step=n), {"n": n}, keep_last=2)
        os.write(write, f"{n}\n".encode())


def _kill_savers(_rank: int, run: str, kills: int, report_file: str) -> None:
    import torch

    from bmojo_neuron import BMojoForCausalLM
    from bmojo_neuron.checkpoints import layout, local
    from bmojo_neuron.checkpoints.manifest import has_manifest

    torch.set_num_threads(1)
    run_dir = Path(run)
    config, model, optimizer, scheduler = _tiny_training_state()
    rng = random.Random(0)
    step, report = 0, {"kills": 0, "saves_finished": 0, "mid_save": 0}

    for _ in range(kills):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            try:
                _save_forever(run_dir, model, optimizer, scheduler, step, write)
            except BaseException:  # noqa: BLE001 - the saver must never return into the helper's code
                traceback.print_exc()
            finally:
                os._exit(1)
        os.close(write)
        time.sleep(rng.uniform(0.0, 0.25))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        with os.fdopen(read) as pipe:
            finished = [int(x) for x in pipe.read().split()]
        last = finished[-1] if finished else step
        report["kills"] += 1
        report["saves_finished"] += len(finished)
        newest = layout.latest_intact_checkpoint(run_dir)
        found = 0 if newest is None else int(newest.name.split("-")[1])
        assert found >= last, f"saved step {last} reported finished, newest intact checkpoint is {found}"
        assert found <= last + 1, f"checkpoint {found} beyond the save in flight ({last + 1})"
        report["mid_save"] += found == last + 1  # killed after publishing, before reporting
        if newest is not None:
            local.load_checkpoint(newest)  # verifies the manifest, sizes and SHA-256
            probe = BMojoForCausalLM(config)
            local.load_model_weights(probe, newest)
        for path in layout.list_checkpoints(run_dir):
            assert has_manifest(path), f"{path} was published without its manifest"
            local.load_checkpoint(path)  # everything that looks complete is intact
        step = found
    Path(report_file).write_text(json.dumps(report))


def test_random_kills_during_saves_lose_and_damage_nothing(tmp_path):
    report_file = tmp_path / "report.json"
    context = start_ranks(_kill_savers, (str(tmp_path / "run"), KILLS, str(report_file)), nprocs=1, join=False)
    deadline = time.monotonic() + DEADLINE_S
    while not context.join(timeout=5):  # raises with the helper's traceback when an assertion there fails
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"the kill helper was not back after {DEADLINE_S} s")
    report = json.loads(report_file.read_text())
    assert report["kills"] == KILLS
    assert report["saves_finished"] >= KILLS // 2, report  # the kills did land among saves, not before the first


class _Killed(BaseException):
    """Stands for SIGKILL between two steps of a save: nothing after it runs. A BaseException, as SIGKILL
    is no exception at all: the save's own ``except Exception`` handlers must not see it."""


# The steps of a save that change the run directory, in `layout.publish_step`: the manifest into the temp folder,
# its publication, `latest`, pruning. A kill between any two of them must leave every published checkpoint whole.
SAVE_STEPS = ("write_manifest", "publish_dir", "write_text_atomic", "prune")


def test_a_kill_between_any_two_steps_of_a_save_leaves_each_published_checkpoint_with_its_manifest(
        tmp_path, monkeypatch):
    """The random kills above land between the steps of a save only by chance; this kills after each step in
    turn. A checkpoint published before its manifest is written (a reader, or a kill, between the two finds a
    checkpoint that nothing vouches for) fails here at the kill right after `publish_dir`."""
    from bmojo_neuron.checkpoints import layout, local
    from bmojo_neuron.checkpoints.manifest import damage, has_manifest
    from bmojo_neuron.checkpoints.state import TrainerState

    run_dir = tmp_path / "run"
    _, model, optimizer, scheduler = _tiny_training_state()
    local.save_checkpoint(run_dir, model, optimizer, scheduler, TrainerState(step=1), {}, keep_last=2)
    real = {name: getattr(layout, name) for name in SAVE_STEPS}
    for kill_after in range(1, len(SAVE_STEPS) + 1):  # save step 2, 3, ... and stop it after its k-th step
        calls: list[str] = []

        def step(name: str, *args, _calls: list[str] = calls, _after: int = kill_after) -> None:
            real[name](*args)
            _calls.append(name)
            if len(_calls) == _after:
                raise _Killed(name)

        for name in SAVE_STEPS:
            monkeypatch.setattr(layout, name, lambda *args, _name=name: step(_name, *args))
        with pytest.raises(_Killed):
            local.save_checkpoint(run_dir, model, optimizer, scheduler, TrainerState(step=kill_after + 1), {},
                                  keep_last=2)
        monkeypatch.undo()
        for path in layout.list_checkpoints(run_dir):
            assert has_manifest(path) and damage(path) is None, (
                f"killed after {calls}: {path.name} is published without a manifest that vouches for it")
        assert layout.latest_intact_checkpoint(run_dir) is not None, calls
    assert sorted(calls) == sorted(SAVE_STEPS), calls  # the last save ran every step: each was hooked
