"""Push complete local entries to S3 and pull published ones back, never exposing half an entry.

Push, per entry: upload every file under a fresh staging prefix
(``.bmojo-staging/<token>/``), copy each to its final key, then write the
completion marker last and drop the staging copies. A push killed at any point
leaves no marker, so the entry is not published; the next push redoes it.

Pull, per published entry: under the entry's local lock, download into a staging
folder beside the cache, check every file's size and SHA-256 against the marker,
and rename the folder into place. Entries already complete locally are skipped;
a failed or incomplete local copy that no one is writing is replaced.
"""

from __future__ import annotations

import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from bmojo_neuron.compile_cache.layout import LOCK_SUFFIX, MARKER, OK, Entry
from bmojo_neuron.compile_cache.local import LocalCache
from bmojo_neuron.compile_cache.manifest import (Manifest, build_manifest, listing_mismatch, parse_manifest,
                                                 sha256_of)
from bmojo_neuron.compile_cache.s3 import STAGING, S3Store
from bmojo_neuron.compile_cache.units import format_entries, format_size

STALE_STAGING_SECONDS = 24 * 3600  # staging objects older than this belong to pushes that died

Log = Callable[[str], None]


@dataclass
class SyncReport:
    done: list[str] = field(default_factory=list)  # entries pushed / pulled
    present: list[str] = field(default_factory=list)  # already complete at the destination
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (entry, why)
    bytes: int = 0

    def summary(self, verb: str) -> str:
        return (f"{verb} {format_entries(len(self.done))} ({format_size(self.bytes)}), "
                f"{len(self.present)} already there, {len(self.skipped)} skipped")


def remote_manifest(store: S3Store, entry: Entry) -> tuple[Manifest | None, str]:
    """The marker of a remote entry if it is published and its objects match it, else (None, why not)."""
    if not entry.published:
        return None, "not published (no completion marker)"
    try:
        manifest = parse_manifest(store.get(f"{entry.key}/{MARKER}"), entry.key)
    except ValueError as exc:
        return None, str(exc)
    why = listing_mismatch(manifest, {name: f.size for name, f in entry.files.items()})
    return (None, f"marker does not match the objects: {why}") if why else (manifest, "")


# ------------------------------------------------------------------------ push
def push(cache: LocalCache, store: S3Store, log: Log = print) -> SyncReport:
    """Publish every complete local entry that is not already published at `store`."""
    report = SyncReport()
    local = cache.entries()
    store.clean_stale_staging(STALE_STAGING_SECONDS)
    remote = {e.key: e for e in store.entries()}
    for entry in local:
        if entry.status != OK:
            report.skipped.append((entry.key, f"{entry.status}: {entry.detail}"))
            continue
        if entry.key in remote and remote_manifest(store, remote[entry.key])[0] is not None:
            report.present.append(entry.key)
            continue
        with cache.entry_lock(entry.version, entry.module):  # keeps our prune from removing it meanwhile
            current = cache.entry(entry.version, entry.module)
            if current is None or current.status != OK:
                report.skipped.append((entry.key, "changed locally during the push"))
                continue
            names = sorted(n for n in current.files if not n.endswith(LOCK_SUFFIX))
            manifest = build_manifest(entry.key, Path(current.location), names)
            publish(store, manifest, Path(current.location))
        report.done.append(entry.key)
        report.bytes += current.size
        log(f"pushed {entry.key} ({format_size(current.size)})")
    return report


def publish(store: S3Store, manifest: Manifest, folder: Path) -> None:
    """Stage, copy into place, then write the marker: the marker appears only over complete files."""
    token = uuid.uuid4().hex
    staged = {name: f"{STAGING}/{token}/{manifest.key}/{name}" for name in manifest.files}
    for name, relpath in staged.items():
        store.upload(folder / name, relpath)
    for name, relpath in staged.items():
        store.copy(relpath, f"{manifest.key}/{name}")
    store.put(f"{manifest.key}/{MARKER}", manifest.to_json())
    store.delete(list(staged.values()))


# ------------------------------------------------------------------------ pull
def pull(store: S3Store, cache: LocalCache, log: Log = print) -> SyncReport:
    """Bring every published entry of `store` into `cache` that is not complete there already."""
    report = SyncReport()
    remote = store.entries()
    cache.root.mkdir(parents=True, exist_ok=True)
    for entry in remote:
        if not entry.published:
            report.skipped.append((entry.key, "not published (no completion marker)"))
            continue
        local = cache.entry(entry.version, entry.module)
        if local is not None and local.status == OK:  # fast path, no lock
            report.present.append(entry.key)
            continue
        with cache.entry_lock(entry.version, entry.module):
            outcome, why = _pull_locked(store, cache, entry)
        if outcome == "done":
            report.done.append(entry.key)
            report.bytes += entry.size - entry.files[MARKER].size
            log(f"pulled {entry.key} ({format_size(entry.size - entry.files[MARKER].size)})")
        elif outcome == "present":
            report.present.append(entry.key)
        else:
            report.skipped.append((entry.key, why))
            log(f"skipped {entry.key}: {why}")
    return report


def _pull_locked(store: S3Store, cache: LocalCache, entry: Entry) -> tuple[str, str]:
    """Pull one entry while holding its lock: ("done" | "present" | "skipped", why)."""
    local = cache.entry(entry.version, entry.module)
    if local is not None and local.status == OK:
        return "present", ""  # another process pulled it while we waited for the lock
    manifest, why = remote_manifest(store, entry)
    if manifest is None:
        return "skipped", why
    if local is not None:
        busy = cache.busy_reason(local, check_lock=False)
        if busy:
            return "skipped", f"the local copy is {local.status} and in use ({busy})"
    staging = cache.new_staging_dir(entry.version, entry.module)
    try:
        bad = _download(store, manifest, staging)
        if bad:
            return "skipped", bad
        if local is not None:
            cache.remove(local)  # failed or incomplete and idle: the published copy replaces it
        if not cache.install(staging, entry.version, entry.module):
            return "skipped", "the entry appeared locally during the pull (a compile?); left as it is"
        return "done", ""
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already when installed


def _download(store: S3Store, manifest: Manifest, staging: Path) -> str:
    """Download the marker's files into `staging`; why they do not match the marker ("" when they do)."""
    for name, record in sorted(manifest.files.items()):
        dest = staging / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        store.download(f"{manifest.key}/{name}", dest)
        size = dest.stat().st_size
        if size != record.size:
            return f"{name}: downloaded {size} bytes, the marker says {record.size}"
        if sha256_of(dest) != record.sha256:
            return f"{name}: SHA-256 differs from the marker (overwritten by a concurrent push?)"
    return ""
