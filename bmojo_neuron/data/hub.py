"""Which `data.path` and `data.tokenizer` names may be looked up on the Hugging Face hub.

Offline, a hub lookup retries for about a minute before it fails, so a mistyped local
path must never get there. A name that does not exist here is taken to be local, and
fails at once, when it starts with ``/``, ``.`` or ``~``, has a file extension, has more
than one ``/``, or is ``folder/name`` with ``folder`` present here. Hub names are
``owner/name``; for tokenizers (``gpt2``) a bare name is also allowed, for datasets it is not.

A hub name that is not in the local Hugging Face cache is then looked up once (`look_up_on_hub`:
a dataset before `datasets.load_dataset`, a tokenizer before `AutoTokenizer.from_pretrained`),
whose offline failures come only after their retries (about 30-60 s), so a name the hub does not
have, or a hub that cannot be reached, is one clear error at once. Each caller words its own error.
"""

from __future__ import annotations

from pathlib import Path

# The one timeout of every look-up: one small API request (huggingface_hub 2.4.0 hf_api.py passes it to the
# request of `model_info` / `dataset_info`, lines 3214 and 3284), which a working link answers well within a
# second; 5 s leaves room for a slow link, and a hub that does not answer costs 5 s, not a minute of retries.
HUB_LOOKUP_TIMEOUT = 5.0


OFFLINE = "offline mode is on: HF_HUB_OFFLINE is set"


class NotOnHub(LookupError):
    """The hub has no such repository (or it is private and this machine is not logged in)."""


class HubUnreachable(ConnectionError):
    """The hub could not be asked: offline mode, no route, DNS, TLS, or no answer within `HUB_LOOKUP_TIMEOUT`."""


def look_up_on_hub(name: str, repo_type: str) -> None:
    """Ask the hub once whether repository `name` (``repo_type`` ``"model"`` or ``"dataset"``) exists.

    Raises `NotOnHub`, or `HubUnreachable` whose message is the transport's error (``"<type>: <message>"``). In
    offline mode (``HF_HUB_OFFLINE``, as huggingface_hub read it) nothing is asked: huggingface_hub would refuse
    the request all the same, after building an HTTP client and its TLS context (tens of milliseconds).
    """
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import RepositoryNotFoundError

    if constants.HF_HUB_OFFLINE:
        raise HubUnreachable(OFFLINE)

    try:
        huggingface_hub.repo_info(name, repo_type=repo_type, timeout=HUB_LOOKUP_TIMEOUT)
    except RepositoryNotFoundError:
        raise NotOnHub(name) from None
    except Exception as err:  # offline mode, no route, DNS, TLS, timeout: the transport's error types vary
        raise HubUnreachable(f"{type(err).__name__}: {err}") from None


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
    exist there, or the hub cannot be reached (`look_up_on_hub`).

    In offline mode (``HF_HUB_OFFLINE`` or ``HF_DATASETS_OFFLINE``, as `datasets.config` reads them) nothing is
    looked up: `datasets.load_dataset` then reads the Hugging Face cache, or fails at once (`offline_error`).
    """
    if datasets_offline():
        return
    try:
        look_up_on_hub(name, "dataset")
    except NotOnHub:
        raise FileNotFoundError(f"data.path {name}: not a local path, and the hub has no such dataset (or it is "
                                "private: log in with `hf auth login`)") from None
    except HubUnreachable as err:
        raise ValueError(f"data.path {name}: a hub dataset, and the hub cannot be reached ({err}); "
                         f"{FETCH_ADVICE.format(name=name)}, or set HF_HUB_OFFLINE=1 to read a copy already "
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
