"""SIGKILL at random moments of the checkpoint save path loses nothing that was saved, and leaves nothing damaged.

A helper process (forked from the suite's fork server, `rank_processes`, which has
imported torch and the package already) forks, dozens of times, a saver that writes
checkpoints back to back (write, manifest, publish, `latest`, prune) and kills it after
a random delay. After each kill: the newest intact checkpoint is at least the last save
the saver reported finished, it loads and verifies against its manifest, and no
half-written directory is taken for a checkpoint. The helper, not pytest, forks the
savers: libgomp's thread pool does not survive a fork of a process that used it.
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

    from bmojo_neuron import BMojoConfig, BMojoForCausalLM
    from bmojo_neuron.checkpoints import layout, local
    from bmojo_neuron.training.optim import build_optimizer, build_scheduler

    torch.set_num_threads(1)
    run_dir = Path(run)
    config = BMojoConfig(vocab_size=32, hidden_size=16, num_hidden_layers=2, layer_pattern="MB",
                         num_attention_heads=2, num_key_value_heads=1, intermediate_size=32, window_size=4,
                         fading_window=4, memory_chunk=4, memory_size=4, memory_picks=1, ssm_state_size=8,
                         ssm_head_dim=8, ssm_chunk_size=16)
    model = BMojoForCausalLM(config)
    optimizer = build_optimizer(model, 1e-3, 0.1)
    scheduler = build_scheduler(optimizer, 1, 10, 0.1)
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
