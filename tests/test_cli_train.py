"""`bmojo-neuron train`: --recipe, --dry-run, the immediate failure without Neuron; `bmojo-neuron data prepare`."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import subprocess
import sys
from pathlib import Path

import pytest

from bmojo_neuron import cli
from bmojo_neuron.commands.train import require_neuron_if_needed
from bmojo_neuron.neuron import INSTALL_COMMAND, TRAINING_PACKAGES, NeuronUnavailableError

ROOT = Path(__file__).resolve().parents[1]
TRN1 = "recipes/trn1/bmojo-130m.yaml"


def _cli(*args: str, code: str | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", code] if code else [sys.executable, "-m", "bmojo_neuron.cli", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)


# ------------------------------------------------------------------ no Neuron: fail at once


def test_neuron_recipe_without_neuron_exits_2_naming_packages_and_install_command():
    done = _cli("train", "--recipe", TRN1)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("error: training on Trainium (run.device: neuron) needs the AWS Neuron SDK")
    for name in TRAINING_PACKAGES:
        assert f"  - {name}: " in done.stderr
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


def test_dry_run_sees_a_used_run_directory(capsys, tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    assert cli.main(["train", "cpu-text", "--dry-run", "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "already holds a run" in out and "tokenized and packed into" in out


# ------------------------------------------------------------------ data prepare


def test_data_prepare_builds_the_cache_once(capsys, tmp_path):
    from bmojo_neuron.data.text import load_text_dataset

    cache = tmp_path / "cache"
    args = ["data", "prepare", "cpu-text", f"data.cache_dir={cache}", "data.block_size=512"]
    assert cli.main(args) == 0
    first = capsys.readouterr().out
    entries = list(cache.glob("text-*"))
    assert len(entries) == 1 and (entries[0] / "meta.json").is_file()
    train, evaluation = load_text_dataset(block_size=512, cache_dir=cache)  # the recipe's other data settings
    assert f"{entries[0].resolve()} (built now)" in first
    assert f"train  {len(train):,} blocks × 512 tokens = {len(train) * 512:,} tokens" in first
    assert f"eval   {len(evaluation):,} blocks × 512 tokens" in first
    assert cli.main(args) == 0
    assert "(already there)" in capsys.readouterr().out and list(cache.glob("text-*")) == entries


def test_data_prepare_has_nothing_to_do_for_mqar(capsys):
    assert cli.main(["data", "prepare", "cpu-tiny"]) == 0
    assert "nothing to prepare" in capsys.readouterr().out


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
