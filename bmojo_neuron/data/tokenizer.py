"""Tokenizers: a dependency-free byte tokenizer, or any Hugging Face tokenizer.

The byte tokenizer needs no files, so the CPU recipes run offline. Its vocabulary is
the 256 UTF-8 byte values; byte 0 (NUL, which never occurs in normal text) doubles
as the end-of-document token ``eos_token_id = 0`` placed between packed documents.
"""

from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import Any, Sequence

from bmojo_neuron.data.hub import HubUnreachable, NotOnHub, look_up_on_hub, may_be_hub_name

BYTE_TOKENIZER = "byte"


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0-255, vocab 256, eos = 0 (NUL)."""

    name_or_path = BYTE_TOKENIZER
    vocab_size = 256
    eos_token_id = 0

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of `text`; no special tokens are added."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Bytes back to text (invalid UTF-8, e.g. a block cut mid-character, becomes U+FFFD)."""
        data = bytes(int(i) for i in ids if not (skip_special_tokens and int(i) == self.eos_token_id))
        return data.decode("utf-8", errors="replace")

    def batch_encode(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]


def load_tokenizer(name_or_path: str) -> Any:
    """``"byte"`` → `ByteTokenizer`; otherwise a Hugging Face tokenizer from a local path or hub name.

    A hub name is read from the local Hugging Face cache when it is there, so a
    downloaded tokenizer needs no network. Otherwise one quick look-up asks the hub
    whether the repository exists before the download: offline (no route, or
    ``HF_HUB_OFFLINE=1``) the download would retry for about a minute before failing,
    the look-up fails in well under a second.
    """
    if name_or_path == BYTE_TOKENIZER:
        return ByteTokenizer()
    if not Path(name_or_path).expanduser().exists():
        _refuse_missing_local_path(name_or_path)
        cached = _cached_hub_tokenizer(name_or_path)
        if cached is not None:
            return cached
        _check_on_hub(name_or_path)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:  # no tokenizer files there, or a file that is not JSON (a ValueError)
        raise _not_loadable(name_or_path, err) from None
    except Exception:
        refusal = _tokenizers_refusal(name_or_path)
        if refusal is None:
            raise
        raise _not_loadable(name_or_path, f"tokenizer.json: {refusal}") from None


def _not_loadable(name_or_path: str, reason: Exception | str) -> ValueError:
    return ValueError(f"data.tokenizer {name_or_path!r}: not 'byte' and not loadable as a Hugging Face tokenizer "
                      f"(a local folder with tokenizer files, or a hub name when online): {reason}")


def _tokenizers_refusal(name_or_path: str) -> str | None:
    """Why the tokenizers library refuses the tokenizer's tokenizer.json, or None when it reads the file. For JSON
    that is not a tokenizer it can build (a field missing, a wrong type) it raises a bare `Exception` naming what
    is wrong, and transformers fails on such a file with whatever its own code meets first (`[]` gives a
    TypeError naming nothing in the file), so the file's refusal, not the error's type, says the tokenizer is at
    fault, and its words say why. Any error from the load of a file the library accepts (a bug in transformers
    or in the tokenizers library) is not this tokenizer's fault and keeps its traceback."""
    location = tokenizer_file(name_or_path, "tokenizer.json")
    if isinstance(location, NotHere):
        return None
    from tokenizers import Tokenizer

    try:
        Tokenizer.from_file(str(location))
    except Exception as refusal:  # noqa: BLE001 - the library's refusal is a bare Exception
        return str(refusal) if type(refusal) is Exception else None
    return None


def check_tokenizer_reachable(name_or_path: str) -> None:
    """The ValueError `load_tokenizer` would raise for a tokenizer it can neither read here nor fetch: a missing
    local path, or a hub name that is not in the local Hugging Face cache and that the hub does not have (or,
    offline, cannot be asked for). Imports neither transformers nor torch, so `train` and `data prepare` ask it
    before torch loads; the hub is asked only for a name the cache does not hold (`_check_on_hub`, seconds at
    most). Lenient where unsure: a cache folder holding some of the tokenizer's files passes, and the load says
    whether they are enough."""
    if name_or_path == BYTE_TOKENIZER or Path(name_or_path).expanduser().exists():
        return
    _refuse_missing_local_path(name_or_path)
    if not _in_hub_cache(name_or_path):
        _check_on_hub(name_or_path)


def check_tokenizer_json(name_or_path: str) -> None:
    """The ValueError `load_tokenizer` would raise, in its words, for a tokenizer whose tokenizer.json on this
    machine (`tokenizer_file`) is not JSON, or is JSON but not an object (a list, a number): no tokenizer loads
    from such a file, and reading it takes milliseconds where the transformers import takes seconds. Anything
    else, a wrong field inside an object included, is left to the load."""
    location = tokenizer_file(name_or_path, "tokenizer.json")
    if isinstance(location, NotHere):
        return
    try:
        document = json.loads(location.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:  # transformers passes the json module's error on as it is
        raise _not_loadable(name_or_path, error) from None
    except (OSError, UnicodeDecodeError):  # unreadable: the load names it
        return
    if not isinstance(document, dict):  # transformers' own error names nothing in the file: the library's does
        refusal = _tokenizers_refusal(name_or_path)
        if refusal is not None:
            raise _not_loadable(name_or_path, f"tokenizer.json: {refusal}")


# The files `AutoTokenizer.from_pretrained` starts from: the model's config.json, tokenizer_config.json and a fast
# tokenizer's tokenizer.json (transformers 5.25.0 models/auto/tokenization_auto.py, lines 806, 819 and 856); one
# of them in the Hugging Face cache means the tokenizer may load offline, which the load itself then decides.
TOKENIZER_ENTRY_FILES = ("tokenizer_config.json", "tokenizer.json", "config.json")


def _in_hub_cache(name: str) -> bool:
    """Whether the local Hugging Face cache holds a file the tokenizer of hub repository `name` starts from."""
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(name, file), str) for file in TOKENIZER_ENTRY_FILES)


def _refuse_missing_local_path(name: str) -> None:
    """A name that is not on this machine and cannot be a hub name is a mistyped local path: fail at once."""
    if not may_be_hub_name(name, bare=True):
        raise ValueError(f"data.tokenizer {name!r}: no such folder (not 'byte', and a local path is never "
                         "looked up on the hub)")


def _cached_hub_tokenizer(name: str) -> Any | None:
    """The tokenizer of hub repository `name` from the local Hugging Face cache, or None when it is not there."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError):
        return None


def _check_on_hub(name: str) -> None:
    """Raise the ``data.tokenizer`` error at once when hub repository `name` does not exist or the hub is unreachable."""
    hint = "not 'byte', not a local folder and not in the local Hugging Face cache"
    try:
        look_up_on_hub(name, "model")
    except NotOnHub:
        raise ValueError(f"data.tokenizer {name!r}: {hint}, and the hub has no such repository (or it is "
                         "private: log in with `hf auth login`)") from None
    except HubUnreachable as err:
        raise ValueError(f"data.tokenizer {name!r}: {hint}, and the hub cannot be reached ({err}); download it "
                         "where online, or point data.tokenizer at a folder with its files") from None


def tokenizer_source(name_or_path: str) -> str:
    """Where `load_tokenizer` would read `name_or_path` from, without loading it (a dry run's line).

    Says when the run would need the network: a hub name not in the local Hugging Face cache.
    Raises the same ValueError as `load_tokenizer` for a mistyped local path.
    """
    if name_or_path == BYTE_TOKENIZER:
        return "byte (built in, nothing to download)"
    if Path(name_or_path).expanduser().exists():
        return f"{name_or_path} (a local folder)"
    _refuse_missing_local_path(name_or_path)
    if _in_hub_cache(name_or_path):
        return f"{name_or_path} (in the local Hugging Face cache: no download)"
    return (f"{name_or_path}: not in the local Hugging Face cache, so the run downloads it from the hub when it "
            f"starts (offline it stops there); fetch it ahead with `hf download {name_or_path}` where the ranks' "
            "HF_HOME can read it, or set data.tokenizer to a folder with its files")


class NotHere(enum.Enum):
    """Why `tokenizer_file` has no path: the tokenizer has no such file, or this machine cannot tell."""

    ABSENT = "absent"
    UNKNOWN = "unknown"


def tokenizer_file(name_or_path: str, file: str) -> Path | NotHere:
    """The tokenizer's file `file` on this machine, found without transformers (whose import costs seconds): in
    the local folder `name_or_path`, or for a hub name, in the local Hugging Face cache (the snapshot
    `load_tokenizer` reads offline). ABSENT when the folder lacks it or the cache recorded that the repository has
    none; UNKNOWN for a hub file never fetched, or a name that is neither."""
    folder = Path(name_or_path).expanduser()
    if folder.exists():
        return folder / file if (folder / file).is_file() else NotHere.ABSENT
    if not may_be_hub_name(name_or_path, bare=True):
        return NotHere.UNKNOWN
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(name_or_path, file)
    except ValueError:  # a name the hub's validation refuses: `check_tokenizer_reachable` says so
        return NotHere.UNKNOWN
    if isinstance(cached, str):
        return Path(cached)
    return NotHere.UNKNOWN if cached is None else NotHere.ABSENT


def _json_object(location: Path | NotHere) -> dict[str, Any] | None:
    """The JSON object in the file at `location`; None when there is none or it is not one (the load says why)."""
    if isinstance(location, NotHere):
        return None
    try:
        document = json.loads(location.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) else None


def vocabulary_in_files(name_or_path: str) -> int | None:
    """How many token ids the tokenizer `name_or_path` has at least, read from its files without transformers
    (`tokenizer_file`: a local folder, or a hub name in the local Hugging Face cache): the distinct tokens of
    tokenizer.json's model vocabulary and added tokens, and of tokenizer_config.json's ``added_tokens_decoder``.
    None without a readable tokenizer.json here (a slow tokenizer's files, a hub name not in the cache):
    `load_tokenizer` counts those.

    `len()` of the loaded tokenizer is the number of distinct tokens of its vocabulary with the added ones
    (transformers 5.25.0 tokenization_utils_tokenizers.py ``__len__``: ``get_vocab_size(with_added_tokens=True)``
    of the tokenizers library). Loading may add more (special tokens missing from the vocabulary), never fewer,
    so a count from the files that is already too large for a model is a refusal the load would make too."""
    document = _json_object(tokenizer_file(name_or_path, "tokenizer.json"))
    try:
        vocab = document["model"]["vocab"]  # a WordLevel/BPE/WordPiece map, or a Unigram list of [piece, score]
        tokens = set(vocab) if isinstance(vocab, dict) else {entry[0] for entry in vocab if isinstance(entry, list)}
        tokens |= {entry.get("content") for entry in document.get("added_tokens") or [] if isinstance(entry, dict)}
    except (KeyError, TypeError, IndexError):  # no document, or not a tokenizer.json: the load says what is wrong
        return None
    config = _json_object(tokenizer_file(name_or_path, "tokenizer_config.json")) or {}
    added = config.get("added_tokens_decoder") or {}
    if isinstance(added, dict):
        tokens |= {entry.get("content") for entry in added.values() if isinstance(entry, dict)}
    tokens.discard(None)
    return len(tokens)


# Tokenizer classes with no special tokens of their own: the tokenizers library's generic backend, and the name
# transformers before 5 saved it under. A model's own class may give a default (transformers 5.25.0
# LlamaTokenizer's eos "</s>"), so only with one of these do the files alone decide whether there is an eos.
GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def eos_named_in_files(name_or_path: str) -> bool | None:
    """Whether the tokenizer `name_or_path` has an eos token, read from its files without transformers
    (`tokenizer_file`); None when the files do not decide it (no tokenizer_config.json here, a tokenizer class
    that is not generic, a hub file not in the cache).

    As transformers 5.25.0 reads them (tokenization_utils_base.py ``_from_pretrained``, 1887-1920): the
    ``eos_token`` of tokenizer_config.json, else of special_tokens_map.json, which is read only when
    tokenizer_config.json has no ``added_tokens_decoder``. A named token is added when the vocabulary lacks it,
    so any name gives an id."""
    config = _json_object(tokenizer_file(name_or_path, "tokenizer_config.json"))
    if config is None or config.get("tokenizer_class") not in GENERIC_TOKENIZER_CLASSES:
        return None
    if config.get("eos_token") is not None:
        return True
    if "added_tokens_decoder" in config:
        return False
    special_map = tokenizer_file(name_or_path, "special_tokens_map.json")
    if special_map is NotHere.ABSENT:
        return False
    specials = _json_object(special_map)
    return None if specials is None else specials.get("eos_token") is not None


def check_eos_in_files(name_or_path: str) -> None:
    """The ValueError `eos_token_id` raises after the load, for a tokenizer whose files (`eos_named_in_files`)
    already show it has no eos token: one line before transformers loads."""
    if eos_named_in_files(name_or_path) is False:
        raise ValueError(f"data.tokenizer {name_or_path!r}: has no eos token (neither its tokenizer_config.json nor "
                         "special_tokens_map.json names one); packing needs one to separate documents: set "
                         '"eos_token" in its tokenizer_config.json')


def encode_batch(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens."""
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.batch_encode(texts)
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def eos_token_id(tokenizer: Any) -> int:
    """The document separator; raises if the tokenizer has none."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', tokenizer)!r} has no eos_token_id; "
            "packing needs one to separate documents"
        )
    return int(eos)


def tokenizer_fingerprint(name_or_path: str) -> str:
    """Identity of a tokenizer for cache keys: its name, plus file sizes/mtimes for a local folder."""
    path = Path(name_or_path).expanduser()
    if name_or_path == BYTE_TOKENIZER or not path.exists():
        return name_or_path
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return name_or_path + "|" + ";".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)


def hf_tokenizer(name_or_path: str) -> Any:
    """The tokenizer `name_or_path` as a Hugging Face tokenizer: the byte tokenizer becomes an equivalent
    byte-level one (the same ids for every text, ``eos_token_id = 0``); any other is loaded as is."""
    return hf_byte_tokenizer() if name_or_path == BYTE_TOKENIZER else load_tokenizer(name_or_path)


def byte_symbols() -> dict[int, str]:
    """Byte value -> the printable character byte-level BPE stands it for: the GPT-2 convention, which the
    tokenizers library's ByteLevel pre-tokenizer applies (and transformers' ``bytes_to_unicode`` returns):
    printable Latin-1 bytes ('!' to '~', '¡' to '¬', '®' to 'ÿ') stand for themselves, the other 68 take the
    characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def byte_level_backend() -> Any:
    """`ByteTokenizer`'s ids as a tokenizers-library `Tokenizer` (a byte-level BPE without merges over the 256
    byte symbols gives exactly the byte ids): what `hf_byte_tokenizer` wraps, built without transformers, so
    its tokenizer.json can be compared with another's before transformers loads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    symbol = byte_symbols()
    backend = Tokenizer(models.BPE(vocab={symbol[b]: b for b in range(256)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return backend


def hf_byte_tokenizer() -> Any:
    """`ByteTokenizer` as a `PreTrainedTokenizerFast`: token id = UTF-8 byte value, eos = byte 0.

    ``split_special_tokens`` keeps the eos symbol (the character U+0100, byte 0's stand-in) from being matched
    inside text, where `ByteTokenizer` would encode it as its two UTF-8 bytes.
    """
    from transformers import PreTrainedTokenizerFast

    eos = byte_symbols()[ByteTokenizer.eos_token_id]
    return PreTrainedTokenizerFast(tokenizer_object=byte_level_backend(), eos_token=eos, pad_token=eos,
                                   split_special_tokens=True)
