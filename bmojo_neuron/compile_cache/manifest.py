"""The completion marker of an entry published to S3: which files, their sizes and SHA-256.

The marker (``<entry>/.bmojo-complete``) is written after every file of the entry
is in place, so its presence means "published"; pull checks each downloaded file
against it before the entry enters the local cache.
"""

from __future__ import annotations

import hashlib
import json
import socket
import time
from dataclasses import dataclass
from pathlib import Path

FORMAT = "bmojo-neuron compile-cache entry v1"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class FileRecord:
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    key: str  # "<version>/<module>"
    files: dict[str, FileRecord]
    published_at: str = ""
    host: str = ""

    def to_json(self) -> bytes:
        body = {"format": FORMAT, "entry": self.key, "published_at": self.published_at, "host": self.host,
                "files": {name: {"size": r.size, "sha256": r.sha256} for name, r in sorted(self.files.items())}}
        return (json.dumps(body, indent=1) + "\n").encode()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def build_manifest(key: str, folder: Path, names: list[str]) -> Manifest:
    """The manifest of the files `names` under the entry folder `folder` (hashes them all)."""
    files = {name: FileRecord((folder / name).stat().st_size, sha256_of(folder / name)) for name in names}
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return Manifest(key, files, stamp, socket.gethostname())


def parse_manifest(data: bytes, key: str) -> Manifest:
    """Parse a marker; ValueError saying what is wrong when it is not a marker of entry `key`."""
    try:
        body = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"marker of {key} is not JSON ({exc})") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise ValueError(f"marker of {key} is not a {FORMAT!r} marker")
    if body.get("entry") != key:
        raise ValueError(f"marker of {key} names another entry ({body.get('entry')!r})")
    files = body.get("files")
    if not isinstance(files, dict) or not files:
        raise ValueError(f"marker of {key} lists no files")
    records = {}
    for name, rec in files.items():
        ok = (isinstance(rec, dict) and isinstance(rec.get("size"), int) and rec["size"] >= 0
              and isinstance(rec.get("sha256"), str) and len(rec["sha256"]) == 64)
        if not ok or name.startswith("/") or ".." in name.split("/"):
            raise ValueError(f"marker of {key}: bad record for file {name!r}")
        records[name] = FileRecord(rec["size"], rec["sha256"])
    return Manifest(key, records, str(body.get("published_at", "")), str(body.get("host", "")))


def listing_mismatch(manifest: Manifest, sizes: dict[str, int]) -> str | None:
    """Why the objects present (name -> size) do not match the marker, or None when they do."""
    for name, record in sorted(manifest.files.items()):
        if name not in sizes:
            return f"{name} is missing"
        if sizes[name] != record.size:
            return f"{name} has {sizes[name]} bytes, the marker says {record.size}"
    return None
