"""Which `data.path` and `data.tokenizer` names may be looked up on the Hugging Face hub.

Offline, a hub lookup retries for about a minute before it fails, so a mistyped local
path must never get there. A name that does not exist here is taken to be local, and
fails at once, when it starts with ``/``, ``.`` or ``~``, has a file extension, has more
than one ``/``, or is ``folder/name`` with ``folder`` present here. Hub names are
``owner/name``; for tokenizers (``gpt2``) a bare name is also allowed, for datasets it is not.

A hub dataset name is then looked up once with a short timeout before `datasets.load_dataset`,
whose offline failure comes only after its retries (five, with backoff: about 30-45 s), so an
unreachable hub is one clear error at once (`check_hub_dataset`).
"""

from __future__ import annotations

from pathlib import Path

DATASET_LOOKUP_TIMEOUT = 3.0  # seconds for the one look-up of a hub dataset before it is loaded


def may_be_hub_name(name: str, bare: bool = False) -> bool:
    """True when `name` (not an existing local path) can only mean a hub repository."""
    parts = name.split("/")
    if name.startswith(("/", ".", "~")) or Path(name).suffix or not all(parts):
        return False
    if len(parts) == 1:
        return bare
    return len(parts) == 2 and not Path(parts[0]).is_dir()


def check_hub_dataset(name: str) -> None:
    """Raise the ``data.path`` error at once when hub dataset `name` cannot be loaded from the hub: it does not
    exist there, or the hub cannot be reached within `DATASET_LOOKUP_TIMEOUT`.

    In offline mode (``HF_HUB_OFFLINE`` or ``HF_DATASETS_OFFLINE``, as `datasets.config` reads them) nothing is
    looked up: `datasets.load_dataset` then reads the Hugging Face cache, or fails at once (`offline_error`).
    """
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    if datasets_offline():
        return
    try:
        huggingface_hub.dataset_info(name, timeout=DATASET_LOOKUP_TIMEOUT)
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"data.path {name}: not a local path, and the hub has no such dataset (or it is "
                                "private: log in with `hf auth login`)") from None
    except Exception as err:  # offline, no route, DNS, TLS, timeout: the transport's error types vary
        raise ValueError(f"data.path {name}: a hub dataset, and the hub cannot be reached ({type(err).__name__}: "
                         f"{err}); {FETCH_ADVICE.format(name=name)}, or set HF_HUB_OFFLINE=1 to read a copy already "
                         "in the Hugging Face cache") from None


def datasets_offline() -> bool:
    """Whether `datasets` is in offline mode: ``HF_DATASETS_OFFLINE`` when set, else ``HF_HUB_OFFLINE`` (read when
    `datasets` is imported: datasets/config.py, ``HF_HUB_OFFLINE``), so the setting `load_dataset` obeys."""
    import datasets.config

    return bool(datasets.config.HF_HUB_OFFLINE)


FETCH_ADVICE = ("download it where online (`hf download {name} --repo-type dataset`) and set data.path to that "
                "folder, or run `bmojo-neuron data prepare` there")


def offline_error(name: str, err: Exception) -> ValueError:
    """The ``data.path`` error of a hub dataset that offline mode found missing from the Hugging Face cache."""
    return ValueError(f"data.path {name}: a hub dataset, not in the Hugging Face cache, and offline mode is on "
                      f"(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE: {type(err).__name__}); {FETCH_ADVICE.format(name=name)}")
