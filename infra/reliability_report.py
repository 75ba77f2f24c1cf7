"""Try bad inputs on the command line as a user would; write docs/reliability.md from what happened.

    python infra/reliability_report.py            # 4-8 minutes on 2 busy shared cores

Each case runs `bmojo-neuron` in a fresh process and is handled when the command
exits with status 2, its error output starts with ``error:`` (argparse's own
``usage:`` line and ``bmojo-neuron COMMAND: error:`` for a bad option) and holds no
traceback. The kill tests are run by the test suite; their figures are quoted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bmojo_neuron.closed_stdout import exit_status_on_closed_stdout

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "reliability.md"
TINY = ["train.steps=2", "eval.every=2", "eval.batches=1", "checkpoint.every=2", "suite=none",
        "data.train_examples=64", "data.eval_examples=16", "eval.length_multipliers=[1]"]


@dataclass
class Case:
    what: str
    argv: list[str]
    prepare: str = ""  # name of a set-up step in `prepare`


def cases(work: Path) -> list[Case]:
    out = str(work / "out")
    train = ["train", "--no-progress", "--output-dir", out]
    return [
        Case("infinite learning rate", [*train, "optim.lr=.inf"]),
        Case("negative learning rate", [*train, "optim.lr=-1e-3"]),
        Case("a word for a number", [*train, "model.hidden_size=abc"]),
        Case("a fraction for an integer", [*train, "train.steps=2.5"]),
        Case("heads that do not divide the hidden size", [*train, "model.num_attention_heads=5"]),
        Case("zero steps", [*train, "train.steps=0"]),
        Case("keep no checkpoint", [*train, "checkpoint.keep_last=0"]),
        Case("an unknown recipe key", [*train, "optim.learning_rate=1e-3"]),
        Case("an unknown recipe", ["train", "no-such-recipe", "--output-dir", out]),
        Case("an unknown device", [*train, "run.device=tpu"]),
        Case("a missing text file", ["train", "cpu-text", "--output-dir", out, "data.path=/no/such/file.txt"]),
        Case("a bare name as data.path (not sent to the hub)", ["train", "cpu-text", "--output-dir", out,
                                                              "data.path=my_corpus"]),
        Case("a Latin-1 text file", ["train", "cpu-text", "--output-dir", out, f"data.path={work / 'latin1.txt'}"],
             "latin1"),
        Case("a binary file inside a data folder", ["train", "cpu-text", "--output-dir", out,
                                                    f"data.path={work / 'corpus'}"], "corpus"),
        Case("a JSON-lines file with a line that is not JSON", ["data", "prepare", "cpu-text", "--output-dir", out,
                                                                 f"data.path={work / 'docs.jsonl'}"], "jsonl"),
        *([] if os.geteuid() == 0 else [  # root writes into read-only folders
            Case("a read-only output directory", ["train", "--no-progress", "--output-dir", str(work / "ro" / "run"),
                                                  *TINY], "read_only")]),
        Case("a run directory already used, without --resume", [*train, *TINY], "used"),
        Case("eval of a path that does not exist", ["eval", str(work / "nothing")]),
        Case("eval of an export with a truncated weights file", ["eval", str(work / "damaged" / "final")], "damaged"),
        Case("generate from an export with a truncated weights file",
             ["generate", str(work / "damaged" / "final"), "--prompt", "ab"], "damaged"),
        Case("an override value that is not YAML", [*train, "optim.betas=[0.9"]),
        Case("a section given a value other than none", ["train", "cpu-tiny", "--output-dir", out, "model=64"]),
        Case("a length multiple given twice", [*train, "eval.length_multipliers=[1,1]"]),
        Case("an empty --output-dir", ["train", "--output-dir", ""]),
        Case("an empty recipe file", ["train", str(work / "empty.yaml"), "--output-dir", out], "empty"),
        Case("a resume with a changed learning rate", [*train, *TINY, "optim.lr=2e-3", "--resume"], "used"),
        Case("an unknown hub tokenizer, offline", ["train", "cpu-text", "--output-dir", str(work / "tokenizer"),
                                                    "data.tokenizer=no-such-tokenizer", "suite=none",
                                                    "train.steps=2"]),
        Case("an unknown hub tokenizer, offline, in data prepare",
             ["data", "prepare", "cpu-text", "--output-dir", str(work / "tokenizer"),
              "data.tokenizer=no-such/tokenizer"]),
        Case("eval with zero batches", ["eval", out, "--batches", "0"], "used"),
        Case("eval of an MQAR model on text (a larger vocabulary)", ["eval", out, "--data", "cpu-text"], "used"),
        Case("eval of a suite's folder (one run per model)", ["eval", str(work / "suite")], "suite"),
        Case("eval of a weights file instead of its folder", ["eval", str(work / "out" / "final" / "model.safetensors")],
             "used"),
        Case("inspect of a weights file instead of its folder",
             ["inspect", str(work / "out" / "final" / "model.safetensors")], "used"),
        Case("export-transformer of a weights file instead of its folder",
             ["export-transformer", str(work / "out" / "final" / "model.safetensors"), str(work / "exported")],
             "used"),
        Case("consolidate of a one-process run", ["checkpoint", "consolidate", out, str(work / "full")], "used"),
        Case("shard of a one-process run (not one full copy)",
             ["checkpoint", "shard", out, "--tp", "2", "--output-dir", str(work / "sharded")], "used"),
        Case("eval into an output directory that is a file", ["eval", out, "--output-dir",
                                                               str(work / "a-file")], "file"),
        Case("train into an output directory that is a file", ["train", "--output-dir", str(work / "a-file"), *TINY],
             "file"),
        Case("export-transformer of a hybrid (not all attention)", ["export-transformer", out, str(work / "exported")],
             "used"),
        Case("export-transformer of a Hugging Face Llama (not B'MOJO)",
             ["export-transformer", str(work / "llama"), str(work / "exported")], "llama"),
        Case("prime into an OUTPUT that is a file", ["prime", str(work / "llama"), str(work / "a-file"), "--pattern",
                                                     "A"], "file"),
        Case("prime from a Llama whose config.json does not match its weights",
             ["prime", str(work / "llama-edited"), str(work / "primed"), "--pattern", "A"], "llama_edited"),
        Case("prime from a Llama whose weights hold fewer layers than its config.json says",
             ["prime", str(work / "llama-layers"), str(work / "primed"), "--pattern", "A"], "llama_layers"),
        Case("prime with a --pattern letter that does not exist",
             ["prime", str(work / "llama"), str(work / "primed"), "--pattern", "AXB"], "llama"),
        Case("a text model with fewer ids than the byte tokenizer", ["train", "cpu-text", "--output-dir", out,
                                                                    "model.vocab_size=100"]),
        Case("a local tokenizer that names no eos token", ["train", "cpu-text", "--output-dir", str(work / "no-eos"),
                                                          f"data.tokenizer={work / 'tokenizer-no-eos'}"],
             "tokenizer_no_eos"),
        Case("a local tokenizer.json holding a JSON list", ["train", "cpu-text", "--output-dir", str(work / "list"),
                                                           f"data.tokenizer={work / 'tokenizer-list'}"],
             "tokenizer_list"),
        Case("a text run from a primed folder whose model learned another tokenizer (data.tokenizer unset)",
             ["train", "cpu-text", "--output-dir", str(work / "from-primed"), f"init.weights={work / 'primed-words'}",
              "model=none"], "primed_words"),
        Case("a run from a primed folder of another size, without model=none",
             ["train", "cpu-text", "--output-dir", str(work / "from-primed"), f"init.weights={work / 'primed-words'}"],
             "primed_words"),
        Case("train --resume into another recipe's run", ["train", "cpu-text", "--resume", "--output-dir", out],
             "used"),
        Case("eval of an MQAR model on text of a local tokenizer with more ids",
             ["eval", out, "--data", "cpu-text", f"data.tokenizer={work / 'tokenizer-300'}"], "tokenizer_300"),
        Case("precompile of a trn1 recipe whose hub tokenizer is not cached, offline",
             ["precompile", "trn1/bmojo-130m", f"data.path={work / 'story.txt'}", "--cache-dir",
              str(work / "neff-cache")], "story"),
        Case("a launch plan with port 99999", ["plan", "trn1/bmojo-130m", "--master-port", "99999"]),
        Case("an option that does not exist", [*train, "--bogus"]),
        Case("kernels profile with an option that does not exist", ["kernels", "profile", "--bogus"]),
        Case("a Neuron recipe without the Neuron SDK", ["train", "trn1/bmojo-130m", "--output-dir", out]),
    ]


def cli(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1"}  # as on a cluster node without a route out: nothing may wait on the hub
    return subprocess.run([sys.executable, "-m", "bmojo_neuron.cli", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def prepare(step: str, work: Path) -> None:
    if step == "latin1":
        (work / "latin1.txt").write_bytes("caf\u00e9 au lait\n".encode("latin-1") * 50)
    elif step == "corpus":
        (work / "corpus" / "notes").mkdir(parents=True, exist_ok=True)
        (work / "corpus" / "story.txt").write_text("Once upon a time.\n" * 50)
        (work / "corpus" / "notes" / "scan.md").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    elif step == "jsonl":
        (work / "docs.jsonl").write_text('{"text": "one"}\n{"text": "two", }\n')
    elif step == "read_only":
        (work / "ro").mkdir(exist_ok=True)
        os.chmod(work / "ro", 0o555)
    elif step == "used" and not (work / "out" / "final").exists():
        cli(["train", "--no-progress", "--output-dir", str(work / "out"), *TINY], work)
    elif step == "empty":
        (work / "empty.yaml").write_text("# nothing saved yet\n")
    elif step == "suite" and not (work / "suite").exists():
        prepare("used", work)
        for name in ("bmojo", "mamba"):  # as `train` lays out a suite: <output dir>/<name>
            shutil.copytree(work / "out", work / "suite" / name)
    elif step == "file":
        (work / "a-file").write_text("not a directory\n")
    elif step == "llama" and not (work / "llama").exists():
        save_tiny_llama(work / "llama")
    elif step == "llama_edited" and not (work / "llama-edited").exists():
        save_tiny_llama(work / "llama-edited")
        config = work / "llama-edited" / "config.json"
        config.write_text(config.read_text().replace('"vocab_size": 128', '"vocab_size": 200'))
    elif step == "llama_layers" and not (work / "llama-layers").exists():
        save_tiny_llama(work / "llama-layers")
        config = work / "llama-layers" / "config.json"
        config.write_text(config.read_text().replace('"num_hidden_layers": 2', '"num_hidden_layers": 3'))
    elif step == "tokenizer_300":
        prepare("used", work)
        save_word_tokenizer(work / "tokenizer-300", 300)
    elif step == "tokenizer_no_eos":
        save_word_tokenizer(work / "tokenizer-no-eos", 40)
        (work / "tokenizer-no-eos" / "tokenizer_config.json").write_text('{"tokenizer_class": "TokenizersBackend"}')
    elif step == "tokenizer_list":
        (work / "tokenizer-list").mkdir(exist_ok=True)
        (work / "tokenizer-list" / "tokenizer.json").write_text("[]")
    elif step == "primed_words" and not (work / "primed-words").exists():
        save_tiny_llama(work / "llama-words", vocab_size=300)  # a source with a tokenizer of its own, as on the hub
        save_word_tokenizer(work / "llama-words", 300)
        (work / "llama-words" / "tokenizer_config.json").write_text(
            '{"tokenizer_class": "TokenizersBackend", "eos_token": "w0"}')
        primed = cli(["prime", str(work / "llama-words"), str(work / "primed-words"), "--pattern", "A"], work)
        if primed.returncode != 0:  # its cases would be refused for a missing folder instead, and counted as handled
            raise RuntimeError(f"prime of the set-up's Llama failed:\n{primed.stderr}")
    elif step == "story":
        (work / "story.txt").write_text("Once upon a time.\n" * 50)
    elif step == "damaged" and not (work / "damaged" / "final").exists():
        cli(["train", "--no-progress", "--output-dir", str(work / "damaged"), *TINY], work)
        weights = work / "damaged" / "final" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:200])


def save_tiny_llama(path: Path, vocab_size: int = 128) -> None:
    """A 2-layer Llama with random weights, as a user's source checkpoint."""
    code = ("import sys, torch, transformers as t; torch.manual_seed(0); "
            "c = t.LlamaConfig(vocab_size=int(sys.argv[2]), hidden_size=64, intermediate_size=128, "
            "num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2); "
            "t.LlamaForCausalLM(c).save_pretrained(sys.argv[1])")
    subprocess.run([sys.executable, "-c", code, str(path), str(vocab_size)], check=True, capture_output=True,
                   timeout=300)


def save_word_tokenizer(folder: Path, ids: int) -> None:
    """A tokenizer.json of one id per word (w0, w1, ...): a tokenizer other than bytes, written without a hub."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {f"w{i}": i for i in range(ids)}
    (folder / "tokenizer.json").write_text(
        json.dumps({"model": {"type": "WordLevel", "unk_token": "w0", "vocab": vocab}, "added_tokens": []}))


def handled(done: subprocess.CompletedProcess) -> bool:
    lines = [line for line in done.stderr.splitlines()
             if line.strip() and not line.startswith(("warning:", "usage:", " "))]
    first = lines[0] if lines else ""
    return (done.returncode == 2 and "Traceback" not in done.stderr
            and (first.startswith("error:") or re.match(r"bmojo-neuron( [a-z-]+)*: error:", first) is not None))


def main(argv: list[str] | None = None) -> int:
    # Only --help: a run takes minutes and rewrites docs/reliability.md, so `--help` must not start one.
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    rows = []
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for case in cases(work):
            if case.prepare:
                prepare(case.prepare, work)
            started, cpu_before = time.perf_counter(), children_cpu()
            done = cli(case.argv, work)
            seconds, cpu = time.perf_counter() - started, children_cpu() - cpu_before
            last = next((line for line in done.stderr.splitlines() if "error:" in line), "")
            rows.append((case, handled(done), done.returncode, seconds, cpu, last))
            print(f"{'ok ' if rows[-1][1] else 'BAD'} {case.what}: exit {done.returncode}, {seconds:.1f} s "
                  f"({cpu:.1f} s CPU): {last}", flush=True)
        os.chmod(work / "ro", 0o755) if (work / "ro").exists() else None
    write_doc(rows, load, os.cpu_count() or 1)
    return 0 if all(ok for _, ok, *_ in rows) else 1


def children_cpu() -> float:
    """CPU seconds (user + system) of the finished child processes so far: a command's own work, which other
    processes on a busy machine do not inflate as they do its wall-clock time."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def write_doc(rows: list, load: float, cores: int) -> None:
    handled_count = sum(ok for _, ok, *_ in rows)
    lines = [
        "# Reliability",
        "",
        "What a run survives and how bad input is reported. Regenerate the table with",
        "`python infra/reliability_report.py` (it rewrites this file).",
        "",
        "## Kills",
        "",
        "- `tests/test_kill_during_save.py`: 30 SIGKILLs at random moments of back-to-back",
        "  checkpoint saves (one run: 361 saves finished, 10 kills between a publish and its",
        "  report): no finished save lost, every complete-looking checkpoint has its manifest,",
        "  loads and matches it; and a save stopped after each of its steps in turn (manifest,",
        "  publish, `latest`, prune) leaves every published checkpoint with a manifest that",
        "  verifies (docs/training.md, Checkpoints and resume).",
        "- `tests/test_signals.py`: SIGTERM and SIGINT during training finish the step, write a",
        "  checkpoint and exit 143 / 130; the resumed run equals the uninterrupted one bitwise;",
        "  a second signal exits at once and leaves no partial checkpoint. After the last step",
        "  (checkpointed) a signal skips what is left of the finish (the length evaluation between",
        "  two lengths, the export) and exits 143 / 130; `--resume` does them. Once the export",
        "  starts, or after every run finished, a signal ends nothing: the run completes, status 0,",
        "  and a line says so. A stopped suite prints one line per run (stopped at step N with its",
        "  checkpoint, finished, not started); `tests/test_cli_train.py`.",
        "- `tests/test_checkpoint_manifest.py`: a truncated, garbled or deleted file in the newest",
        "  checkpoint is named in one line and `--resume` falls back to the intact step before it;",
        "  `checkpoint consolidate` / `shard` of a damaged source, and `eval` of weights without a",
        "  manifest that safetensors cannot read, end in one `error:` line naming the file.",
        "- `tests/test_locking.py`: two runs on one directory, and a resume of a live run, are refused;",
        "  `tests/test_cli_train.py`: a run that fails before writing its directory leaves no folder",
        "  (nor `.lock`) behind, and a folder that was there before stays.",
        "- `tests/test_cli.py`: a reader that closes stdout early (`bmojo-neuron cache ls --json | head -1`)",
        "  ends any command, `--help` and `--version` included, quietly with exit status 141 (128 + SIGPIPE,",
        "  what a shell reports for tools that SIGPIPE ends), no traceback.",
        "",
        "## Bad input",
        "",
        f"{handled_count} of {len(rows)} handled: exit status 2 and an `error:` line, no traceback, before any",
        "training starts. (A read-only output directory is caught by the same preflight check, tested in",
        "`tests/test_preflight.py`; it is not tried here when the script runs as root, who can write anyway.)",
        "",
        f"Seconds: the wall-clock time of each command as this table was made (load average {load:.1f} on "
        f"{cores} cores",
        "at the start), and its CPU time (user + system), which other work on the machine does not inflate: on an",
        "idle machine the wait is about the CPU time. A second or less of CPU is a refusal before torch loads.",
        "",
        "| input | handled | exit | seconds | CPU seconds | the error line |",
        "|---|---|---|---|---|---|",
    ]
    for case, ok, code, seconds, cpu, last in rows:
        shown = shortened(last).replace("|", "\\|")
        lines.append(f"| {case.what} | {'yes' if ok else 'NO'} | {code} | {seconds:.1f} | {cpu:.1f} | {shown} |")
    DOC.write_text("\n".join(lines) + "\n")


def shortened(line: str, width: int = 160) -> str:
    """`line` in at most `width` characters, cut in its middle: a refusal's start says what is wrong and its end
    what to do (the key to set, the override to add), so a row keeps both."""
    if len(line) <= width:
        return line
    head = (width - len(" ... ")) // 2
    tail = width - len(" ... ") - head
    return f"{line[:head].rstrip()} ... {line[len(line) - tail:].lstrip()}"


if __name__ == "__main__":
    sys.exit(exit_status_on_closed_stdout(main))
