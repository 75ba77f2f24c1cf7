"""Where the compile cache is: the same precedence as the Neuron compiler wrapper.

``--cache-dir`` on our command line, else ``--cache_dir=`` inside ``NEURON_CC_FLAGS``
(which wins over ``NEURON_COMPILE_CACHE_URL`` in libneuronxla too), else
``NEURON_COMPILE_CACHE_URL``, else ``/var/tmp/neuron-compile-cache``.
The location is a local path (relative or absolute) or ``s3://bucket[/prefix]``.
"""

from __future__ import annotations

import os
import re
import shlex
from typing import Mapping

DEFAULT_CACHE_DIR = "/var/tmp/neuron-compile-cache"  # the Neuron compiler's default (launch.plan uses it too)
S3_SCHEME = "s3://"
# A URL scheme and its colon (RFC 3986): "s3:/typo", "S3://x" or "gs://x" start like this, a path does not
# unless its first folder has a colon in its name.
_URL_LIKE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")


def cache_dir_from_flags(flags: str) -> str | None:
    """The value of ``--cache_dir=X`` (or ``--cache_dir X``) in a NEURON_CC_FLAGS string; the last one wins."""
    try:
        tokens = shlex.split(flags)
    except ValueError as exc:
        raise ValueError(f"NEURON_CC_FLAGS is not a valid shell word list ({exc}): {flags!r}") from None
    found = None
    for i, token in enumerate(tokens):
        if token.startswith("--cache_dir="):
            found = token.split("=", 1)[1]
        elif token == "--cache_dir" and i + 1 < len(tokens):
            found = tokens[i + 1]
    return found or None


def resolve_cache_dir(explicit: str | None = None, environ: Mapping[str, str] | None = None) -> tuple[str, str]:
    """(cache URL or path, where it came from) following the precedence in the module docstring."""
    env = os.environ if environ is None else environ
    if explicit:
        return check_cache_location(explicit, "--cache-dir"), "--cache-dir"
    from_flags = cache_dir_from_flags(env.get("NEURON_CC_FLAGS", ""))
    if from_flags:
        source = "--cache_dir in NEURON_CC_FLAGS"
        return check_cache_location(from_flags, source), source
    if env.get("NEURON_COMPILE_CACHE_URL"):
        source = "NEURON_COMPILE_CACHE_URL"
        return check_cache_location(env[source], source), source
    return DEFAULT_CACHE_DIR, "default"


def check_cache_location(location: str, source: str) -> str:
    """`location` when it is a local path or a well-formed ``s3://bucket[/prefix]``; else ValueError naming `source`.

    Without this a mistyped URL (``s3:/bucket``, ``S3://bucket``, ``gs://bucket``) would be taken as a relative
    folder name, and the compiler would fill a local folder of that name while the user expects S3.
    """
    if is_s3(location):
        try:
            parse_s3_url(location)
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None
        return location
    if _URL_LIKE.match(location):
        raise ValueError(f"{source} is {location!r}, which looks like a URL but is not s3://bucket[/prefix], the "
                         f"only remote cache; for a local folder with a colon in its name write ./{location}")
    return location


def is_s3(url: str) -> bool:
    return url.startswith(S3_SCHEME)


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix/`` -> ("bucket", "some/prefix"); ValueError naming the URL when malformed."""
    if not is_s3(url):
        raise ValueError(f"{url!r} is not an S3 URL; expected s3://bucket/prefix")
    bucket, _, prefix = url[len(S3_SCHEME):].partition("/")
    if not bucket or any(c in bucket for c in " \\"):
        raise ValueError(f"{url!r}: no bucket name; expected s3://bucket/prefix")
    prefix = prefix.strip("/")
    if prefix and any(part in ("", ".", "..") for part in prefix.split("/")):
        raise ValueError(f"{url!r}: the key prefix has an empty, '.' or '..' component")
    return bucket, prefix
