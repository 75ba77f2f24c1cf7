"""Which `data.path` and `data.tokenizer` names may be looked up on the Hugging Face hub.

Offline, a hub lookup retries for about a minute before it fails, so a mistyped local
path must never get there. A name that does not exist here is taken to be local, and
fails at once, when it starts with ``/``, ``.`` or ``~``, has a file extension, has more
than one ``/``, or is ``folder/name`` with ``folder`` present here. Hub names are
``owner/name``; for tokenizers (``gpt2``) a bare name is also allowed, for datasets it is not.
"""

from __future__ import annotations

from pathlib import Path


def may_be_hub_name(name: str, bare: bool = False) -> bool:
    """True when `name` (not an existing local path) can only mean a hub repository."""
    parts = name.split("/")
    if name.startswith(("/", ".", "~")) or Path(name).suffix or not all(parts):
        return False
    if len(parts) == 1:
        return bare
    return len(parts) == 2 and not Path(parts[0]).is_dir()
