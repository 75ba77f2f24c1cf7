"""`bmojo-neuron` command line.

Subcommands live in a registry. To add one, write a module in the
`bmojo_neuron.commands` package (e.g. ``bmojo_neuron/commands/train.py``); every
module there is imported when the parser is built, so registering is enough:

    import argparse
    from bmojo_neuron.cli import register_command

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--recipe", default="tiny")

    @register_command("train", help="train a model", add_arguments=add_arguments)
    def run(args: argparse.Namespace) -> int | None:
        ...  # return an exit code, or None for 0

Give a ``nargs="*"`` positional (``key=value`` overrides) ``default=[]``: without a default argparse counts it
as required, and a command called without its other arguments names it among the missing ones.

Import heavy things (torch, datasets, Neuron) inside `run`, not at module top, so
`bmojo-neuron --help` stays fast. Modules whose name starts with ``_`` are skipped;
a module that fails to import is reported as a warning on stderr and its commands
are missing, the others still work. `add_command(name, help, add_arguments, run)`
is the non-decorator form. Expected failures raised by `run` (`ValueError`,
`FileNotFoundError`, `NeuronUnavailableError`, `FloatingPointError`, a full disk
however it is wrapped, and OSErrors of permissions and paths) are printed as one
``error: ...`` line with exit status 2 (under torchrun by rank 0 only: `print_error`); anything else is a
bug and shows a traceback.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import os
import pkgutil
import platform
import sys
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Callable

from bmojo_neuron._version import __version__
from bmojo_neuron.closed_stdout import exit_status_on_closed_stdout
from bmojo_neuron.fsutil import disk_full_cause
from bmojo_neuron.neuron import NeuronUnavailableError, neuron_status

COMMANDS_PACKAGE = "bmojo_neuron.commands"
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    NeuronUnavailableError,
    FloatingPointError,  # a run that diverged (the message says what to change)
)
# OSErrors the user fixes on their side (space, permissions, paths), shown as one line wherever they arise.
USER_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR,
                         errno.EISDIR, errno.ENAMETOOLONG, errno.EEXIST, errno.ENOENT})

AddArguments = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], "int | None"]


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: AddArguments | None
    run: Run


COMMANDS: dict[str, Command] = {}


def add_command(name: str, help: str, add_arguments: AddArguments | None, run: Run) -> Command:
    """Register subcommand `name`; `run(args)` returns an exit code or None (0)."""
    if name in COMMANDS and COMMANDS[name].run is not run:
        raise ValueError(f"subcommand {name!r} is already registered")
    COMMANDS[name] = command = Command(name, help, add_arguments, run)
    return command


def register_command(name: str, help: str, add_arguments: AddArguments | None = None) -> Callable[[Run], Run]:
    """Decorator form of `add_command`; returns the function unchanged."""

    def decorator(run: Run) -> Run:
        add_command(name, help, add_arguments, run)
        return run

    return decorator


def _load_command_modules() -> None:
    """Import every module of `bmojo_neuron.commands` so their commands register."""
    try:
        package = importlib.import_module(COMMANDS_PACKAGE)
    except ModuleNotFoundError as exc:
        if exc.name in (COMMANDS_PACKAGE, "bmojo_neuron"):
            return
        raise
    for module in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if module.name.startswith("_"):
            continue
        name = f"{COMMANDS_PACKAGE}.{module.name}"
        try:
            importlib.import_module(name)
        except Exception as exc:  # keep the other commands (and `info`) usable
            print(f"warning: could not load {name}: {type(exc).__name__}: {exc}", file=sys.stderr)


class _Parser(argparse.ArgumentParser):
    """argparse's parser, except that `--help` / `--version` into a closed stdout end like any other output to it.

    argparse swallows an OSError from writing its help, so ``bmojo-neuron --help | head -1`` would exit 0 where
    every other command exits 141 (`closed_stdout`); the BrokenPipeError is let through for `main` to handle.
    Subcommand parsers are of this class too (argparse makes them of the parent's class).
    """

    def error(self, message: str) -> Any:
        """argparse's error, naming the choices of a missing action (``bmojo-neuron data`` alone: ``prepare``),
        which a metavar such as ACTION hides."""
        return super().error(message + self._choices_of_missing(message))

    def _choices_of_missing(self, message: str) -> str:
        prefix = "the following arguments are required: "
        if not message.startswith(prefix):
            return ""
        missing = message[len(prefix):].split(", ")
        for action in self._actions:
            name = action.metavar or action.dest
            choices = list(action.choices or ())
            if not action.option_strings and choices and name in missing and not all(c in name for c in choices):
                return f" (choose from {', '.join(repr(c) for c in choices)})"
        return ""

    def _print_message(self, message: str, file: Any = None) -> None:
        if message and file is sys.stdout:
            file.write(message)
            return
        super()._print_message(message, file)


# The parser of each set of registered commands: `main` called many times in one process (a test running
# commands in turn) would otherwise build twenty-odd subparsers, about 10 ms, at every call. Parsing leaves a
# parser as it was (`parse_args` copies what it extends), so one serves every call.
_PARSERS: dict[tuple[str, frozenset[Command]], argparse.ArgumentParser] = {}


def build_parser() -> argparse.ArgumentParser:
    """The `bmojo-neuron` parser of every registered command (the modules of `COMMANDS_PACKAGE` imported first);
    built once per set of commands."""
    _load_command_modules()
    key = (COMMANDS_PACKAGE, frozenset(COMMANDS.values()))
    if key not in _PARSERS:
        _PARSERS[key] = _new_parser()
    return _PARSERS[key]


def _new_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="bmojo-neuron",
        description="Train and run B'MOJO language models on CPU, CUDA and AWS Trainium.",
    )
    parser.add_argument("--version", action="version", version=f"bmojo-neuron {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in sorted(COMMANDS.values(), key=lambda c: c.name):
        sub = subparsers.add_parser(command.name, help=command.help, description=command.help)
        if command.add_arguments is not None:
            command.add_arguments(sub)
        sub.set_defaults(_run=command.run)
    _remember_parsers(parser)
    return parser


def _remember_parsers(parser: argparse.ArgumentParser) -> None:
    """Let every (sub-)subcommand parser record itself as ``args._parser``, the innermost one winning, so that
    `parse_args` reports a stray argument with the usage of the command it was given to."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                sub.set_defaults(_parser=sub)
                _remember_parsers(sub)


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """`parse_args`, except that ``key=value`` overrides may also follow the options, and a ``~`` that the
    shell left in ``--output-dir`` is the home folder, for every command.

    argparse stops filling a ``nargs="*"`` positional at the first option, so
    ``train RECIPE --dry-run run.seed=1`` would otherwise reject ``run.seed=1``.
    """
    args, extra = parser.parse_known_args(argv)
    strays = [a for a in extra if a.startswith("-") or "=" not in a]
    if extra and not strays and isinstance(getattr(args, "overrides", None), list):
        args.overrides = [*args.overrides, *extra]  # a new list: without overrides it is the parser's default
    elif extra:
        hint = override_hint(extra) if isinstance(getattr(args, "overrides", None), list) else ""
        getattr(args, "_parser", parser).error(f"unrecognized arguments: {' '.join(extra)}{hint}")
    if isinstance(getattr(args, "output_dir", None), str):
        # A shell expands ``~`` only at the start of a word: ``--output-dir=~/runs`` arrives as typed.
        args.output_dir = os.path.expanduser(args.output_dir)
    return args


def override_hint(extra: list[str]) -> str:
    """For a command that takes recipe overrides, what an option it does not know (``--steps 5``) may have meant:
    the recipe key of that name as ``key=value`` (`` (recipe keys are set as key=value: train.steps=5)``), or ""
    when no key is named so."""
    from bmojo_neuron.recipes import keys_named

    option = next((a for a in extra if a.startswith("--")), None)
    if option is None:
        return ""
    name, _, value = option[2:].partition("=")
    after = extra[extra.index(option) + 1:]
    value = value or (after[0] if after and not after[0].startswith("-") else "VALUE")
    matches = keys_named(name.replace("-", "_"))
    if not matches:
        return ""
    return f" (recipe keys are set as key=value: {' or '.join(f'{key}={value}' for key in matches)})"


def user_error(exc: BaseException) -> str | None:
    """The one-line message of an error the user can act on, or None for a bug (shown as a traceback)."""
    worker_error = getattr(exc, "error", None)  # `run_pool.RunFailed`: a suite's run failed in its own process
    if isinstance(worker_error, BaseException) and getattr(exc, "run_name", None):
        message = user_error(worker_error)
        return f"{exc.run_name}: {message}" if message is not None else None
    if isinstance(exc, EXPECTED_ERRORS):
        return str(exc) or type(exc).__name__
    full = disk_full_cause(exc)
    if full is not None:
        where = f" writing {full.filename}" if full.filename else ""
        return (f"disk full: {full.strerror}{where}; free some space and rerun (an interrupted train continues "
                "from its last checkpoint with --resume)")
    if isinstance(exc, OSError) and exc.errno in USER_ERRNOS:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else str(exc)
    return None


def print_error(message: str) -> None:
    """Print ``error: <message>`` on stderr, once per job under torchrun.

    Every rank runs the command, and most errors (a bad recipe, a missing data path) are the same on all
    of them: only rank 0 prints the line. A rank's error is still never lost, since it may be its own (a
    file missing on one node): every rank hands the line to torchrun through the error file torchrun gives
    each worker, which torchrun's failure summary shows per failed rank, and a rank that cannot (another
    launcher set RANK) prints it prefixed with its rank. Every rank still exits non-zero.
    """
    line = f"error: {message}"
    rank, world = launch_rank()
    handed_over = record_for_torchrun(line)
    if rank == 0 or world <= 1:
        print(line, file=sys.stderr)
    elif not handed_over:
        print(f"error: rank {rank}: {message}", file=sys.stderr)


def launch_rank() -> tuple[int, int]:
    """``(rank, world size)`` from torchrun's variables; ``(0, 1)`` without them or when they are not numbers.
    (`parallel.layout.torchrun_env` reads the same, but its module imports torch, which the CLI defers.)"""
    try:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError:
        return 0, 1


def record_for_torchrun(line: str) -> bool:
    """Write `line` into this worker's torchrun error file (``TORCHELASTIC_ERROR_FILE``); whether it was written.

    torchrun shows it, for each rank that exits non-zero, in the failure summary it prints instead of its
    placeholder: the error of `print_error`, or why a run stopped (`train` after a signal).

    The format is the one torch's `ErrorHandler.record_exception` writes and its agent reads (torch 2.13,
    `torch/distributed/elastic/multiprocessing/`: `api.py:390` sets the variable per worker,
    `errors/error_handler.py:69` writes the file, `errors/__init__.py:118-158` (``ProcessFailure``) reads the
    timestamp from ``message.extraInfo``, and `:278-295` shows ``py_callstack`` when present, else
    ``message``). It leaves out the call stack: the line is the whole story of an expected ending.
    """
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return False
    data = {"message": {"message": line, "extraInfo": {"timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f)
    except OSError:
        return False
    return True


def require_nonempty(option: str, value: str | None) -> None:
    """ValueError for an option given as an empty string, which would otherwise quietly mean its default."""
    if value is not None and not value.strip():
        raise ValueError(f"{option} must not be empty")


def say_on_terminal(line: str) -> None:
    """`line` on stderr when stderr is a terminal: what a command does during a wait it has no result for yet
    (seconds importing torch and building the model, more on a busy machine), for the person watching. Output
    that a script or log captures is left as it was: a refusal that comes after the wait is its `error:` line
    alone, and stdout stays the result (``--json`` parseable). Under torchrun every rank shares the terminal:
    rank 0 alone says it, as it alone prints the run's lines."""
    if sys.stderr.isatty() and launch_rank()[0] == 0:
        print(line, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run one command; its exit status. A reader that closes our stdout early (``cmd | head -1``) ends the
    command quietly with status 141, as a shell reports a tool that SIGPIPE ended (`closed_stdout`)."""
    return exit_status_on_closed_stdout(lambda: _run_command(argv))


def _run_command(argv: list[str] | None) -> int:
    args = parse_args(build_parser(), argv)
    try:
        code = args._run(args)
    except BrokenPipeError:
        raise
    except Exception as exc:
        message = user_error(exc)
        if message is None:
            raise
        print_error(message)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0 if code is None else int(code)


# --------------------------------------------------------------------------- info


def _dist_version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _torch_info() -> dict[str, Any]:
    try:
        import torch
    except Exception as exc:
        return {"version": None, "cuda_available": False, "cuda_version": None,
                "error": f"{type(exc).__name__}: {exc}"}
    try:
        cuda = bool(torch.cuda.is_available())
    except Exception:
        cuda = False
    return {"version": torch.__version__, "cuda_available": cuda, "cuda_version": torch.version.cuda}


def _op_backends() -> dict[str, Any]:
    """`bmojo_neuron.ops.available_backends()`, or status "unknown" if it cannot be called."""
    try:
        from bmojo_neuron.ops import auto, available_backends

        backends = available_backends()
        return {
            "status": "ok",
            "reason": None,
            "selected": auto.describe(),  # on this machine's CPU, float32: builds the C kernels if needed
            "backends": {
                name: {"available": bool(ok), "reason": str(reason or "")}
                for name, (ok, reason) in backends.items()
            },
        }
    except Exception as exc:
        return {"status": "unknown", "reason": f"{type(exc).__name__}: {exc}", "backends": {}}


def collect_info() -> dict[str, Any]:
    """Everything `bmojo-neuron info` reports, as JSON-serialisable data."""
    return {
        "bmojo_neuron": {"version": __version__},
        "python": {"version": platform.python_version(), "executable": sys.executable,
                   "platform": platform.platform()},
        "torch": _torch_info(),
        "transformers": {"version": _dist_version("transformers")},
        "datasets": {"version": _dist_version("datasets")},
        "op_backends": _op_backends(),
        "neuron": neuron_status(),
    }


def _format_info(info: dict[str, Any]) -> str:
    def ver(v: str | None) -> str:
        return v if v else "not installed"

    torch = info["torch"]
    cuda = "yes" if torch["cuda_available"] else "no"
    if torch["cuda_available"] and torch["cuda_version"]:
        cuda += f", CUDA {torch['cuda_version']}"
    lines = [
        f"bmojo-neuron  {info['bmojo_neuron']['version']}",
        f"python        {info['python']['version']} ({info['python']['executable']})",
        f"torch         {ver(torch['version'])} (CUDA available: {cuda})",
        f"transformers  {ver(info['transformers']['version'])}",
        f"datasets      {ver(info['datasets']['version'])}",
        "",
        "op backends:",
    ]
    ops = info["op_backends"]
    if ops["status"] != "ok":
        lines.append(f"  unknown ({ops['reason']})")
    for name, b in ops["backends"].items():
        state = "available" if b["available"] else "unavailable"
        lines.append(f"  {name:<20} {state}" + (f": {b['reason']}" if b["reason"] else ""))
    if ops.get("selected"):
        lines.append(f"  selected (CPU)       {ops['selected']}")
    lines += ["", "neuron packages:"]
    for name, s in info["neuron"].items():
        detail = s["version"] if s["importable"] else f"unavailable: {s['reason']}"
        lines.append(f"  {name:<20} {detail}")
    return "\n".join(lines)


def _info_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


@register_command("info", help="show versions, op backends and Neuron package status",
                  add_arguments=_info_arguments)
def _info(args: argparse.Namespace) -> int:
    info = collect_info()
    print(json.dumps(info, indent=2) if args.json else _format_info(info))
    return 0


if __name__ == "__main__":
    # Run the imported module, not this `__main__` copy, so commands registered via
    # `from bmojo_neuron.cli import register_command` land in the registry used.
    from bmojo_neuron.cli import main as _main

    sys.exit(_main())
