"""Errors a user can cause end in one ``error:`` line (exit 2), and the cheap ones come before any long work.

Output directory (not writable, too little room, disk full mid-run), a diverging run, and the
estimate of a run's disk use against the sizes a real run writes.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from bmojo_neuron import cli, preflight
from bmojo_neuron.recipes import count_parameters, load_recipe
from bmojo_neuron.checkpoints import layout
from bmojo_neuron.checkpoints.local import load_checkpoint

TOY = ["suite=none", "train.steps=4", "checkpoint.every=2", "eval.every=4", "eval.batches=1",
       "eval.length_multipliers=[1]", "data.train_examples=256", "data.eval_examples=64", "train.log_every=2"]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def no_long_work(monkeypatch):
    """Fail the test if the run gets as far as building its data."""
    from bmojo_neuron.training import trainer

    def build_datasets(recipe, progress=None):
        raise AssertionError("the run started before its output directory was checked")

    monkeypatch.setattr(trainer, "build_datasets", build_datasets)


def test_an_output_directory_that_cannot_be_created_is_refused_first(tmp_path, capsys, no_long_work):
    (tmp_path / "a-file").write_text("")
    assert cli.main(["train", "cpu-tiny", *TOY, "--output-dir", str(tmp_path / "a-file" / "run")]) == 2
    assert one_error_line(capsys).rstrip() == (f"error: output directory {tmp_path / 'a-file' / 'run'} cannot be made: "
                                      f"{tmp_path / 'a-file'} is a file, not a folder; pick another --output-dir "
                                      "(or run.output_dir)")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_directory_is_refused_first(tmp_path, capsys, no_long_work):
    (tmp_path / "ro").mkdir(mode=0o555)
    assert cli.main(["train", "cpu-tiny", *TOY, "--output-dir", str(tmp_path / "ro")]) == 2
    assert "ro is not writable: Permission denied" in one_error_line(capsys)


def test_too_little_free_space_is_refused_first_naming_both_numbers(tmp_path, capsys, monkeypatch, no_long_work):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: usage._replace(free=2**20))
    assert cli.main(["train", "cpu-tiny", "--output-dir", str(tmp_path)]) == 2  # B'MOJO and its baselines
    err = one_error_line(capsys)
    assert f"{tmp_path} has 1.0 MiB free, too little" in err
    assert all(f"{tmp_path / name} about" in err for name in ("bmojo", "bmojo-f", "mamba"))
    assert "2 checkpoint(s) of 4.8 MiB" in err  # cpu-tiny: Mamba, the largest, 327,936 parameters x 12 B + 1 MiB, keep_last 1 + 1


def test_disk_full_mid_run_is_named_and_loses_nothing(tmp_path, capsys, monkeypatch):
    """The second checkpoint's optimizer file hits a full disk (/dev/full): the first stays whole, and a
    --resume once there is room again finishes the run with the weights of an uninterrupted one."""
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    real_save, calls = torch.save, []

    def save_onto_a_full_disk(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) < 2:
            return real_save(obj, path, *args, **kwargs)
        with open("/dev/full", "wb") as full:  # raises ENOSPC as a real full disk does, wrapped by torch
            return real_save(obj, full, *args, **kwargs)

    run_dir = tmp_path / "run"
    monkeypatch.setattr(torch, "save", save_onto_a_full_disk)
    assert cli.main(["train", "cpu-tiny", *TOY, "--output-dir", str(run_dir), "--no-progress"]) == 2
    err = one_error_line(capsys)
    assert "disk full: No space left on device while writing" in err and "step-0000002" in err and "--resume" in err
    assert [p.name for p in layout.list_checkpoints(run_dir)] == ["step-0000002"]
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".tmp-")]  # the half-written step is gone
    monkeypatch.undo()
    assert cli.main(["train", "cpu-tiny", *TOY, "--output-dir", str(run_dir), "--no-progress", "--resume"]) == 0
    whole = tmp_path / "whole"
    assert cli.main(["train", "cpu-tiny", *TOY, "--output-dir", str(whole), "--no-progress"]) == 0
    resumed, uninterrupted = (load_checkpoint(d / "step-0000004") for d in (run_dir, whole))
    assert resumed.state.step == uninterrupted.state.step == 4
    from safetensors.torch import load_file

    a, b = (load_file(d / "step-0000004" / layout.MODEL_FILE) for d in (run_dir, whole))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_space_estimate_covers_what_a_run_writes(tmp_path):
    recipe = load_recipe("cpu-tiny", TOY)
    assert cli.main(["train", "cpu-tiny", *TOY, "--output-dir", str(tmp_path), "--no-progress"]) == 0
    need = preflight.space_need(count_parameters(recipe), recipe.checkpoint.keep_last, resume=False)

    def size(folder: Path) -> int:
        return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())

    step, final = size(tmp_path / "step-0000004"), size(tmp_path / "final")
    print(f"checkpoint {step} B (estimate {need.checkpoint_bytes}), export {final} B (estimate {need.export_bytes})")
    assert step <= need.checkpoint_bytes <= step + 2**20 and final <= need.export_bytes <= final + 2**20
    assert need.checkpoints == 2 and need.total >= 2 * step + final + size(tmp_path) - size(tmp_path / "step-0000004")


def test_a_run_that_diverges_ends_in_one_line_and_a_retry_just_works(tmp_path, capsys):
    """A run that fails before its first checkpoint leaves only its logs; training again into the same directory
    (no --resume) starts afresh and replaces them, TensorBoard's events included."""
    args = ["suite=none", "optim.lr=1e6", "optim.warmup_steps=0", "train.steps=20", "train.log_every=1",
            "data.train_examples=256", "data.eval_examples=64"]
    assert cli.main(["train", "cpu-tiny", *args, "--output-dir", str(tmp_path), "--no-progress"]) == 2
    line = one_error_line(capsys)
    assert re.search(r"training loss is (nan|inf) at step \d+; lower optim.lr and train again "
                     rf"\({re.escape(str(tmp_path))} has no checkpoint yet: the retry starts afresh\)", line), line
    assert (tmp_path / layout.METRICS_FILE).read_text() and not layout.list_checkpoints(tmp_path)
    old_events = sorted(p.name for p in (tmp_path / "tensorboard").iterdir())
    assert old_events  # the attempt logged to TensorBoard too

    assert cli.main(["train", "cpu-tiny", *TOY, "--output-dir", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert (f"{tmp_path} holds only the logs of an earlier attempt that ended before its first checkpoint: "
            "starting afresh, replacing them") in out
    records = [json.loads(line) for line in (tmp_path / layout.METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "train"] == [2, 4]  # the retry's records only
    assert not set(old_events) & {p.name for p in (tmp_path / "tensorboard").iterdir()}


def test_a_damaged_checkpoint_is_not_taken_for_an_abandoned_attempt(tmp_path, capsys):
    """A step folder that lost a file is not resumable, but a new run would replace it when it saves that step:
    training again without --resume is refused, as for any used run directory, and the folder is kept."""
    assert cli.main(["train", "cpu-tiny", *TOY, "--output-dir", str(tmp_path), "--no-progress"]) == 0
    shutil.rmtree(tmp_path / "final")
    for step in layout.list_checkpoints(tmp_path):
        (step / layout.STATE_FILE).unlink()
    capsys.readouterr()
    assert not layout.list_checkpoints(tmp_path) and not layout.abandoned_attempt(tmp_path)
    assert cli.main(["train", "cpu-tiny", *TOY, "--output-dir", str(tmp_path), "--no-progress"]) == 2
    want = f"error: {tmp_path} already holds a run; pass --resume to continue it, or pick another --output-dir"
    assert one_error_line(capsys).strip() == want
    assert (tmp_path / "step-0000004" / "model.safetensors").is_file()


@pytest.mark.parametrize(("error", "message"), [
    (PermissionError(errno.EACCES, "Permission denied", "/data/x"), "Permission denied: /data/x"),
    (OSError(errno.EROFS, "Read-only file system", "/mnt/ro/run"), "Read-only file system: /mnt/ro/run"),
    (OSError(errno.EDQUOT, "Disk quota exceeded", "/home/me/run"), "disk full: Disk quota exceeded writing /home/me"),
])
def test_user_caused_os_errors_are_one_line(error, message):
    assert cli.user_error(error).startswith(message)


def test_a_disk_full_wrapped_by_another_error_is_still_named():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    except RuntimeError as wrapped:
        assert cli.user_error(wrapped).startswith("disk full: No space left on device")
    assert cli.user_error(RuntimeError("a bug")) is None  # not the user's: a traceback


def _primed_folder(folder: Path, tokenizer) -> Path:
    """A tiny B'MOJO model folder as `prime` writes one: weights, config, the source's tokenizer files, and
    bmojo_run.json naming the folder as its tokenizer."""
    from naive import tiny_config

    from bmojo_neuron import BMojoForCausalLM

    torch.manual_seed(0)
    BMojoForCausalLM(tiny_config(vocab_size=300)).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    (folder / "bmojo_run.json").write_text(json.dumps({"tokenizer": str(folder), "recipe": {}}))
    return folder


def test_a_text_run_from_init_weights_reads_the_ids_that_model_learned(tmp_path, capsys, no_long_work):
    """A model primed from a transformer with its own tokenizer, trained on a shipped text recipe (the byte
    tokenizer) would have its embeddings read for other tokens: refused before the run starts, naming the
    tokenizer to set. The byte-level folder an export or `prime` of a byte model writes is the byte tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from bmojo_neuron.data.tokenizer import hf_byte_tokenizer

    backend = Tokenizer(models.WordLevel(vocab={**{f"w{i}": i for i in range(299)}, "</s>": 299}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    words = _primed_folder(tmp_path / "words", PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>"))
    argv = ["train", "cpu-text", f"init.weights={words}", "model=none", "--output-dir", str(tmp_path / "run")]
    capsys.readouterr()  # the save's progress bars
    assert cli.main(argv) == 2
    assert one_error_line(capsys) == (f"error: init.weights {words}: its model learned the ids of the tokenizer "
                                      f"{words}, but data.tokenizer is byte, which gives other ids; set "
                                      f"data.tokenizer={words}\n")
    assert not (tmp_path / "run").exists()
    for fine in ([f"init.weights={words}", f"data.tokenizer={words}"],
                 [f"init.weights={_primed_folder(tmp_path / 'bytes', hf_byte_tokenizer())}"]):
        preflight.check_init_tokenizer(load_recipe("cpu-text", [*fine, "model=none"]))
