"""The documentation against the code: links, command lines and Python snippets.

A user copies what the docs show. These tests keep it working: every relative link names a
file and heading that exist, every `bmojo-neuron` command line in a shell block parses with
the real argument parser (options spelled as the code spells them), the recipe overrides
those commands pass load on the shipped recipes, and the Python snippets of docs/hf.md and
docs/recipes.md run on tiny models.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from bmojo_neuron.cli import build_parser, parse_args
from bmojo_neuron.recipes import load_recipe, resolve_recipe_path

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "infra" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"\s*```(\S*)")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
INLINE_CODE = re.compile(r"`[^`]*`")


def fenced_blocks(path: Path) -> list[tuple[str, int, list[str]]]:
    """Each fenced block of `path`: its language tag, the line number of its first line, its lines."""
    blocks, lines, i = [], path.read_text(encoding="utf-8").splitlines(), 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        i += 1
        if opening:
            start = i
            while not FENCE.match(lines[i]):
                i += 1
            blocks.append((opening.group(1), start + 1, lines[start:i]))
            i += 1
    return blocks


def prose_lines(path: Path) -> list[tuple[int, str]]:
    """The numbered lines of `path` outside fenced blocks."""
    inside, out = False, []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            inside = not inside
        elif not inside:
            out.append((number, line))
    return out


def github_anchor(heading: str) -> str:
    """GitHub's id of a heading: markdown links reduced to their text, lower case, punctuation other than
    ``-`` and ``_`` dropped, spaces made hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def heading_anchors(path: Path) -> set[str]:
    """The anchors of `path`'s headings (a repeated heading gets ``-1``, ``-2``, ... as on GitHub)."""
    seen: dict[str, int] = {}
    anchors = set()
    for _, line in prose_lines(path):
        heading = re.match(r"#{1,6}\s+(.*)", line)
        if heading:
            anchor = github_anchor(heading.group(1))
            count = seen.get(anchor, 0)
            anchors.add(anchor if count == 0 else f"{anchor}-{count}")
            seen[anchor] = count + 1
    return anchors


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """One line per relative link of `path` whose file, or whose anchor in a markdown file, does not exist
    (links inside inline code and fenced blocks are text, not links)."""
    problems = []
    for number, line in prose_lines(path):
        for target in LINK.findall(INLINE_CODE.sub("", line)):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            linked = (path.parent / file).resolve() if file else path
            where = f"{path.relative_to(root)}:{number}: {target}"
            if not linked.exists():
                problems.append(f"{where}: no such file")
            elif anchor and linked.suffix == ".md" and anchor not in heading_anchors(linked):
                problems.append(f"{where}: no heading with that anchor in {linked.name}")
    return problems


def test_github_anchor_follows_githubs_rule():
    assert github_anchor("Inside the eidetic memory: `bmojo-neuron inspect`") == (
        "inside-the-eidetic-memory-bmojo-neuron-inspect")
    assert github_anchor("Pipeline parallelism and ZeRO-1 on Trainium (NxD)") == (
        "pipeline-parallelism-and-zero-1-on-trainium-nxd")
    assert github_anchor("The default run: `bmojo-neuron train`") == "the-default-run-bmojo-neuron-train"


def test_broken_links_are_found(tmp_path):
    (tmp_path / "a.md").write_text("# Top\n\n[ok](#top) [gone](b.md) [bad](a.md#nowhere) `[code](x.md)`\n"
                                   "```\n[in a block](y.md)\n```\n")
    problems = broken_links(tmp_path / "a.md", root=tmp_path)
    assert problems == ["a.md:3: b.md: no such file", "a.md:3: a.md#nowhere: no heading with that anchor in a.md"]


def test_relative_links_in_the_docs_name_existing_files_and_headings():
    problems = [problem for doc in DOCS for problem in broken_links(doc)]
    assert not problems, "\n".join(problems)


# --- command lines -------------------------------------------------------------------------------------------

# Placeholders the docs explain next to the command, and a value that stands for them here (also as the value of
# a key=value); None drops the word. A shell variable ($O, $OVERRIDES) stands for words the docs spell out nearby.
PLACEHOLDERS = {"S": "0", "OPTIONS": None, "OVERRIDE": None, "...": None}
SHELL_OPERATORS = {"&", "&&", "||", "|", ";", ">", ">>", "<", "2>&1"}
SHELL_BLOCKS = {"bash", "sh", "shell", "console", "text", ""}


def shell_lines(lines: list[str], first: int) -> list[tuple[int, str]]:
    """The block's lines with backslash continuations joined, each with its first line's number."""
    out, pending, start = [], "", None
    for offset, line in enumerate(lines):
        start = first + offset if start is None else start
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((start, (pending + line).removeprefix("$ ")))
        pending, start = "", None
    return out


def cli_arguments(words: list[str]) -> list[list[str]]:
    """The argument lists given to `bmojo-neuron` (or ``-m bmojo_neuron.cli``) in one shell line's words,
    including inside ``bash -c '...'``."""
    found = []
    for i, word in enumerate(words):
        if word in ("bmojo-neuron", "bmojo_neuron.cli") and (word != "bmojo_neuron.cli" or words[i - 1] == "-m"):
            rest = []
            for arg in words[i + 1:]:
                if arg in SHELL_OPERATORS:
                    break
                rest.append(arg)
            found.append(rest)
            break
        if word == "-c" and i > 0 and words[i - 1] == "bash" and i + 1 < len(words):
            found += cli_arguments(shlex.split(words[i + 1], comments=True))
    return found


def filled_in(args: list[str]) -> list[str]:
    """`args` with the docs' placeholders replaced (`PLACEHOLDERS`) and shell variables dropped."""
    out = []
    for arg in args:
        key, equals, value = arg.rpartition("=")
        if equals and PLACEHOLDERS.get(value):
            arg = f"{key}={PLACEHOLDERS[value]}"
        elif arg in PLACEHOLDERS or re.fullmatch(r"\$\w+", arg):
            arg = PLACEHOLDERS.get(arg)
        if arg is not None:
            out.append(arg)
    return out


def commands_in(lines: list[str], first: int, where: str) -> list[tuple[str, list[str]]]:
    """The `bmojo-neuron` argument lists of some shell lines, placeholders filled in; usage synopses
    (``[key=value ...]``) are left out."""
    commands = []
    for number, line in shell_lines(lines, first):
        if "bmojo-neuron" not in line and "bmojo_neuron.cli" not in line:
            continue
        for variant in sorted({line.replace("$T", kind) for kind in ("mqar", "text")}):  # priming.md's T=mqar|text
            for args in cli_arguments(shlex.split(variant, comments=True)):
                if args and not any(arg.startswith("[") for arg in args):
                    commands.append((f"{where}:{number}", filled_in(args)))
    return commands


def recipe_header_commands(recipe: Path) -> list[tuple[str, list[str]]]:
    """The command lines a recipe's header comment shows, indented under ``#`` (the priming recipes' stages)."""
    lines = [line[1:] if line.startswith("#") else "" for line in recipe.read_text(encoding="utf-8").splitlines()]
    shown = [line if re.match(r"\s{2,}\S", line) else "" for line in lines]
    return commands_in(shown, 1, str(recipe.relative_to(ROOT)))


def documented_commands() -> list[tuple[str, list[str]]]:
    """Every `bmojo-neuron` argument list in the docs' shell blocks and the recipes' headers."""
    commands = []
    for doc in DOCS:
        for language, first, lines in fenced_blocks(doc):
            if language in SHELL_BLOCKS:
                commands += commands_in(lines, first, str(doc.relative_to(ROOT)))
    for recipe in sorted((ROOT / "recipes").rglob("*.yaml")):
        commands += recipe_header_commands(recipe)
    return commands


def inline_commands() -> list[tuple[str, list[str]]]:
    """The `bmojo-neuron ...` inline code spans of the docs' prose, as argument lists (synopses left out)."""
    commands = []
    for doc in DOCS:
        for number, line in prose_lines(doc):
            for span in INLINE_CODE.findall(line):
                span = span.strip("`")
                if span.startswith("bmojo-neuron ") or "-m bmojo_neuron.cli " in span:
                    for args in cli_arguments(shlex.split(span)):
                        if args and not any(arg.startswith("[") for arg in args):
                            commands.append((f"{doc.relative_to(ROOT)}:{number}", filled_in(args)))
    return commands


def parse_error(args: list[str]) -> str | None:
    """argparse's complaint about `args` as the command line parses them, or None."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            parse_args(build_parser(), args)
    except SystemExit as exit_:
        if exit_.code:
            return stderr.getvalue().strip().splitlines()[-1]
    return None


def test_the_docs_show_many_commands():
    """The extraction itself works: the docs hold well over a hundred command lines, of every kind."""
    commands = documented_commands()
    assert len(commands) > 100
    assert {args[0] for _, args in commands} >= {
        "train", "data", "eval", "inspect", "generate", "prime", "export-transformer", "checkpoint", "plan",
        "precompile", "cache", "bench", "info"}


def test_a_misspelled_option_is_a_parse_error():
    assert parse_error(["train", "cpu-tiny", "--dry-run", "train.steps=2"]) is None
    assert "--max-tokens" in parse_error(["generate", "runs/x", "--prompt", "a", "--max-tokens", "5"])


def test_every_documented_command_line_parses():
    problems = [f"{where}: bmojo-neuron {shlex.join(args)}\n    {error}"
                for where, args in documented_commands() if (error := parse_error(args))]
    assert not problems, "\n".join(problems)


def option_error(args: list[str]) -> str | None:
    """`parse_error`, only where it is about an option: prose often names a command without its
    arguments (`bmojo-neuron plan`), but an option it shows must exist."""
    error = parse_error(args)
    return error if error and ("unrecognized arguments: -" in error or "argument -" in error) else None


def test_every_option_named_in_the_prose_exists():
    assert option_error(["plan"]) is None
    assert option_error(["kernels", "profile", "--jsn"]) is not None
    commands = inline_commands()
    assert len(commands) > 50
    problems = [f"{where}: bmojo-neuron {shlex.join(args)}\n    {error}"
                for where, args in commands if (error := option_error(args))]
    assert not problems, "\n".join(problems)


def shipped_recipe(name: str | None) -> bool:
    """Whether `name` is one of the shipped recipes (a command naming the user's own file is not checked)."""
    try:
        return resolve_recipe_path(name or "cpu-tiny").resolve().is_relative_to(ROOT / "recipes")
    except (ValueError, FileNotFoundError):
        return False


def test_recipe_overrides_of_documented_commands_load(monkeypatch):
    """`train`, `data prepare`, `plan` and `precompile` lines on a shipped recipe: the recipe with the
    line's overrides loads (every key exists, every value has the right type and range)."""
    from bmojo_neuron.commands.train import recipe_and_overrides

    monkeypatch.chdir(ROOT)  # `recipes/cpu-tiny.yaml` as the docs write it
    checked, problems = 0, []
    for where, args in documented_commands():
        if args[0] not in ("train", "plan", "precompile", "data") or parse_error(args):
            continue
        parsed = parse_args(build_parser(), args)
        name, overrides = (recipe_and_overrides(parsed) if args[0] == "train"
                           else (parsed.recipe, list(parsed.overrides)))
        if not shipped_recipe(name):
            continue
        try:
            load_recipe(name, overrides)
            checked += 1
        except ValueError as err:
            problems.append(f"{where}: bmojo-neuron {shlex.join(args)}\n    {err}")
    assert not problems, "\n".join(problems)
    assert checked > 30


def test_prime_options_of_documented_commands_are_bmojo_options():
    """`prime`'s key=value options are `BMojoConfig` fields (the recipes' headers hold the real ones)."""
    import inspect

    from bmojo_neuron import BMojoConfig
    from bmojo_neuron.commands.prime import parse_overrides

    fields = set(inspect.signature(BMojoConfig).parameters)
    primes = [(where, args) for where, args in documented_commands() if args[0] == "prime"]
    problems = [f"{where}: {key}" for where, args in primes
                for key in parse_overrides(parse_args(build_parser(), args).overrides) if key not in fields]
    assert not problems, "not BMojoConfig fields:\n" + "\n".join(problems)
    assert sum(bool(parse_args(build_parser(), args).overrides) for _, args in primes) >= 4


RECIPE_KEY = re.compile(r"(?<![\w./-])(run|data|model|optim|train|eval|checkpoint|parallel|init|distill)\.(\w+)(?=$|=)")


FILE_SUFFIXES = {"md", "json", "jsonl", "py", "yaml", "sbatch", "png", "txt", "pt", "log"}


def recipe_keys() -> dict[str, set[str]]:
    """Every valid ``section.key`` of a recipe, by section (``model``: the `BMojoConfig` arguments)."""
    import dataclasses
    import inspect

    from bmojo_neuron import BMojoConfig
    from bmojo_neuron import recipes

    sections = {"run": recipes.RunSection, "optim": recipes.OptimSection, "train": recipes.TrainSection,
                "eval": recipes.EvalSection, "checkpoint": recipes.CheckpointSection,
                "parallel": recipes.ParallelSection, "init": recipes.InitSection, "distill": recipes.DistillSection}
    keys = {name: {field.name for field in dataclasses.fields(cls)} for name, cls in sections.items()}
    keys["data"] = {field.name for cls in (recipes.MqarDataSection, recipes.TextDataSection)
                    for field in dataclasses.fields(cls)}
    keys["model"] = set(inspect.signature(BMojoConfig).parameters)
    return keys


def test_recipe_keys_named_in_the_prose_exist():
    """An inline `section.key` or `section.key=value` of the docs' prose names a real recipe key. File names
    (`data.md`, `parallel.json`) are not keys, and `model.x` alone is as often a parameter name
    (`model.embed_tokens`), so the model section is checked where a value follows."""
    keys = recipe_keys()
    problems, checked = [], 0
    for doc in DOCS:
        for number, line in prose_lines(doc):
            for span in INLINE_CODE.findall(line):
                for word in span.strip("`").split():
                    found = RECIPE_KEY.match(word)
                    if (not found or found.group(2) in FILE_SUFFIXES
                            or (found.group(1) == "model" and "=" not in word)):
                        continue
                    checked += 1
                    section, key = found.groups()
                    if key not in keys[section]:
                        problems.append(f"{doc.relative_to(ROOT)}:{number}: {section}.{key}")
    assert not problems, "not recipe keys:\n" + "\n".join(problems)
    assert checked > 100


# --- Python snippets -----------------------------------------------------------------------------------------

def python_blocks(doc: Path) -> list[str]:
    return ["\n".join(lines) for language, _, lines in fenced_blocks(doc) if language == "python"]


def test_recipes_md_python_snippet_runs():
    """docs/recipes.md's "From Python" block, as written (a bare expression's value is dropped)."""
    (snippet, *_) = python_blocks(ROOT / "docs" / "recipes.md")
    namespace: dict = {}
    exec(compile(snippet, "docs/recipes.md", "exec"), namespace)
    assert namespace["recipe"].train.steps == 10
    assert namespace["bmojo_f"].model_config().layer_pattern == "FF"


def test_ops_md_python_snippet_runs():
    """docs/ops.md's backend choice, as written; the backends in force before are restored after."""
    from bmojo_neuron import ops
    from bmojo_neuron.ops import dispatch

    (snippet, *_) = python_blocks(ROOT / "docs" / "ops.md")
    before = {op: dispatch.get_backend(op) for op in dispatch.OP_NAMES}
    try:
        exec(compile(snippet.replace("    ...", "    inside = dispatch.get_backend('ssd_scan')"), "docs/ops.md",
                     "exec"), namespace := {"dispatch": dispatch})
        assert namespace["inside"] == "nki-sim"
        assert dispatch.get_backend("ssd_scan") == dispatch.get_backend("selective_scan") == "torch"
    finally:
        for op, backend in before.items():
            ops.set_backend(backend, [op])


def test_priming_md_tiny_source_primes_as_shown(tmp_path, capsys):
    """docs/priming.md's tiny Qwen3, saved by its Python block, primed by the command after it: the printed
    report is the one the page shows (the logits' difference, which the random init decides, within a factor
    of 2), and the primed folder names its copied tokenizer."""
    import json

    from bmojo_neuron import cli

    doc = ROOT / "docs" / "priming.md"
    (snippet, *_) = python_blocks(doc)
    source, primed = tmp_path / "qwen3-tiny", tmp_path / "primed"
    exec(compile(snippet.replace("/tmp/qwen3-tiny", str(source)), "docs/priming.md", "exec"), {})
    shown = next(lines for language, _, lines in fenced_blocks(doc)
                 if language == "text" and lines[0].startswith("$ bmojo-neuron prime /tmp/qwen3-tiny"))
    command = shlex.split(shown[0].removeprefix("$ bmojo-neuron "))
    assert command[1:3] == ["/tmp/qwen3-tiny", "/tmp/primed"]
    assert cli.main([command[0], str(source), str(primed), *command[3:]]) == 0
    printed = capsys.readouterr().out.replace(str(primed), "/tmp/primed").splitlines()
    assert printed[:-2] == shown[1:-2] and printed[-1] == shown[-1]  # the report, then what to run next
    number = re.compile(r"difference (\S+)$")
    documented, measured = (float(number.search(line).group(1)) for line in (shown[-2], printed[-2]))
    assert documented / 2 < measured < documented * 2, printed[-2]
    assert json.loads((primed / "bmojo_run.json").read_text())["tokenizer"] == str(primed)


@pytest.fixture
def tiny_runs(tmp_path, monkeypatch):
    """The two exports hf.md loads, as tiny models: an MQAR run's (64 task ids, no tokenizer files) and a text
    run's (byte tokenizer), at the paths hf.md names, relative to the working directory."""
    import torch
    from naive import tiny_config

    from bmojo_neuron import BMojoForCausalLM
    from bmojo_neuron.checkpoints.export import export_final

    torch.manual_seed(0)
    export_final(tmp_path / "runs/cpu-tiny/bmojo", BMojoForCausalLM(tiny_config()).eval(),
                 {"model": {}, "data": {"kind": "mqar"}}, "byte", {})
    export_final(tmp_path / "runs/cpu-text", BMojoForCausalLM(tiny_config(vocab_size=256)).eval(),
                 {"model": {}, "data": {"kind": "text"}}, "byte", {})
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.filterwarnings("ignore:.pin_memory. argument")  # Trainer on a machine without an accelerator
def test_hf_md_python_snippets_run(tiny_runs):
    """docs/hf.md's blocks, in order, in one namespace: loading, a padded batch through `generate`, and
    `Trainer` (the compiled-decoding block is only parsed). What the prose leaves to the reader is given: the tokenizer and model of the text export,
    and a small dataset of input_ids and labels."""
    import datasets
    import torch

    loading, compiled, padding, trainer = python_blocks(ROOT / "docs" / "hf.md")
    # The compiled-decoding block only parses here: compiling takes minutes, and what it shows runs in
    # tests/test_compiled_decode.py (generate with a compile_config; the by-hand prefill and compiled step).
    compile(compiled, "docs/hf.md (Compiled decoding)", "exec")
    assert "compile_config=CompileConfig(" in compiled and "BMojoCache(model.config.num_hidden_layers" in compiled
    namespace: dict = {}
    exec(compile(loading, "docs/hf.md (Loading)", "exec"), namespace)
    assert type(namespace["model"]).__name__ == "BMojoForCausalLM"
    assert namespace["model"].config.vocab_size == 64

    generator = namespace["generator"]
    namespace.update(tokenizer=generator.tokenizer, model=generator.model)
    exec(compile(padding, "docs/hf.md (Padding)", "exec"), namespace)
    out, batch = namespace["out"], namespace["batch"]
    assert out.shape[0] == 2 and out.shape[1] <= batch["input_ids"].shape[1] + 20
    assert bool((batch["attention_mask"][0] == 0).any())  # left-padded: the short prompt's row

    rows = torch.randint(1, 256, (8, 16), generator=torch.Generator().manual_seed(0)).tolist()
    namespace["dataset"] = datasets.Dataset.from_dict({"input_ids": rows, "labels": rows})
    before = {k: v.clone() for k, v in namespace["model"].state_dict().items()}
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        exec(compile(trainer, "docs/hf.md (Trainer)", "exec"), namespace)  # writes ./out, in tmp_path
    after = namespace["model"].state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained
