"""CLI, Neuron detection, packaging metadata and the CI/README contract."""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bmojo_neuron import cli, neuron
from bmojo_neuron._version import FALLBACK_VERSION, __version__
from nki_kernels import compat

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
NEURON_PINS = {
    "torch-neuronx": "2.9.0.2.12.22436",
    "neuronx-cc": "2.23.6484.0",
    "neuronx-distributed": "0.17.26814",
    "nki": "0.2.0",
    "libneuronxla": "2.2.15515.0",
}
# NxD Training is not in the extra (unused; NxD's optional import of it is kept harmless by nxd_compat),
# but it is a Neuron package all the same: never a base dependency.
NEURON_DISTS = set(NEURON_PINS) | {"torch-xla", "neuronx-distributed-training"}


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


class _FakePackages(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes `import <name>` find a package whose import raises `error`."""

    def __init__(self, errors: dict[str, BaseException]):
        self.errors = errors

    def find_spec(self, fullname, path=None, target=None):
        if fullname in self.errors:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        raise self.errors[module.__name__]


@pytest.fixture
def fake_packages(monkeypatch):
    def install(errors: dict[str, BaseException]) -> None:
        for name in errors:
            monkeypatch.delitem(sys.modules, name, raising=False)
        monkeypatch.setattr(sys, "meta_path", [_FakePackages(errors), *sys.meta_path])

    return install


@pytest.fixture
def registry(monkeypatch):
    """A copy of the command registry, restored after the test."""
    # Register the real commands first: a command module imported while the copy is in place would
    # register into the copy only, and never again (the module stays imported) once it is restored.
    cli._load_command_modules()
    monkeypatch.setattr(cli, "COMMANDS", dict(cli.COMMANDS))
    return cli.COMMANDS


# ----------------------------------------------------------------------- version


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"bmojo-neuron {__version__}"


def test_version_module_entry_point():
    out = subprocess.run(
        [sys.executable, "-m", "bmojo_neuron.cli", "--version"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout
    assert out.strip() == f"bmojo-neuron {__version__}"


def test_version_matches_pyproject(pyproject):
    assert FALLBACK_VERSION == pyproject["project"]["version"]
    assert __version__ == pyproject["project"]["version"]


# -------------------------------------------------------------------------- info


def test_info_json(capsys):
    assert cli.main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info) == {"bmojo_neuron", "python", "torch", "transformers", "datasets",
                         "op_backends", "neuron"}
    assert info["bmojo_neuron"]["version"] == __version__
    assert info["python"]["version"] == ".".join(map(str, sys.version_info[:3]))
    import torch

    assert info["torch"]["version"] == torch.__version__
    assert isinstance(info["torch"]["cuda_available"], bool)
    assert info["transformers"]["version"] and info["datasets"]["version"]

    from bmojo_neuron.ops import auto

    ops = info["op_backends"]
    assert ops["status"] in ("ok", "unknown")
    if ops["status"] == "ok":
        assert ops["backends"] and ops["selected"] == auto.describe()
        for backend in ops["backends"].values():
            assert isinstance(backend["available"], bool) and isinstance(backend["reason"], str)
    else:
        assert ops["reason"]

    assert set(info["neuron"]) == {"torch_neuronx", "neuronxcc", "neuronx_distributed", "nki", "torch_xla"}
    for name, status in info["neuron"].items():
        assert set(status) == {"importable", "version", "status", "reason"}
        if importlib.util.find_spec(name) is None:  # this machine: nothing Neuron installed
            assert status["importable"] is False
            assert status["status"] == "not installed"
            assert "not installed" in status["reason"]
        elif not status["importable"]:
            assert status["reason"]


def test_info_text(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"bmojo-neuron  {__version__}")
    for word in ("python", "torch", "transformers", "datasets", "op backends:", "selected (CPU)",
                 "neuron packages:", "torch_neuronx"):
        assert word in out


def test_info_without_op_backends(monkeypatch, capsys):
    import bmojo_neuron

    monkeypatch.setitem(sys.modules, "bmojo_neuron.ops", None)  # import fails
    if hasattr(bmojo_neuron, "ops"):
        monkeypatch.delattr(bmojo_neuron, "ops")
    assert cli.main(["info", "--json"]) == 0
    ops = json.loads(capsys.readouterr().out)["op_backends"]
    assert ops["status"] == "unknown" and ops["reason"] and ops["backends"] == {}


# ------------------------------------------------------------------------ neuron


def test_require_neuron_message():
    if neuron.is_neuron_available():
        pytest.skip("Neuron SDK installed")
    with pytest.raises(neuron.NeuronUnavailableError) as exc:
        neuron.require_neuron("NKI selective scan")
    message = str(exc.value)
    assert isinstance(exc.value, RuntimeError)
    assert "NKI selective scan" in message
    assert 'pip install "bmojo-neuron[neuron]" --extra-index-url https://pip.repos.neuron.amazonaws.com' in message
    assert "torch_neuronx" in message
    assert "\n" not in message  # one `error:` line, the missing packages and the fix on it
    clause = message.split("not installed: ", 1)[1].split(")", 1)[0].split(", ")
    absent = {name for name, s in neuron.neuron_status().items() if s["status"] == neuron.NOT_INSTALLED}
    assert set(clause) == absent & set(neuron.DEFAULT_REQUIRED)


def test_placeholder_detected(fake_packages):
    fake_packages({
        "torch_neuronx": ImportError("WRONG PACKAGE: this is a placeholder, install from the Neuron repository"),
        "nki": ImportError("WRONG PACKAGE"),
    })
    status = neuron.neuron_status()
    for name in ("torch_neuronx", "nki"):
        assert status[name]["importable"] is False
        assert status[name]["status"] == "placeholder"
        assert "placeholder" in status[name]["reason"] and "WRONG PACKAGE" in status[name]["reason"]
    with pytest.raises(neuron.NeuronUnavailableError, match="placeholder") as exc:
        neuron.require_neuron("training on Trainium")
    assert "\n" not in str(exc.value)
    assert "torch_neuronx: PyPI placeholder installed (WRONG PACKAGE)" in str(exc.value)
    assert not neuron.is_neuron_available()

    nki, nl, nisa, reason = compat._probe()
    assert nki is nl is nisa is None
    assert "placeholder" in reason


def test_other_import_errors_do_not_escape(fake_packages):
    missing_dep = ModuleNotFoundError("No module named 'torch_xla'", name="torch_xla")
    fake_packages({
        "neuronx_distributed": missing_dep,
        "neuronxcc": RuntimeError("boom"),
        "torch_xla": SystemExit(1),
    })
    status = neuron.neuron_status()
    assert status["neuronx_distributed"]["status"] == "import error"
    assert "torch_xla" in status["neuronx_distributed"]["reason"]
    assert status["neuronxcc"]["status"] == "import error"
    assert "RuntimeError: boom" in status["neuronxcc"]["reason"]
    assert status["torch_xla"]["status"] == "import error"
    with pytest.raises(neuron.NeuronUnavailableError, match="neuronx_distributed"):
        neuron.import_neuron_module("neuronx_distributed.parallel_layers", "tensor parallelism")


def test_nki_compat_falls_back_to_the_emulator_without_nki():
    if importlib.util.find_spec("nki") is not None:
        pytest.skip("an nki package is installed")
    from nki_kernels import emulator

    assert compat.NKI_AVAILABLE is False
    assert compat.NKI_IMPLEMENTATION == "emulator"
    assert compat.nisa is emulator.isa and compat.nl is emulator.language
    assert "not installed" in compat.NKI_UNAVAILABLE_REASON


# ---------------------------------------------------------------------- registry


def test_registered_command_errors(registry, capsys):
    def add_arguments(parser):
        parser.add_argument("--kind", default="value")

    @cli.register_command("explode", help="raise an error", add_arguments=add_arguments)
    def explode(args):
        if args.kind == "value":
            raise ValueError("bad recipe field 'hidden_size'")
        if args.kind == "neuron":
            neuron.require_neuron("explode on Trainium", packages=("torch_neuronx",))
        if args.kind == "bug":
            raise KeyError("unexpected")
        return 3

    assert "explode" in registry
    assert cli.main(["explode"]) == 2
    assert capsys.readouterr().err.strip() == "error: bad recipe field 'hidden_size'"
    if not neuron.is_neuron_available(("torch_neuronx",)):
        assert cli.main(["explode", "--kind", "neuron"]) == 2
        assert capsys.readouterr().err.startswith("error: explode on Trainium needs")
    assert cli.main(["explode", "--kind", "other"]) == 3
    with pytest.raises(KeyError):  # a bug keeps its traceback
        cli.main(["explode", "--kind", "bug"])
    with pytest.raises(ValueError, match="already registered"):
        cli.add_command("explode", "again", None, lambda args: 0)


def test_a_closed_stdout_ends_the_command_quietly_with_141(tmp_path):
    """`bmojo-neuron cache ls --json | head -1`: the reader is gone, so the command stops, without a traceback,
    whether the write fails in the last flush (a short output) or inside the command (more than stdout's buffer)."""
    import os

    empty, full = tmp_path / "empty", tmp_path / "full"
    empty.mkdir()
    for n in range(200):  # incomplete entries: a table row of ~80 characters each
        module = full / "neuronxcc-2.23.6484.0+ab12cd34" / f"MODULE_{n}+d41d8cd9"
        module.mkdir(parents=True)
        (module / "model.hlo_module.pb").write_bytes(b"hlo")
    table = subprocess.run([sys.executable, "-m", "bmojo_neuron.cli", "cache", "ls", "--cache-dir", str(full)],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert table.returncode == 0 and len(table.stdout) > 2 * io.DEFAULT_BUFFER_SIZE, table.stdout[-300:]
    read, write = os.pipe()
    os.close(read)  # every write to `write` fails with EPIPE, as after `head -1` has exited
    try:
        for args in (["cache", "ls", "--json", "--cache-dir", str(empty)], ["cache", "ls", "--cache-dir", str(full)]):
            done = subprocess.run([sys.executable, "-m", "bmojo_neuron.cli", *args], cwd=ROOT, stdout=write,
                                  stderr=subprocess.PIPE, text=True, timeout=120)
            assert (done.returncode, done.stderr) == (141, ""), args  # 128 + SIGPIPE, as a shell reports
    finally:
        os.close(write)


def test_module_entry_points_into_a_closed_stdout_end_quietly_with_141(tmp_path):
    """`python -m bmojo_neuron.bench.table bench/*.json | head` ends as the CLI does, without a traceback."""
    import os

    machine = {"cpu": "x", "cpu_count": 2, "torch_threads": 2, "torch": "2.13", "transformers": "5",
               "load_average_start": 0.0}
    report = tmp_path / "skipped.json"
    report.write_text(json.dumps({"schema": "bmojo-neuron-bench/1", "suite": "decode", "created": "today",
                                  "machine": machine, "status": "skipped", "message": "no device " * 2000}))
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run([sys.executable, "-m", "bmojo_neuron.bench.table", str(report)], cwd=ROOT,
                              stdout=write, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write)
    assert (done.returncode, done.stderr) == (141, "")


def test_help_and_version_into_a_closed_stdout_end_with_141_like_other_output(tmp_path):
    """`bmojo-neuron --help | head -1`: argparse would swallow the broken pipe and exit 0."""
    import os

    read, write = os.pipe()
    os.close(read)
    try:
        for args in (["--help"], ["train", "--help"], ["checkpoint", "shard", "--help"], ["--version"]):
            done = subprocess.run([sys.executable, "-m", "bmojo_neuron.cli", *args], cwd=ROOT, stdout=write,
                                  stderr=subprocess.PIPE, text=True, timeout=120)
            assert (done.returncode, done.stderr) == (141, ""), args
    finally:
        os.close(write)


def test_help_into_an_open_stdout_still_exits_0(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("usage: bmojo-neuron train [-h]")


def test_a_broken_pipe_that_is_not_stdout_stays_an_error(registry, capsys):
    @cli.register_command("pipe", help="a subprocess' pipe breaks")
    def pipe(args):
        raise BrokenPipeError(32, "Broken pipe")

    with pytest.raises(BrokenPipeError):  # stdout (pytest's capture) is no pipe: not the reader going away
        cli.main(["pipe"])


def test_command_modules_are_discovered(registry, monkeypatch, tmp_path, capsys):
    package = tmp_path / "fake_bmojo_commands"
    package.mkdir()
    (package / "hello.py").write_text(
        "from bmojo_neuron.cli import register_command\n"
        "def add_arguments(parser):\n"
        "    parser.add_argument('--name', default='world')\n"
        "@register_command('hello', help='say hello', add_arguments=add_arguments)\n"
        "def run(args):\n"
        "    print(f'hello {args.name}')\n"
    )
    (package / "_helpers.py").write_text("raise RuntimeError('private modules are not imported')\n")
    (package / "broken.py").write_text("import a_module_that_does_not_exist\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli, "COMMANDS_PACKAGE", "fake_bmojo_commands")
    for name in ("fake_bmojo_commands", "fake_bmojo_commands.hello", "fake_bmojo_commands.broken"):
        monkeypatch.delitem(sys.modules, name, raising=False)

    assert cli.main(["hello", "--name", "trn1"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "hello trn1\n"
    assert "warning: could not load fake_bmojo_commands.broken" in captured.err
    assert "_helpers" not in captured.err
    assert cli.main(["info", "--json"]) == 0  # still there


def test_a_path_that_is_no_model_is_answered_before_torch_or_transformers_load(tmp_path):
    """`eval`, `generate`, `inspect`, `export-transformer`, `checkpoint consolidate / shard`, and `train`'s
    ``init.weights`` or text ``data.path``, of a path that is not there, or is a file, or a folder of runs, or a
    run of the wrong kind, say so in one line without first importing torch and transformers (seconds of
    start-up), as `data prepare` answers a bad recipe or one with nothing to prepare."""
    missing = str(tmp_path / "runs" / "nope")
    fixtures = ROOT / "tests" / "golden" / "checkpoints"  # three runs, read only: every command here refuses them
    run, weights, out = fixtures / "finished", fixtures / "finished" / "final" / "model.safetensors", tmp_path / "out"
    commands = [["eval", missing], ["generate", missing, "--prompt", "hi"], ["inspect", missing],
                ["export-transformer", missing, str(out)],
                ["checkpoint", "consolidate", missing, str(out)],
                ["checkpoint", "shard", missing, "--tp", "2", "--output-dir", str(out)],
                ["eval", str(weights)], ["inspect", str(run / "recipe.json")],
                ["generate", str(weights), "--prompt", "hi"], ["export-transformer", str(weights), str(out)],
                ["eval", str(fixtures)],
                ["checkpoint", "consolidate", str(weights), str(out)],
                ["checkpoint", "shard", str(weights), "--tp", "2", "--output-dir", str(out)],
                ["checkpoint", "shard", str(run), "--tp", "2", "--output-dir", str(out)],
                ["train", "cpu-tiny", "suite=none", f"init.weights={weights}", "--output-dir", str(out)],
                ["train", "cpu-text", f"data.path={missing}", "--output-dir", str(out)],
                ["data", "prepare", "cpu-tiny", "train.stesp=5"],
                ["data", "prepare", "cpu-text", f"data.path={missing}"], ["data", "prepare", "cpu-tiny"]]
    code = ("import sys; from bmojo_neuron.cli import main; "
            f"codes = [main(args) for args in {commands!r}]; "
            "print(codes, sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.stdout.splitlines() == [  # MQAR data: nothing to prepare, said as quickly
        "cpu-tiny: data.kind is mqar: generated in memory when training starts, nothing to prepare",
        f"{[2] * 18 + [0]} []"], done.stderr
    holder = f"is a file, not a model's folder: give the folder that holds it, {run / 'final'}"
    assert done.stderr.splitlines() == [f"error: {missing} does not exist"] * 6 + [
        f"error: {weights} {holder}", f"error: {run / 'recipe.json'} is a file, not a model's folder: give the "
        f"folder that holds it, {run}", f"error: {weights} {holder}", f"error: {weights} {holder}",
        f"error: {fixtures} holds 3 runs (finished, one-process, tp2-pp2), not one model: give one run's folder, "
        f"e.g. bmojo-neuron eval {run}",
        f"error: {weights} is neither a sharded checkpoint (with parallel.json) nor a run directory whose latest "
        "checkpoint is one",
        f"error: {weights} has no config.json: not a save_pretrained directory",
        f"error: {run} is a run of one-process checkpoints: its weights are whole already and its optimizer state "
        "(by parameter index) is not converted (shard reads a consolidated copy); to train it at other parallel "
        f"degrees, start a new run from its weights: bmojo-neuron train RECIPE init.weights={run} parallel.tp=N "
        "(step 0, a fresh optimizer)", f"error: recipe key init.weights: {weights} {holder}",
        f"error: data.path {missing}: no such file or folder (a hub dataset would be named owner/name, e.g. "
        "roneneldan/TinyStories)",
        "error: recipe key train.stesp: unknown key; valid keys of train: steps, batch_size, grad_accum, precision, "
        "activation_checkpointing, log_every, compile",
        f"error: data.path {missing}: no such file or folder (a hub dataset would be named owner/name, e.g. "
        "roneneldan/TinyStories)"]
    assert not out.exists()


def write_llama_folder(folder: Path, layers: int = 2, truncate: bool = False, **config_changes) -> None:
    """A Llama checkpoint folder written by hand, without torch: config.json of a 2-layer model (`config_changes`
    applied) and a model.safetensors of `layers` layers of zeros (8-byte header length, JSON header, data), cut
    short by 4 bytes with `truncate`."""
    d, inner, vocab = 8, 16, 32
    config = {"model_type": "llama", "vocab_size": vocab, "hidden_size": d, "intermediate_size": inner,
              "num_hidden_layers": 2, "num_attention_heads": 2, "rms_norm_eps": 1e-6}
    shapes = {"model.embed_tokens.weight": [vocab, d], "model.norm.weight": [d], "lm_head.weight": [vocab, d]}
    for i in range(layers):
        shapes.update({f"model.layers.{i}.{name}": shape for name, shape in [
            ("input_layernorm.weight", [d]), ("post_attention_layernorm.weight", [d]),
            ("mlp.gate_proj.weight", [inner, d]), ("mlp.up_proj.weight", [inner, d]),
            ("mlp.down_proj.weight", [d, inner]), *((f"self_attn.{p}_proj.weight", [d, d]) for p in "qkvo")]})
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 4 * shape[0] * (shape[1] if len(shape) > 1 else 1)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header).encode()
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**config, **config_changes}))
    data = len(encoded).to_bytes(8, "little") + encoded + bytes(offset)
    (folder / "model.safetensors").write_bytes(data[:-4] if truncate else data)


def test_refusals_read_from_files_come_before_torch_loads(tmp_path):
    """What files and the recipe alone decide is refused in one line before torch, transformers and datasets
    load (seconds): `export-transformer` of a hybrid, an OUTPUT or --output-dir that a file stands in (export,
    prime, train, eval, inspect), `train` from an ``init.weights`` folder whose model is of another size than the
    recipe's or learned another tokenizer than data.tokenizer's, or with a tokenizer.json holding a JSON list,
    `train --resume` with a changed recipe (another recipe's run: its most telling
    changes and the command that continues it), a hub tokenizer that is neither here nor reachable offline
    (`train`, `data prepare`, `precompile` of a trn1 recipe), a weights file its manifest shows truncated (`eval`, `generate`,
    `export-transformer`), byte-level text or a local tokenizer folder's text for a model of 16 ids (`eval`,
    `inspect` --data), a `prime` SOURCE whose safetensors header is not what its config.json describes (a
    shape, the layer count) or places tensors past the end of the file, and a `prime` --pattern or option that
    does not fit (a letter, the layer count, a name no B'MOJO option has, a size the source fixes) or a SOURCE
    that is a B'MOJO run or export (with the command that makes a transformer of one). No folder is left
    behind."""
    import shutil

    from bmojo_neuron.checkpoints.manifest import write_manifest

    run = tmp_path / "finished"  # a one-process run of a B M model; resumed here, so a copy
    shutil.copytree(ROOT / "tests" / "golden" / "checkpoints" / "finished", run)
    attention = tmp_path / "all-a"  # an all-attention export's config.json (nothing else is read)
    attention.mkdir()
    (attention / "config.json").write_text(json.dumps({"model_type": "bmojo", "layer_pattern": "AA",
                                                       "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2,
                                                       "num_attention_heads": 2, "intermediate_size": 64}))
    file = tmp_path / "a-file"
    file.write_text("x")
    out, under_file = tmp_path / "out", file / "out"
    damaged = tmp_path / "damaged"  # an export whose weights file was cut short after its manifest was written
    shutil.copytree(run / "final", damaged)
    write_manifest(damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    llama = {name: tmp_path / name for name in ("wide", "three-layers", "cut-short")}
    write_llama_folder(llama["wide"], intermediate_size=24)
    write_llama_folder(llama["three-layers"], layers=3)
    write_llama_folder(llama["cut-short"], truncate=True)
    write_llama_folder(tmp_path / "llama")  # files that match: what prime is asked to make is checked next
    story = tmp_path / "story.txt"
    story.write_text("Once upon a time.\n" * 20)
    tokenizer = tmp_path / "tokenizer"  # a local tokenizer of 40 ids, counted from its tokenizer.json
    tokenizer.mkdir()
    eos = {"id": 39, "content": "</s>", "special": True, "single_word": False, "lstrip": False, "rstrip": False,
           "normalized": False}
    (tokenizer / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordLevel", "unk_token": "w0", "vocab": {
        f"w{i}": i for i in range(39)}}, "added_tokens": [eos]}))
    listed = tmp_path / "tokenizer-list"  # a tokenizer.json holding a JSON list
    listed.mkdir()
    (listed / "tokenizer.json").write_text("[]")
    primed = tmp_path / "primed-words"  # a primed folder (config, bmojo_run.json, its source's word tokenizer)
    primed.mkdir()
    (primed / "config.json").write_text(json.dumps({"model_type": "bmojo", "layer_pattern": "AA", "vocab_size": 300,
                                                    "hidden_size": 32, "num_hidden_layers": 2,
                                                    "num_attention_heads": 2, "intermediate_size": 64}))
    (primed / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordLevel", "unk_token": "w0", "vocab": {
        f"w{i}": i for i in range(300)}}, "added_tokens": []}))
    (primed / "bmojo_run.json").write_text(json.dumps({"tokenizer": str(primed), "recipe": {}}))
    commands = [["export-transformer", str(run), str(out)],
                ["export-transformer", str(attention), str(file)],
                ["export-transformer", str(attention), str(run)],
                ["prime", str(attention), str(under_file), "--pattern", "A"],
                ["train", "cpu-tiny", "suite=none", "--output-dir", str(file)],
                ["train", "cpu-tiny", "--output-dir", str(under_file)],
                ["train", str(run / "recipe.json"), "optim.lr=0.5", "model.ssm_residual=false", "--resume",
                 "--output-dir", str(run)],  # the fixture's model predates the ssm_residual default
                ["train", "cpu-text", "data.tokenizer=no-such/tokenizer", "--output-dir", str(out)],
                ["train", "cpu-text", "--resume", "--output-dir", str(run)],  # another recipe's run: summed up
                ["data", "prepare", "cpu-text", "data.tokenizer=no-such-tokenizer", "--output-dir", str(out)],
                ["precompile", "trn1/bmojo-130m", f"data.path={story}", "--cache-dir", str(out)],
                ["eval", str(run), "--output-dir", str(file)],
                ["inspect", str(run), "--output-dir", str(under_file)],
                ["eval", str(damaged)], ["generate", str(damaged), "--prompt", "hi"],
                ["export-transformer", str(damaged), str(out)],
                ["eval", str(run), "--data", "cpu-text"], ["inspect", str(run), "--data", "cpu-text"],
                ["eval", str(run), "--data", "cpu-text", f"data.tokenizer={tokenizer}"],
                ["train", "cpu-text", f"data.tokenizer={listed}", "--output-dir", str(out)],
                ["train", "cpu-text", f"init.weights={primed}", "model=none", "--output-dir", str(out)],
                ["train", "cpu-text", f"init.weights={primed}", "--output-dir", str(out)],
                *(["prime", str(folder), str(out), "--pattern", "AB"] for folder in llama.values()),
                *(["prime", str(tmp_path / "llama"), str(out), *asked] for asked in (
                    ["--pattern", "AXB"], ["--pattern", "ABA"], ["--pattern", "B", "windw_size=8"],
                    ["--pattern", "B", "hidden_size=16"])),
                ["prime", str(run), str(out), "--pattern", "A"], ["prime", str(run / "final"), str(out), "--pattern", "A"]]
    code = ("import sys; from bmojo_neuron.cli import main; "
            f"codes = [main(args) for args in {commands!r}]; "
            "print(codes, sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.stdout.splitlines() == [f"{[2] * len(commands)} []"], done.stderr
    offline = ("not 'byte', not a local folder and not in the local Hugging Face cache, and the hub cannot be "
               "reached (offline mode is on: HF_HUB_OFFLINE is set); download it where online")
    remedy = "pick another --output-dir"
    expected = [
        f"error: {run}: layer_pattern 'BM': only an all-attention (all A) model is a transformer; prime turns "
        "transformers into hybrids, not back",
        f"error: OUTPUT {file} is a file, not a folder; give a folder's path",
        f"error: OUTPUT {run} exists and is not empty; pass --overwrite to replace it",
        f"error: OUTPUT {under_file} cannot be made: {file} is a file, not a folder; give a folder's path",
        f"error: output directory {file} is a file, not a folder; {remedy} (or run.output_dir)",
        f"error: output directory {under_file / 'bmojo'} cannot be made: {file} is a file, not a folder; {remedy} "
        "(or run.output_dir)",
        f"error: cannot resume {run / 'step-0000003'}: the recipe changed in optim.lr (0.003 in the checkpoint, "
        "0.5 now)",
        f"error: data.tokenizer 'no-such/tokenizer': {offline}",
        f"error: cannot resume {run / 'step-0000003'}: the recipe changed in 37 keys, among them data.kind ('mqar' in "
        "the checkpoint, 'text' now), data.tokenizer (None in the checkpoint, 'byte' now), model.hidden_size (8 in "
        "the checkpoint, 128 now), model.layer_pattern ('BM' in the checkpoint, 'BMBM' now), model.num_hidden_layers "
        f"(2 in the checkpoint, 4 now): the folder holds a run of another recipe; continue it with its own "
        f"(bmojo-neuron train {run / 'recipe.json'} --resume --output-dir {run}), or pick another --output-dir for "
        "this one",
        f"error: data.tokenizer 'no-such-tokenizer': {offline}",
        f"error: data.tokenizer 'EleutherAI/gpt-neox-20b': {offline}",
        f"error: output directory {file} is a file, not a folder; {remedy}",
        f"error: output directory {under_file} cannot be made: {file} is a file, not a folder; {remedy}",
        *[f"error: {weights}: 200 bytes, manifest.json says {(run / 'final' / 'model.safetensors').stat().st_size} "
          "(truncated or replaced)"] * 3,
        *["error: the evaluation data has token ids up to 255 (tokenizer 'byte', 256 ids), outside this model's "
          "vocabulary (16); pick --data of the kind the model was trained on"] * 2,
        f"error: the evaluation data has token ids up to 39 (tokenizer '{tokenizer}', 40 ids), outside this model's "
        "vocabulary (16)",
        f"error: data.tokenizer '{listed}': not 'byte' and not loadable as a Hugging Face tokenizer (a local folder "
        "with tokenizer files, or a hub name when online): tokenizer.json: invalid type: sequence, expected struct "
        "Tokenizer at line 1 column 2",
        f"error: init.weights {primed}: its model learned the ids of the tokenizer {primed}, but data.tokenizer is "
        f"byte, which gives other ids; set data.tokenizer={primed}",
        f"error: init.weights {primed}: its model does not have the recipe's layers (missing "
        "['model.layers.0.mixer.innovation_proj.weight', 'model.layers.0.mixer.ssm.A_log', "
        "'model.layers.0.mixer.ssm.D'], unexpected ['model.layers.1.mixer.k_proj.weight', "
        "'model.layers.1.mixer.o_proj.weight', 'model.layers.1.mixer.q_proj.weight']); the model section sets "
        "vocab_size 256 (the folder's: 300), "
        "hidden_size 128 (the folder's: 32), num_hidden_layers 4 (the folder's: 2), layer_pattern 'BMBM' (the "
        "folder's: 'AA'), num_attention_heads 4 (the folder's: 2), intermediate_size 256 (the folder's: 64): leave "
        "these keys out to take the folder's (the override model=none drops the recipe's whole model section)",
        f"error: source {llama['wide']}: model.layers.0.mlp.gate_proj.weight has shape (16, 8) in the weights, but "
        "config.json implies (24, 8); the config does not describe these weights",
        f"error: source {llama['three-layers']}: the weights hold 3 layers, but config.json says num_hidden_layers "
        "2; the config does not describe these weights",
        f"error: source {llama['cut-short']}: model.safetensors is not a readable weight file (",
        "error: --pattern 'AXB': use the letters BFMSA (one per layer, or a group repeated over the 2 layers)",
        "error: --pattern 'ABA' has 3 letters; the source has 2 layers, so give one letter per layer or a group whose "
        "length divides it",
        "error: windw_size=8: not a B'MOJO option (BMojoConfig field); docs/priming.md lists the ones a primed model "
        "takes", "error: hidden_size=16: comes from the source checkpoint and cannot be set",
        f"error: source {run}: a bmojo-neuron run's folder: its model is B'MOJO already; prime reads a transformer "
        "(an all-attention B'MOJO model is written as one by `bmojo-neuron export-transformer RUN OUTPUT`)",
        f"error: source {run / 'final'}: is already a B'MOJO checkpoint; prime reads a transformer (an all-attention "
        "B'MOJO model is written as one by `bmojo-neuron export-transformer RUN OUTPUT`)"]
    lines = done.stderr.splitlines()
    assert len(lines) == len(expected), done.stderr
    for line, start in zip(lines, expected):
        assert line.startswith(start), (line, start)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["a-file", "all-a", "damaged", "finished", "llama", "story.txt", "tokenizer", "tokenizer-list", "primed-words",
         *llama])


def test_the_parser_is_built_once_and_a_parse_leaves_it_as_it_was():
    """`main` called again in one process reuses the parser; overrides that follow the options are in their own
    call's arguments only, not in the parser's empty default that a call without overrides gets."""
    parser = cli.build_parser()
    assert cli.build_parser() is parser
    assert cli.parse_args(parser, ["train", "cpu-tiny", "--dry-run", "run.seed=1"]).overrides == ["run.seed=1"]
    assert cli.parse_args(parser, ["train", "cpu-tiny", "--dry-run"]).overrides == []


def test_an_option_named_like_a_recipe_key_names_the_override_that_sets_it(capsys):
    """``train --steps 5`` is no option: recipe keys are ``key=value`` overrides. A command that takes overrides
    says which one an unknown option may have meant (every section's key of that name, its value carried over);
    an option no key is named like, and a command without overrides, get argparse's words alone."""
    cases = [(["train", "cpu-tiny"], "--steps 5", " (recipe keys are set as key=value: train.steps=5)"),
             (["plan", "trn1/bmojo-130m"], "--batch-size=4", " (recipe keys are set as key=value: train.batch_size=4)"),
             (["train"], "--seq-len", " (recipe keys are set as key=value: data.seq_len=VALUE)"),
             (["train", "cpu-tiny"], "--window-size 8", " (recipe keys are set as key=value: model.window_size=8)"),
             (["train"], "--bogus", ""), (["eval", "RUN"], "--steps 5", "")]
    for command, strays, hint in cases:
        with pytest.raises(SystemExit):
            cli.main([*command, *strays.split()])
        line = capsys.readouterr().err.splitlines()[-1]
        assert line.endswith(f"error: unrecognized arguments: {strays}{hint}"), line


def test_a_missing_action_is_named_with_its_choices(capsys):
    """A command run without its action (``bmojo-neuron data``) names every action it takes, whatever metavar
    (ACTION) its usage shows; the top level names the commands."""
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    grouped = {name: [a for a in sub._actions if not a.option_strings and a.choices]
               for name, sub in commands.items()}
    grouped = {name: actions[0] for name, actions in grouped.items() if actions}
    assert {"data", "cache", "checkpoint", "kernels", "bench"} <= set(grouped)
    for argv, choices in [([], commands), *(([name], action.choices) for name, action in grouped.items())]:
        with pytest.raises(SystemExit):
            cli.main(argv)
        line = capsys.readouterr().err.splitlines()[-1]
        assert "the following arguments are required" in line, line
        assert all(f"'{choice}'" in line or choice in line.split("required: ")[1].split(" ")[0]
                   for choice in choices), line


def test_subcommand_help_describes_the_action(capsys):
    """Each action of `checkpoint`, `cache`, `data` and `kernels` says what it does at the top of its own --help,
    as commands do, under a usage line that names the action."""
    for argv in (["checkpoint", "consolidate"], ["checkpoint", "shard"], ["cache", "ls"], ["cache", "prune"],
                 ["data", "prepare"], ["kernels", "profile"]):
        with pytest.raises(SystemExit) as exc:
            cli.main([*argv, "--help"])
        assert exc.value.code == 0
        usage, description = capsys.readouterr().out.split("\n\n")[:2]
        assert usage.startswith(f"usage: bmojo-neuron {' '.join(argv)}") and not description.startswith(
            ("positional arguments:", "options:")), (argv, description)


def _options(parser: argparse.ArgumentParser, command: tuple[str, ...] = ()):
    """(command, option strings, help) of every option of `parser` and of its sub-commands, --help aside."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _options(sub, (*command, name))
        elif action.option_strings and not isinstance(action, argparse._HelpAction):
            yield command, action.option_strings, action.help


def test_every_option_of_every_command_has_help_and_cache_dir_says_what_each_action_reads():
    options = list(_options(cli.build_parser()))
    assert len(options) > 50 and [(c, o) for c, o, h in options if not h] == []
    cache_dir = {c: h for c, o, h in options if o == ["--cache-dir"]}
    assert all("s3://" not in cache_dir[("cache", a)] for a in ("prune", "push", "pull"))
    assert all("s3://" in cache_dir[("cache", a)] for a in ("ls", "verify"))


def test_usage_errors_name_only_the_arguments_that_are_required(capsys):
    """A command given nothing names what it needs, not its optional ``key=value`` overrides."""
    expected = {("plan",): "recipe", ("precompile",): "recipe", ("data", "prepare"): "recipe",
                ("prime",): "SOURCE, OUTPUT, --pattern"}
    for argv, required in expected.items():
        with pytest.raises(SystemExit) as exc:
            cli.main(list(argv))
        assert exc.value.code == 2
        assert capsys.readouterr().err.splitlines()[-1] == (
            f"bmojo-neuron {' '.join(argv)}: error: the following arguments are required: {required}")


def test_model_commands_name_their_argument_as_the_readme_does(capsys):
    """The README's command table and each command's usage line call the model argument the same."""
    readme = (ROOT / "README.md").read_text()
    for command in ("eval", "generate", "inspect", "export-transformer"):
        assert f"`bmojo-neuron {command} RUN_OR_EXPORT" in readme
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        usage = capsys.readouterr().out.split("\n\n")[0]
        assert usage.split()[-1] == "RUN_OR_EXPORT" or " RUN_OR_EXPORT OUTPUT" in usage, usage


def test_no_command_is_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([])
    assert exc.value.code == 2


# ------------------------------------------------------------------- packaging


def test_base_dependencies_have_no_neuron_package(pyproject):
    base = {canonicalize_name(Requirement(r).name) for r in pyproject["project"]["dependencies"]}
    assert not base & NEURON_DISTS
    assert {"torch", "transformers", "datasets"} <= base


def test_neuron_extra_pins(pyproject):
    extra = [Requirement(r) for r in pyproject["project"]["optional-dependencies"]["neuron"]]
    pins = {}
    for req in extra:
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", str(req)
        pins[canonicalize_name(req.name)] = specs[0].version
    assert pins == NEURON_PINS


def test_console_script(pyproject):
    assert pyproject["project"]["scripts"] == {"bmojo-neuron": "bmojo_neuron.cli:main"}


# --------------------------------------------------------------- README and CI


def _quick_start_commands(readme: str) -> list[str]:
    section = re.search(r"^## Quick start\n(.*?)(?=^## )", readme, re.S | re.M)
    assert section, "README has no '## Quick start' section"
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", section.group(1), re.S | re.M)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    quick_start = _quick_start_commands(readme)
    assert len(quick_start) == 2
    assert quick_start[0] == "pip install torch==2.13.0 && pip install -e . && bmojo-neuron train"

    result = subprocess.run(["bash", str(ROOT / ".ci" / "run"), "--print-command"],
                            capture_output=True, text=True, check=True)
    extracted = result.stdout.splitlines()
    assert len(extracted) == 1
    assert extracted[0] == quick_start[1]
    assert extracted[0] == 'pip install torch==2.13.0 && pip install -e ".[dev]" && python -m pytest -q'


def test_readme_lists_every_command():
    readme = (ROOT / "README.md").read_text()
    table = re.search(r"^## Commands\n(.*?)(?=^## )", readme, re.S | re.M)
    assert table, "README has no '## Commands' section"
    cli.build_parser()
    listed = set(re.findall(r"^\| `bmojo-neuron ([a-z-]+)", table.group(1), re.M))
    assert listed == set(cli.COMMANDS)


def test_overrides_may_follow_options(capsys):
    # two layers: the plan builds the model to count it, which takes seconds at the recipe's twelve
    overrides = ["parallel.zero1=true", "train.batch_size=64", "model.num_hidden_layers=2", "model.layer_pattern=BB"]
    assert cli.main(["plan", "trn1/bmojo-130m", "--json", *overrides]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["overrides"] == overrides
    assert plan["memory"]["zero1"] is True and plan["memory"]["microbatch_size"] == 2


def test_stray_arguments_after_options_are_still_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["plan", "trn1/bmojo-130m", "--json", "--nodez", "2"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "unrecognized arguments: --nodez 2" in err
    # the usage shown is the command's, which lists the options it does take
    assert err.startswith("usage: bmojo-neuron plan ") and "--nodes NODES" in err
    with pytest.raises(SystemExit):  # a subcommand's action too
        cli.main(["checkpoint", "consolidate", "run", "out", "--bogus"])
    assert capsys.readouterr().err.startswith("usage: bmojo-neuron checkpoint consolidate ")
    with pytest.raises(SystemExit):  # a command without overrides takes no key=value
        cli.main(["info", "run.seed=1"])


def test_nxd_importing_transformers_4_fx_is_reported_importable(tmp_path, monkeypatch):
    """NxD 0.17 runs `from transformers.utils.fx import HFTracer` on import (transformers 5 has no such module)
    and tries NxD Training, catching only ImportError: an installed NxD Training that raises otherwise (NeMo
    under transformers 5) must not break the import."""
    from bmojo_neuron.neuron import neuron_status

    package = tmp_path / "neuronx_distributed"
    package.mkdir()
    (package / "__init__.py").write_text("from transformers.utils.fx import HFTracer\n"
                                         "class HFTracerWrapper(HFTracer):\n    pass\n__version__ = '0.17.0'\n"
                                         "try:  # as NxD's utils/model_utils.py\n"
                                         "    from neuronx_distributed_training.models.megatron.module import M\n"
                                         "except ImportError:\n    pass\n")
    nxdt = tmp_path / "neuronx_distributed_training"  # installed, and broken as NeMo under transformers 5 can be
    nxdt.mkdir()
    (nxdt / "__init__.py").write_text("raise AttributeError('NeMo needs transformers 4')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("neuronx_distributed", "transformers.utils.fx", "neuronx_distributed_training"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    try:
        status = neuron_status()["neuronx_distributed"]
    finally:  # drop the fake NxD and the stand-ins it needed
        import transformers.utils

        for name in ("neuronx_distributed", "transformers.utils.fx", "neuronx_distributed_training"):
            sys.modules.pop(name, None)
        monkeypatch.delattr(transformers.utils, "fx", raising=False)
    assert status["status"] == "ok" and status["version"] == "0.17.0", status


# ----------------------------------------------------------------------------- errors under torchrun
def torchrun_rank(monkeypatch, rank: int, error_file: Path | None) -> None:
    """The variables torchrun gives worker `rank` of 2 (`torch/distributed/elastic/multiprocessing/api.py` sets
    TORCHELASTIC_ERROR_FILE per worker)."""
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", "2")
    if error_file is None:
        monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    else:
        monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))


def failure_message(error_file: Path) -> str:
    """What torchrun's failure summary shows for a worker that wrote `error_file`, read by torch's own reader."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    failure = ProcessFailure(local_rank=1, pid=1, exitcode=2, error_file=str(error_file))
    summary = ChildFailedError("bmojo_neuron.cli", {1: failure}).format_msg()
    return next(line.split(":", 1)[1].strip() for line in summary.splitlines() if line.strip().startswith("traceback"))


ERROR = "error: recipe 'no-such-recipe' not found"


@pytest.mark.parametrize("rank", [0, 1])
def test_under_torchrun_only_rank_0_prints_the_error_and_torchrun_gets_each_ranks(monkeypatch, capsys, tmp_path,
                                                                                  rank):
    """A bad recipe fails every rank alike: one line (rank 0's), every rank still exits 2, and each rank's
    message is in its torchrun error file, so a rank that failed alone is named in torchrun's summary."""
    error_file = tmp_path / "error.json"
    torchrun_rank(monkeypatch, rank, error_file)
    assert cli.main(["train", "no-such-recipe"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(ERROR) if rank == 0 else err == ""
    assert failure_message(error_file).startswith(ERROR)


def test_a_rank_without_a_torchrun_error_file_prints_its_error_with_its_rank(monkeypatch, capsys):
    torchrun_rank(monkeypatch, 1, None)  # RANK set by another launcher
    assert cli.main(["train", "no-such-recipe"]) == 2
    assert capsys.readouterr().err.startswith("error: rank 1: recipe 'no-such-recipe' not found")


def test_one_process_prints_its_error(monkeypatch, capsys, tmp_path):
    """Without torchrun: the line, and no file. Under ``torchrun --nproc-per-node 1``: the line and the file."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_ERROR_FILE"):
        monkeypatch.delenv(name, raising=False)
    assert cli.main(["train", "no-such-recipe"]) == 2
    assert capsys.readouterr().err.startswith(ERROR) and not list(tmp_path.iterdir())
    torchrun_rank(monkeypatch, 0, tmp_path / "error.json")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert cli.main(["train", "no-such-recipe"]) == 2
    assert capsys.readouterr().err.startswith(ERROR) and failure_message(tmp_path / "error.json").startswith(ERROR)


def test_a_tilde_left_by_the_shell_in_output_dir_is_the_home_folder_for_every_command(monkeypatch, tmp_path):
    # bash expands `~` only at the start of a word, so `--output-dir=~/runs` reaches us as typed.
    monkeypatch.setenv("HOME", str(tmp_path))
    commands = [["train", "cpu-tiny"], ["eval", "run"], ["inspect", "run"], ["data", "prepare", "cpu-tiny"],
                ["checkpoint", "shard", "src", "--tp", "2"], ["precompile", "trn1/bmojo-130m"]]
    for command in commands:
        args = cli.parse_args(cli.build_parser(), [*command, "--output-dir=~/runs"])
        assert args.output_dir == str(tmp_path / "runs"), command
    assert cli.parse_args(cli.build_parser(), ["eval", "run"]).output_dir is None
