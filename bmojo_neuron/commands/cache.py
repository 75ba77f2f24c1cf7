"""`bmojo-neuron cache ls|verify|prune|push|pull`: inspect, clean and share the Neuron compile cache.

See docs/compile-cache.md. The cache is ``--cache-dir``, else ``--cache_dir`` in
NEURON_CC_FLAGS, else NEURON_COMPILE_CACHE_URL, else /var/tmp/neuron-compile-cache.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from typing import Any

from bmojo_neuron.cli import register_command

CACHE_DIR_DEFAULT = ("default: --cache_dir in NEURON_CC_FLAGS, else NEURON_COMPILE_CACHE_URL, else "
                     "/var/tmp/neuron-compile-cache")
CACHE_DIR_HELP = {  # ls and verify also read a published cache; prune, push and pull work on a local one
    "any": f"compile cache folder, or s3://bucket/prefix for ls/verify ({CACHE_DIR_DEFAULT})",
    "remote": f"compile cache folder, or a published s3://bucket/prefix ({CACHE_DIR_DEFAULT})",
    "local": f"local compile cache folder ({CACHE_DIR_DEFAULT})",
}


def _cache_dir_option(parser: argparse.ArgumentParser, reads: str) -> None:
    # SUPPRESS: a value given before or after the action survives (a sub-parser default would erase it)
    parser.add_argument("--cache-dir", default=argparse.SUPPRESS, help=CACHE_DIR_HELP[reads])


def _action(actions: Any, name: str, summary: str) -> argparse.ArgumentParser:
    """A sub-parser whose --help starts with `summary`, the line `cache --help` lists it with."""
    return actions.add_parser(name, help=summary, description=summary)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _cache_dir_option(parser, "any")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = _action(actions, "ls", "one line per cache entry: compiler, module, size, age, status")
    ls.add_argument("--json", action="store_true", help="print the entries and totals as JSON")
    verify = _action(actions, "verify", "list failed and incomplete entries; exit status 1 when any")
    verify.add_argument("--json", action="store_true", help="print the report as JSON")
    prune = _action(actions, "prune", "delete entries by age, total size or failure (never one in use)")
    prune.add_argument("--older-than", type=float, metavar="DAYS", help="entries not written for DAYS days")
    prune.add_argument("--max-size", metavar="SIZE",
                       help="then the oldest entries until the cache fits in SIZE (e.g. 50G; binary units)")
    prune.add_argument("--failed", action="store_true", help="failed compiles (so they are compiled again)")
    prune.add_argument("--dry-run", action="store_true", help="show what would be deleted; delete nothing")
    push = _action(actions, "push", "publish complete local entries to s3://bucket/prefix")
    push.add_argument("url", metavar="s3://bucket/prefix")
    pull = _action(actions, "pull", "fetch published entries from s3://bucket/prefix into the local cache")
    pull.add_argument("url", metavar="s3://bucket/prefix")
    for sub in (ls, verify):
        _cache_dir_option(sub, "remote")
    for sub in (prune, push, pull):
        _cache_dir_option(sub, "local")


@register_command("cache", help="list, verify, prune and S3 push/pull the Neuron compile cache (NEFFs)",
                  add_arguments=add_arguments)
def run(args: argparse.Namespace) -> int:
    from bmojo_neuron.compile_cache.location import resolve_cache_dir

    url, source = resolve_cache_dir(getattr(args, "cache_dir", None))
    action = {"ls": _ls, "verify": _verify, "prune": _prune, "push": _push, "pull": _pull}[args.action]
    return action(args, url, source)


# ------------------------------------------------------------------ ls, verify
def where_from(source: str) -> str:
    """Where the cache folder came from (`resolve_cache_dir`'s source), for a message about that folder."""
    return "the Neuron default; name another with --cache-dir" if source == "default" else f"from {source}"


def _entries(url: str, source: str) -> list:
    from bmojo_neuron.compile_cache import open_cache
    from bmojo_neuron.compile_cache.s3 import s3_errors

    try:
        with s3_errors(url):
            return open_cache(url).entries()
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{exc} ({where_from(source)})") from None


def _entry_dict(entry: Any, now: float, remote: bool) -> dict[str, Any]:
    row = {"compiler_version": entry.compiler_version, "version_dir": entry.version, "module": entry.module,
           "location": entry.location, "size": entry.size, "mtime": entry.mtime, "age_s": round(now - entry.mtime),
           "status": entry.status, "detail": entry.detail, "files": sorted(entry.files)}
    if remote:
        row["published"] = entry.published
    return row


def _report(url: str, source: str, entries: list, now: float) -> dict[str, Any]:
    from bmojo_neuron.compile_cache.layout import totals
    from bmojo_neuron.compile_cache.location import is_s3

    return {"cache": url, "source": source,
            "entries": [_entry_dict(e, now, is_s3(url)) for e in entries], "totals": totals(entries)}


def _table(entries: list, now: float, remote: bool) -> list[str]:
    from bmojo_neuron.compile_cache.units import format_age, format_size

    rows = [("compiler", "module", "size", "age", "status") + (("marker",) if remote else ())]
    for e in entries:
        status = e.status + (f": {e.detail}" if e.detail else "")
        rows.append((e.compiler_version, e.module, format_size(e.size), format_age(now - e.mtime), status)
                    + (("yes" if e.published else "no",) if remote else ()))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return ["  ".join(c.rjust(w) if i in (2, 3) else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
            + "  " + r[-1] for r in rows]


def _totals_line(entries: list) -> str:
    from bmojo_neuron.compile_cache.layout import totals
    from bmojo_neuron.compile_cache.units import format_entries, format_size

    t = totals(entries)
    return (f"{format_entries(t['entries'])}, {format_size(t['bytes'])}: {t['ok']} ok, {t['failed']} failed, "
            f"{t['incomplete']} incomplete")


def _ls(args: argparse.Namespace, url: str, source: str) -> int:
    from bmojo_neuron.compile_cache.location import is_s3

    now = time.time()
    entries = _entries(url, source)
    if args.json:
        print(json.dumps(_report(url, source, entries, now), indent=2))
        return 0
    print(f"cache {url} ({source})")
    if entries:
        print("\n".join(_table(entries, now, is_s3(url))))
    print(_totals_line(entries))
    return 0


def _verify(args: argparse.Namespace, url: str, source: str) -> int:
    from bmojo_neuron.compile_cache.layout import OK

    now = time.time()
    entries = _entries(url, source)
    bad = [e for e in entries if e.status != OK]
    if args.json:
        report = _report(url, source, entries, now)
        report["problems"] = [_entry_dict(e, now, False) for e in bad]
        print(json.dumps(report, indent=2))
        return 1 if bad else 0
    print(f"cache {url} ({source}): {_totals_line(entries)}")
    for e in bad:
        print(f"  {e.status:<10} {e.key}: {e.detail}")
    if any(e.status == "failed" for e in bad):
        print("failed entries are served from the cache as failures until recompiled: remove them with "
              "`bmojo-neuron cache prune --failed`, or keep --retry_failed_compilation in NEURON_CC_FLAGS "
              "(as `bmojo-neuron plan` does)")
    if any(e.status == "incomplete" for e in bad):
        print("incomplete entries are being compiled, were extracted but not compiled, or were left by a "
              "killed compile; `bmojo-neuron precompile` compiles extracted graphs")
    return 1 if bad else 0


# ------------------------------------------------------------------ prune
def _prune(args: argparse.Namespace, url: str, source: str) -> int:
    from bmojo_neuron.compile_cache.local import LocalCache
    from bmojo_neuron.compile_cache.location import is_s3
    from bmojo_neuron.compile_cache.units import parse_size

    if is_s3(url):
        raise ValueError(f"prune works on a local cache folder; {url} is in S3 (expire its objects with an "
                         "S3 lifecycle rule instead)")
    try:
        max_size = None if args.max_size is None else parse_size(args.max_size)
    except ValueError as exc:
        raise ValueError(f"--max-size: {exc}") from None
    cache = LocalCache(url)
    entries = _entries(url, source)  # a missing cache fails here, before a lock folder is made in it
    with contextlib.ExitStack() as stack:
        if not args.dry_run:  # alone: no precompile, pull or Neuron run may be using the cache meanwhile
            stack.enter_context(cache.maintain("cache prune"))
            entries = _entries(url, source)
        return _prune_locked(args, url, cache, entries, max_size)


def _prune_locked(args: argparse.Namespace, url: str, cache: Any, entries: list, max_size: int | None) -> int:
    from bmojo_neuron.compile_cache.prune import apply, select
    from bmojo_neuron.compile_cache.units import format_age, format_entries, format_size

    now = time.time()
    plan = select(entries, cache.busy_reason, now=now, older_than_days=args.older_than, max_size=max_size,
                  failed=args.failed)
    verb = "would remove" if args.dry_run else "remove"
    for entry, why in plan.remove:
        print(f"{verb} {entry.key} ({format_size(entry.size)}, {format_age(now - entry.mtime)} old, "
              f"{entry.status}): {why}")
    for entry, why, busy in plan.kept_busy:
        print(f"keep {entry.key} ({why}): in use — {busy}")
    if args.dry_run:
        print(f"dry run: would free {format_size(plan.freed)} of {format_size(plan.size_before)}; nothing deleted")
        return 0
    removed, freed = apply(cache, plan)
    cache.clean_leftovers()
    print(f"removed {format_entries(removed)}, freed {format_size(freed)}; "
          f"{format_size(plan.size_before - freed)} left in {url}")
    return 0


# ------------------------------------------------------------------ push, pull
def _sync_args(url: str, remote: str) -> tuple[Any, Any]:
    from bmojo_neuron.compile_cache.local import LocalCache
    from bmojo_neuron.compile_cache.location import is_s3
    from bmojo_neuron.compile_cache.s3 import S3Store

    if is_s3(url):
        raise ValueError(f"push and pull copy between a local cache folder and S3; the cache dir is {url} "
                         "(pass --cache-dir /a/local/folder)")
    return LocalCache(url), S3Store(remote)


def _push(args: argparse.Namespace, url: str, source: str) -> int:
    from bmojo_neuron.compile_cache.s3 import s3_errors
    from bmojo_neuron.compile_cache.sync import push

    cache, store = _sync_args(url, args.url)
    try:
        with s3_errors(store.url):
            report = push(cache, store)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{exc} ({where_from(source)})") from None
    for key, why in report.skipped:
        print(f"not pushed {key}: {why}")
    print(f"{report.summary('pushed')} -> {store.url}")
    return 0


def _pull(args: argparse.Namespace, url: str, source: str) -> int:
    from bmojo_neuron.compile_cache.s3 import s3_errors
    from bmojo_neuron.compile_cache.sync import pull

    cache, store = _sync_args(url, args.url)
    with s3_errors(store.url), cache.use("cache pull"):
        report = pull(store, cache)
    print(f"{report.summary('pulled')} <- {store.url} into {url}")
    return 0
