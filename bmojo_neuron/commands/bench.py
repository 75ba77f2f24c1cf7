"""`bmojo-neuron bench SUITE`: measured speed and memory against the models users would pick instead.

Suites: ``train-step``, ``scaling``, ``decode``, ``kernels`` (see ``docs/benchmarks.md``).
Each writes a JSON report (``--json``) and a PNG plot (``--plot``); timings are
medians of alternating repeats, and speed-ups are ratios measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from bmojo_neuron.cli import register_command, require_nonempty, say_on_terminal
from bmojo_neuron.fsutil import unwritable_reason

SUITES = ("train-step", "scaling", "decode", "kernels")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(_expand_k(v)) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 1024,4096 or 1K,4K, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one length")
    return values


def _expand_k(value: str) -> int:
    value = value.strip()
    if value[-1:] in ("k", "K"):
        return int(value[:-1]) * 1024
    return int(value)


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("suite", choices=SUITES, help="which benchmark to run")
    parser.add_argument("--json", dest="json_path", metavar="PATH", default=None,
                        help="write the report here (default: bench-SUITE.json)")
    parser.add_argument("--plot", dest="plot_path", metavar="PATH", default=None,
                        help="write the PNG plot here (default: the --json path with .png)")
    parser.add_argument("--lengths", type=_int_list, default=None,
                        help="sequence / context lengths, e.g. 1K,4K (default: per suite)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats; the median is reported")
    parser.add_argument("--warmup", type=int, default=None, help="untimed warm-up rounds")
    parser.add_argument("--cap-seconds", type=float, default=None,
                        help="time cap for one unit of work of a candidate; over it the candidate is reported "
                             "'capped' (default: per suite)")
    parser.add_argument("--budget-seconds", type=float, default=None,
                        help="time budget of the whole suite (default 540); candidates not yet probed when it "
                             "is spent are reported 'skipped', timed ones stop repeating")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: per suite)")
    parser.add_argument("--candidates", type=_names, default=None,
                        help="comma-separated candidates (default: per suite): bmojo, bmojo-f, mamba-only, "
                             "swa-only, full-attn, hf-mamba, hf-mamba2, hf-mistral-swa, hf-mistral; train-step also "
                             "bmojo-compiled, hf-mistral-swa-compiled (torch.compile; the first step, which "
                             "compiles, is set-up and reported as compile_s)")
    parser.add_argument("--d-model", type=int, default=None, help="hidden size (default 256; toy 64)")
    parser.add_argument("--layers", type=int, default=None, help="layers (default 4; toy 2; scaling uses 1)")
    parser.add_argument("--window", type=int, default=None, help="attention window w = w_f (default 512; toy 32)")
    parser.add_argument("--vocab-size", type=int, default=None, help="vocabulary (default 512; toy 128)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: every usable core but one, at least one; "
                             "OMP_NUM_THREADS wins when set)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda (cuda:N) or auto")
    parser.add_argument("--seed", type=int, default=0, help="seed of the models' weights and inputs (default 0)")
    parser.add_argument("--no-probe", action="store_true",
                        help="probe in this process instead of a separate one: the cap is checked only after "
                             "the fact and CPU memory is not measured")
    parser.add_argument("--busy", action="store_true",
                        help="run a fixed background load (one single-threaded busy loop pinned to one core) while "
                             "timing; B'MOJO is also timed with the load paused, and busy / quiet becomes a target")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="time the timed runs by wall clock (default) or by this process's CPU time; cpu needs "
                             "--threads 1 and the CPU, and does not count waiting for a core on a shared machine")
    parser.add_argument("--check", action="store_true",
                        help="exit with status 1 when any target is missed (a capped or failed B'MOJO misses its "
                             "targets)")
    parser.add_argument("--toy", action="store_true", help="tiny sizes (tests, CI): checks the plumbing, not speed")
    parser.add_argument("--quiet", action="store_true", help="print only the summary line")


def _check_clock(args: argparse.Namespace, device: str, threads: int) -> None:
    """`--clock cpu` is one thread's CPU time: refuse where that is not the time of a step."""
    if args.clock != "cpu":
        return
    if device != "cpu":
        raise ValueError(f"--clock cpu: times CPU work, not {device}; use --clock wall")
    if threads != 1:
        raise ValueError(f"--clock cpu: needs --threads 1 (torch uses {threads}; CPU time would add up the threads)")
    if args.busy:
        raise ValueError("--clock cpu with --busy: busy / quiet is a wall-clock slowdown; use --clock wall")


# Options that only the timed suites read: `kernels` models kernels from the recipes' shapes, so any of these
# given to it would be ignored; it refuses them instead (dest -> option).
TIMED_ONLY = {"lengths": "--lengths", "repeats": "--repeats", "warmup": "--warmup", "cap_seconds": "--cap-seconds",
              "batch": "--batch", "candidates": "--candidates", "d_model": "--d-model", "layers": "--layers",
              "window": "--window", "vocab_size": "--vocab-size", "threads": "--threads", "device": "--device",
              "seed": "--seed", "no_probe": "--no-probe", "busy": "--busy", "clock": "--clock"}


def _check_options_apply(args: argparse.Namespace) -> None:
    """ValueError naming the options given to `kernels` that it would ignore."""
    if args.suite != "kernels":
        return
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    defaults = vars(parser.parse_args([args.suite]))
    given = [option for dest, option in TIMED_ONLY.items() if getattr(args, dest) != defaults[dest]]
    if given:
        raise ValueError(f"bench kernels: {', '.join(given)} do{'es' if len(given) == 1 else ''} not apply "
                         "(the kernels are modelled at the recipes' shapes); leave "
                         f"{'it' if len(given) == 1 else 'them'} out")


def _check_busy() -> None:
    """`--busy` pins its load on a core of its own; with one usable core that is the benchmark's core, and the
    suite would time two processes sharing it instead of a neighbour's load."""
    from bmojo_neuron.device import usable_cores

    cores = usable_cores()
    if cores < 2:
        raise ValueError(f"--busy needs a second core for its load, but this process may use only {cores} "
                         "(CPU affinity); run without --busy or allow more cores")


def _check_output_file(option: str, path: str) -> None:
    """`path` can be written as a file: not a folder, and its folder exists and is writable or can be created.

    Checked before the suite runs, so a bad path does not cost the measurements. Leaves nothing behind.
    """
    target = os.path.abspath(path)
    if os.path.isdir(target):
        raise ValueError(f"{option} {path}: is a folder; give a file path")
    if os.path.exists(target) and not os.access(target, os.W_OK):
        raise ValueError(f"{option} {path}: the file exists and is not writable")
    folder = Path(target).parent
    problem = unwritable_reason(folder)
    if problem:
        raise ValueError(f"{option} {path}: {problem}")
    if folder.is_dir():
        _check_file_can_be_created(option, path, folder)


def _check_file_can_be_created(option: str, path: str, folder: Path) -> None:
    """Create and remove a file in `folder`. Permission bits do not tell everything: root passes every
    `os.access` check, yet cannot create files in /proc or /sys, nor, squashed, on an NFS share."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise ValueError(f"{option} {path}: cannot create a file in {folder} ({exc.strerror or exc})") from exc


def output_paths(args: argparse.Namespace) -> tuple[str, str]:
    """The report's and the plot's paths, checked. The plot is always PNG: a `--plot` not ending in ``.png``
    gets the suffix (as matplotlib would add it), so the path printed and recorded is the one written."""
    json_path = args.json_path or f"bench-{args.suite}.json"
    plot_path = args.plot_path or os.path.splitext(json_path)[0] + ".png"
    if not plot_path.lower().endswith(".png"):
        plot_path += ".png"
    _check_output_file("--json", json_path)
    _check_output_file("--plot", plot_path)
    if os.path.realpath(json_path) == os.path.realpath(plot_path):
        raise ValueError(f"--json {json_path} is also the plot's path, so the plot would overwrite the report; "
                         "give --json a .json name or --plot another path")
    return json_path, plot_path


# The targets are set at the benchmark's sizes; at --toy sizes dispatch dominates and the verdicts are
# computed only so that the report, the plot and --check are exercised.
TOY_VERDICTS = "--toy: tiny sizes check the plumbing; these verdicts say nothing about speed at the real sizes"


def target_line(target: dict) -> str:
    """One printed line per target; one without a value says missed (or met) and why, not "None"."""
    state = "met" if target["met"] else "MISSED"
    value = f"{target['value']} ({state})" if target["value"] is not None else state.lower()
    note = target.get("note") or ""
    if target["value"] is None and note.startswith("missed: "):
        note = note[len("missed: "):]  # the state already says missed
    note = f" -- {note}" if note else ""
    return f"  target {target['name']} {target['comparison']} {target['threshold']}: {value}{note}"


@register_command("bench", help="benchmark speed and memory against Hugging Face baselines (JSON + PNG)",
                  add_arguments=add_arguments)
def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model is built locally; never reach the network
    require_nonempty("--json", args.json_path)
    require_nonempty("--plot", args.plot_path)
    _check_options_apply(args)
    json_path, plot_path = output_paths(args)
    say_on_terminal(f"bench {args.suite}{' --toy' if args.toy else ''}: loading torch and the candidates' "
                    "libraries (transformers), then building the candidates")
    import torch

    from bmojo_neuron.bench import harness
    from bmojo_neuron.bench.library_notes import notes_line
    from bmojo_neuron.bench.plot import plot_report
    from bmojo_neuron.bench.suites import Settings, run_suite
    from bmojo_neuron.device import resolve_device, set_cpu_threads
    from bmojo_neuron.host_allocator import keep_freed_memory

    device = str(resolve_device(args.device, "--device", neuron=False))
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.busy:
        _check_busy()
    set_cpu_threads(args.threads)
    if not device.startswith("cuda"):
        keep_freed_memory()  # time what `train` runs (`host_allocator`); the memory probe sets its own
    _check_clock(args, device, torch.get_num_threads())
    settings = Settings(suite=args.suite, lengths=args.lengths, repeats=args.repeats, warmup=args.warmup,
                        cap_seconds=args.cap_seconds, budget_seconds=args.budget_seconds, batch=args.batch,
                        candidates=args.candidates, toy=args.toy,
                        d_model=args.d_model, layers=args.layers, window=args.window, vocab_size=args.vocab_size,
                        device=device, seed=args.seed, probe=not args.no_probe, busy=args.busy,
                        clock=args.clock)
    log = (lambda message: None) if args.quiet else (lambda message: print(message, flush=True))
    report = run_suite(settings, log=log)
    report["plot"] = os.path.abspath(plot_path)
    harness.write_json(json_path, report)  # the report first: it holds the measurements
    plot_report(report, plot_path)
    counts: dict[str, int] = {}
    for row in report["results"]:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or report.get("message") or "no results"
    print(f"bench {args.suite}: {summary}; {report['elapsed_s']} s; wrote {json_path} and {plot_path}")
    if (notes := notes_line(report.get("library_notes", []))) is not None:
        print(notes)
    if args.toy and report["targets"]:
        print(f"  {TOY_VERDICTS}")
    for target in report["targets"]:
        print(target_line(target))
    for ratio in report.get("ratios", []):
        note = f" -- {ratio['note']}" if ratio.get("note") else ""
        print(f"  ratio {ratio['name']}: {ratio['value']}{note}")
    missed = [t for t in report["targets"] if not t["met"]]
    if args.check and missed:
        print(f"bench {args.suite} --check: {len(missed)} of {len(report['targets'])} targets missed")
        return 1
    return 0
