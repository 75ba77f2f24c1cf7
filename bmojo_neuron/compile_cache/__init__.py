"""The Neuron compile cache (NEFFs): read its layout, check it, prune it, sync it with S3.

Modules, one job each:

- `layout`   — the ``neuronxcc-<version>/MODULE_<hash>/`` tree as `Entry` objects, and their status
- `location` — which cache to use (``--cache-dir``, NEURON_CC_FLAGS, NEURON_COMPILE_CACHE_URL, default)
- `shared_fs` — whether a cache folder is on a network filesystem several nodes would share
- `local`    — a cache on a filesystem: listing, locks, atomic install and removal
- `s3`       — a cache in S3 through boto3 (imported lazily)
- `manifest` — the completion marker of a published entry
- `sync`     — push to / pull from S3 without ever exposing half an entry
- `prune`    — which entries to delete, and deleting them safely
- `check`    — what a compile run added to the cache, and whether it is complete
- `units`    — sizes and ages

User guide: docs/compile-cache.md.
"""

from __future__ import annotations

from bmojo_neuron.compile_cache.layout import FAILED, INCOMPLETE, OK, Entry
from bmojo_neuron.compile_cache.local import LocalCache
from bmojo_neuron.compile_cache.location import DEFAULT_CACHE_DIR, is_s3, resolve_cache_dir
from bmojo_neuron.compile_cache.s3 import S3Store


def open_cache(url: str) -> LocalCache | S3Store:
    """A `LocalCache` for a path, an `S3Store` for ``s3://...``; both list `.entries()`."""
    return S3Store(url) if is_s3(url) else LocalCache(url)


__all__ = ["DEFAULT_CACHE_DIR", "FAILED", "INCOMPLETE", "OK", "Entry", "LocalCache", "S3Store", "is_s3",
           "open_cache", "resolve_cache_dir"]
