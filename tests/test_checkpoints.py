"""One-process checkpoints on disk: a failed save keeps the previous checkpoint, leftovers are ignored, pruning."""

from __future__ import annotations

import pytest
import torch
from test_training import tiny_recipe

from bmojo_neuron import BMojoForCausalLM, fsutil
from bmojo_neuron.checkpoints import layout, local
from bmojo_neuron.checkpoints.state import TrainerState
from bmojo_neuron.training.optim import build_optimizer, build_scheduler


def _tiny_state():
    torch.manual_seed(0)
    model = BMojoForCausalLM(tiny_recipe().model_config())
    optimizer = build_optimizer(model, 1e-3, 0.1)
    scheduler = build_scheduler(optimizer, 1, 10, 0.1)
    return model, optimizer, scheduler


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model, optimizer, scheduler = _tiny_state()
    saved = local.save_checkpoint(tmp_path, model, optimizer, scheduler, TrainerState(step=1), {"a": 1})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    for module, target in ((fsutil, "fsync_tree"), (layout, "write_text_atomic")):  # mid-publish, then `latest`
        with monkeypatch.context() as m:
            m.setattr(module, target, boom)
            with pytest.raises(OSError, match="disk full"):
                local.save_checkpoint(tmp_path, model, optimizer, scheduler, TrainerState(step=2), {"a": 2})
        assert (tmp_path / "latest").read_text().strip() == "step-0000001"
    # what a SIGKILL could leave: a temp dir and a published-looking dir without its state file
    (tmp_path / ".tmp-step-0000009-dead").mkdir()
    (tmp_path / ".tmp-step-0000009-dead" / "model.safetensors").write_bytes(b"partial")
    (tmp_path / "step-0000009").mkdir()
    (tmp_path / "step-0000009" / "model.safetensors").write_bytes(b"partial")

    latest = local.load_latest(tmp_path)
    assert latest.path == saved and latest.state.step == 1 and latest.recipe == {"a": 1}
    fresh, _, _ = _tiny_state()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    local.load_model_weights(fresh, latest.path)
    assert all(torch.equal(fresh.state_dict()[k], before[k]) for k in before)
    layout.clean_stale(tmp_path)
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())


def test_keep_last_pruning(tmp_path):
    model, optimizer, scheduler = _tiny_state()
    for step in (1, 2, 3, 4):
        local.save_checkpoint(tmp_path, model, optimizer, scheduler, TrainerState(step=step), {}, keep_last=2)
    assert [p.name for p in layout.list_checkpoints(tmp_path)] == ["step-0000003", "step-0000004"]
    assert layout.latest_checkpoint(tmp_path).name == "step-0000004"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-0000003", "step-0000004"]
