"""Checkpoint manifests: damaged files are named in one line, and a resume falls back to the newest intact step."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from test_training import tiny_recipe, train_losses

from bmojo_neuron import BMojoConfig, BMojoForCausalLM, cli
from bmojo_neuron.checkpoints import layout, local, manifest
from bmojo_neuron.checkpoints.convert import shard_checkpoint
from bmojo_neuron.checkpoints.inference import load_trained
from bmojo_neuron.training import train


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A tiny run with checkpoints at steps 3 and 6 and its export."""
    return train(tiny_recipe(), tmp_path_factory.mktemp("finished"), progress=False)


def truncate(path, keep: int = 100) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep])


def flip_byte(path, offset: int = -10) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_every_checkpoint_and_the_export_list_each_file_with_size_and_hash(finished):
    for directory in [*layout.list_checkpoints(finished.run_dir), finished.run_dir / layout.FINAL]:
        listed = json.loads((directory / manifest.MANIFEST_FILE).read_text())["files"]
        on_disk = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                         if p.is_file() and p.name != manifest.MANIFEST_FILE)
        assert sorted(listed) == on_disk
        for name, entry in listed.items():
            assert entry["bytes"] == (directory / name).stat().st_size
            assert entry["sha256"] == manifest.file_sha256(directory / name)
        manifest.verify_manifest(directory)


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damage_is_named_in_one_line(finished, tmp_path, damage):
    step = tmp_path / "step"
    shutil.copytree(layout.latest_checkpoint(finished.run_dir), step)
    target = step / layout.MODEL_FILE
    {"truncate": truncate, "flip": flip_byte, "delete": lambda p: p.unlink()}[damage](target)
    expected = {"truncate": "truncated", "flip": "SHA-256", "delete": "missing"}[damage]
    with pytest.raises(manifest.DamagedCheckpointError, match=expected) as err:
        manifest.verify_manifest(step)
    assert err.value.file == layout.MODEL_FILE and "\n" not in str(err.value)
    if damage != "flip":  # sizes alone catch what changes the length
        assert manifest.damage(step, hashes=False) is not None
    else:
        assert manifest.damage(step, hashes=False) is None


def test_resume_skips_a_damaged_latest_step_and_matches_the_uninterrupted_run(finished, tmp_path, capsys):
    run_dir = tmp_path / "run"
    partial = train(tiny_recipe(), run_dir, progress=False, stop_after=4)
    assert [p.name for p in layout.list_checkpoints(run_dir)] == ["step-0000003", "step-0000004"]
    truncate(run_dir / "step-0000004" / layout.MODEL_FILE)
    assert partial.step == 4
    resumed = train(tiny_recipe(), run_dir, resume=True, progress=False)
    err = capsys.readouterr().err
    assert "skipping step-0000004: model.safetensors" in err and "truncated" in err
    assert train_losses(resumed.metrics) == train_losses(finished.metrics)  # step 4 redone from step 3, bitwise


def test_eval_of_a_damaged_export_is_one_error_line(finished, tmp_path, capsys):
    export = tmp_path / "final"
    shutil.copytree(finished.run_dir / layout.FINAL, export)
    flip_byte(export / "model.safetensors", offset=-3)
    with pytest.raises(manifest.DamagedCheckpointError):
        load_trained(export)
    assert cli.main(["eval", str(export)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "model.safetensors" in err[0]


def test_a_damaged_step_checkpoint_suggests_an_earlier_step(finished, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(finished.run_dir, run_dir)
    truncate(run_dir / "step-0000006" / layout.MODEL_FILE)
    assert cli.main(["eval", str(run_dir / "step-0000006")]) == 2
    assert one_error_line(capsys).endswith("; the checkpoint is damaged (copy it again, or use an earlier step)")


def test_a_damaged_run_export_names_the_command_that_exports_it_again(finished, tmp_path, capsys):
    """An export has no earlier step: the advice is the resume that writes ``final/`` anew, and it works."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished.run_dir, run_dir)
    truncate(run_dir / layout.FINAL / layout.MODEL_FILE)
    assert cli.main(["eval", str(run_dir)]) == 2
    command = f"bmojo-neuron train {run_dir / 'recipe.json'} --resume --output-dir {run_dir}"
    assert one_error_line(capsys).endswith(
        f"; the export is damaged (copy it again, or export it again from the run's last checkpoint: {command})")
    assert cli.main(command.split()[1:] + ["--no-progress"]) == 0
    manifest.verify_manifest(run_dir / layout.FINAL)


def test_a_damaged_export_away_from_its_run_suggests_exporting_it_again(finished, tmp_path, capsys):
    export = tmp_path / "final"
    shutil.copytree(finished.run_dir / layout.FINAL, export)
    truncate(export / layout.MODEL_FILE)
    assert cli.main(["eval", str(export)]) == 2
    assert one_error_line(capsys).endswith(
        "; the export is damaged (copy it again, or export it again from the checkpoint it was made from)")


def test_weights_of_another_model_fail_in_one_line(finished):
    config = BMojoConfig.from_json_file(str(layout.latest_checkpoint(finished.run_dir) / layout.CONFIG_FILE))
    config.intermediate_size = 48
    other = BMojoForCausalLM(config)
    expected = r"layers.0.mlp.down_proj.weight has shape \[16, 32\], this model's is \[16, 48\]"
    with pytest.raises(ValueError, match=expected) as err:
        local.load_model_weights(other, layout.latest_checkpoint(finished.run_dir))
    assert "another model" in str(err.value) and "\n" not in str(err.value)


def test_a_checkpoint_without_a_manifest_still_loads(finished, tmp_path):
    step = tmp_path / "step-0000006"
    shutil.copytree(layout.latest_checkpoint(finished.run_dir), step)
    (step / manifest.MANIFEST_FILE).unlink()
    assert layout.latest_intact_checkpoint(tmp_path) == step
    model = BMojoForCausalLM(BMojoConfig.from_json_file(str(step / layout.CONFIG_FILE)))
    local.load_model_weights(model, step)
    trained = load_trained(finished.run_dir / layout.FINAL).model  # the step-6 weights, exported
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), trained.state_dict().values()))


@pytest.mark.parametrize("deleted", [layout.MODEL_FILE, layout.STATE_FILE])
def test_resume_names_a_file_deleted_from_the_newest_step(finished, tmp_path, capsys, deleted):
    run_dir = tmp_path / "run"
    shutil.copytree(finished.run_dir, run_dir)
    (run_dir / "step-0000006" / deleted).unlink()
    assert local.load_latest(run_dir).path == run_dir / "step-0000003"
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"warning: skipping step-0000006: {deleted}: missing (listed in manifest.json); resuming from "
                   "the newest intact checkpoint before it"]


SHARDED_FIXTURE = Path(__file__).parent / "golden" / "checkpoints" / "tp2-pp2" / "step-0000003"


def sharded_copy(tmp_path, with_manifest: bool) -> Path:
    """The committed tp=2 × pp=2 checkpoint (written before manifests existed), with or without one now."""
    step = tmp_path / "step-0000003"
    shutil.copytree(SHARDED_FIXTURE, step)
    if with_manifest:
        manifest.write_manifest(step)
    return step


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_consolidate_of_a_truncated_shard_names_it_from_the_manifest(tmp_path, capsys):
    step = sharded_copy(tmp_path, with_manifest=True)
    size = (step / "rank-01-00.safetensors").stat().st_size
    truncate(step / "rank-01-00.safetensors", keep=500)
    assert cli.main(["checkpoint", "consolidate", str(step), str(tmp_path / "full")]) == 2
    assert f"rank-01-00.safetensors: 500 bytes, manifest.json says {size} (truncated or replaced)" \
        in one_error_line(capsys)
    assert not (tmp_path / "full").exists()


@pytest.mark.parametrize("file, kind", [("rank-01-00.safetensors", "safetensors"),
                                        ("optim-01-01-000.pt", "torch.save")])
def test_consolidate_of_a_truncated_shard_without_a_manifest_is_one_error_line(tmp_path, capsys, file, kind):
    step = sharded_copy(tmp_path, with_manifest=False)
    truncate(step / file, keep=500)
    assert cli.main(["checkpoint", "consolidate", str(step), str(tmp_path / "full")]) == 2
    assert f"{file}: not a readable {kind} file (" in one_error_line(capsys)


def test_consolidate_and_shard_write_manifests_that_catch_later_damage(tmp_path, capsys):
    full, resharded = tmp_path / "full", tmp_path / "tp1"
    assert cli.main(["checkpoint", "consolidate", str(sharded_copy(tmp_path, True)), str(full)]) == 0
    assert cli.main(["checkpoint", "shard", str(full), "--tp", "1", "--output-dir", str(resharded)]) == 0
    for directory in (full, resharded / "step-0000003"):
        listed = json.loads((directory / manifest.MANIFEST_FILE).read_text())["files"]
        assert sorted(listed) == sorted(p.name for p in directory.iterdir() if p.name != manifest.MANIFEST_FILE)
        manifest.verify_manifest(directory)
    flip_byte(full / "model.safetensors")
    capsys.readouterr()
    assert cli.main(["checkpoint", "shard", str(full), "--tp", "2", "--output-dir", str(tmp_path / "tp2")]) == 2
    line = one_error_line(capsys)
    assert "model.safetensors: SHA-256 differs from manifest.json" in line
    assert line.endswith(f"; the export is damaged (copy it again, or delete it and consolidate it again: "
                         f"bmojo-neuron checkpoint consolidate {tmp_path / 'step-0000003'} {full})")


@pytest.mark.parametrize("what", ["final", "step-0000006"])
def test_eval_of_truncated_weights_without_a_manifest_is_one_error_line(finished, tmp_path, capsys, what):
    target = tmp_path / what
    shutil.copytree(finished.run_dir / what, target)
    (target / manifest.MANIFEST_FILE).unlink()
    truncate(target / layout.MODEL_FILE, keep=500)
    assert cli.main(["eval", str(target), "--lengths", "1"]) == 2
    assert f"{target / layout.MODEL_FILE}: not a readable safetensors file (" in one_error_line(capsys)


@pytest.mark.parametrize(("what", "file", "text", "problem"), [
    ("final", "config.json", "{", "not a readable JSON file (Expecting property name"),
    ("final", "bmojo_run.json", "[1]", "holds a JSON list, not an object"),
    ("step-0000006", "config.json", '{"model_type": ', "not a readable JSON file (Expecting value"),
    ("step-0000006", "recipe.json", "[]", "holds a JSON list, not an object"),
    ("step-0000006", "trainer_state.json", "\xff", "not a readable JSON file ("),
])
def test_a_cut_or_edited_json_file_without_a_manifest_is_named_in_one_line(finished, tmp_path, capsys, what, file,
                                                                           text, problem):
    """Without a manifest (a copy written before them) a JSON file that does not parse, or holds no object, is
    named as damaged: read by `transformers` or the checkpoint code it was a traceback or a bare JSON error."""
    target = tmp_path / what
    shutil.copytree(finished.run_dir / what, target)
    (target / manifest.MANIFEST_FILE).unlink()
    (target / file).write_text(text, encoding="latin-1")
    assert cli.main(["eval", str(target), "--lengths", "1", "--device", "cpu"]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: {target / file}: {problem}") and "is damaged" in line, line


def test_resume_of_a_checkpoint_whose_recipe_is_no_object_is_one_error_line(finished, tmp_path, capsys):
    run = Path(shutil.copytree(finished.run_dir, tmp_path / "run"))
    step = layout.latest_checkpoint(run)
    (step / manifest.MANIFEST_FILE).unlink()
    (step / layout.RECIPE_FILE).write_text("[1]")
    argv = ["train", str(run / layout.RECIPE_FILE), "--resume", "--output-dir", str(run), "--no-progress"]
    assert cli.main(argv) == 2
    assert one_error_line(capsys) == (f"error: {step / layout.RECIPE_FILE}: holds a JSON list, not an object; the "
                                      "checkpoint is damaged (copy it again, or use an earlier step)")


def test_checkpoint_shard_names_each_degree_and_a_missing_source(tmp_path, capsys):
    assert cli.main(["checkpoint", "shard", str(tmp_path), "--tp", "0", "--output-dir", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == "error: --tp and --pp must be >= 1, got --tp 0 --pp 1\n"
    with pytest.raises(FileNotFoundError, match=r"^\S+/nope does not exist$"):  # from Python, past the CLI's check
        shard_checkpoint(tmp_path / "nope", tmp_path / "o", tp=2)
