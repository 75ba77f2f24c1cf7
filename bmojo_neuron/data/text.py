"""Local (or hub) text → tokens → fixed-size blocks, cached on disk with `save_to_disk`.

Sources: a .txt/.md file (one document), a .jsonl file (one document per line, in
``text_column``), a folder of such files (recursive, sorted), a `save_to_disk`
folder, a folder `datasets.load_dataset` understands (parquet/csv/json files), or a
hub dataset name. Documents are tokenized with a batched `datasets.map`, joined
with eos after every document and cut into ``block_size`` blocks (the tail shorter
than a block is dropped). The last ``eval_fraction`` of the blocks is the eval
split, so eval text is held out of training.

The result is cached under ``cache_dir/text-<key>/`` (a `DatasetDict` with ``train``
and ``eval`` plus ``meta.json``). The key hashes the source (paths, sizes, mtimes),
the tokenizer and the packing settings. It is built in a temporary folder and
renamed into place, so an interrupted run never leaves a half-written cache.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import shlex
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from bmojo_neuron.data.build_progress import BuildProgress
from bmojo_neuron.data.hub import check_hub_dataset, datasets_offline, may_be_hub_name, offline_error
from bmojo_neuron.data.tokenizer import (BYTE_TOKENIZER, check_eos_in_files, check_tokenizer_json,
                                         check_tokenizer_reachable, encode_batch, eos_token_id, load_tokenizer,
                                         tokenizer_fingerprint)

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl",)
CACHE_VERSION = 1
DEFAULT_CACHE_DIR = Path("~/.cache/bmojo-neuron").expanduser()
CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
MAP_BATCH = 1000
SNIFF_BYTES = 1 << 20  # how much of a data file `file_start_problem` reads before torch loads: a millisecond
FOLDER_SNIFF_BYTES = 1 << 16  # of each file of a folder source: enough for its first JSON lines, and a
# folder of many files is not read a second time before its build reads it


def load_text_dataset(
    path: str | os.PathLike | None = None,
    tokenizer: str = "byte",
    block_size: int = 256,
    cache_dir: str | os.PathLike | None = None,
    eval_fraction: float = 0.05,
    text_column: str = "text",
    progress: BuildProgress | None = None,
) -> tuple[Dataset, Dataset]:
    """(train, eval) datasets of packed ``input_ids``/``labels`` blocks; builds the cache on first use.

    ``path=None`` reads the corpus shipped in ``bmojo_neuron/data/corpus``; ``cache_dir=None``
    uses ``~/.cache/bmojo-neuron``. `progress` gets plain lines of a build's stages (none when the cache is
    there), for output where the `datasets` bars are off.
    """
    from datasets import load_from_disk

    if block_size < 1:
        raise ValueError(f"data.block_size is {block_size}; must be >= 1")
    if not 0 < eval_fraction < 1:
        raise ValueError(f"data.eval_fraction is {eval_fraction}; must be in (0, 1)")
    source = str(CORPUS_DIR if path is None else Path(path).expanduser())
    kind = source_kind(source)
    if kind == "packed":
        packed = _load_packed(source, block_size)
        return packed["train"], packed["eval"]
    settings = _cache_settings(source, kind, tokenizer, block_size, eval_fraction, text_column)
    final = _cache_folder(settings, cache_dir)
    if not (final / "meta.json").is_file():
        _build_cache(source, kind, tokenizer, block_size, eval_fraction, text_column, settings, final, progress)
    cached = load_from_disk(str(final))
    return cached["train"], cached["eval"]


def built_cache(path: str | os.PathLike | None = None, tokenizer: str = "byte", block_size: int = 256,
                cache_dir: str | os.PathLike | None = None, eval_fraction: float = 0.05,
                text_column: str = "text") -> Path | None:
    """The cache folder `load_text_dataset` with these arguments would read, if it is already built; else None
    (also for a packed source, read as it is). Reads file sizes and times only: nothing is tokenized."""
    source = str(CORPUS_DIR if path is None else Path(path).expanduser())
    kind = source_kind(source)
    if kind == "packed":
        return None
    final = _cache_folder(_cache_settings(source, kind, tokenizer, block_size, eval_fraction, text_column),
                          cache_dir)
    return final if (final / "meta.json").is_file() else None


def check_build_tokenizer(data: Any) -> None:
    """When the data section `data` (a recipe's ``data``) is text with no built cache and a source that is not
    packed blocks, so that the run tokenizes it, its tokenizer must be loadable (`check_tokenizer_reachable`), its
    tokenizer.json, where it has one here, a JSON object (`check_tokenizer_json`), and, where its files say, have
    an eos token to separate the documents (`check_eos_in_files`). Reads file names, sizes and times and the
    tokenizer's small JSON files; a run whose cache is built never loads the tokenizer, so an offline node without
    it still trains. Other kinds of data (MQAR) have no tokenizer to check."""
    if data.kind != "text" or data.tokenizer in (None, BYTE_TOKENIZER):
        return
    source = str(CORPUS_DIR if data.path is None else Path(data.path).expanduser())
    if source_kind(source) == "packed":
        return
    if built_cache(data.path, data.tokenizer, data.block_size, data.cache_dir, data.eval_fraction,
                   data.text_column) is None:
        check_tokenizer_reachable(str(data.tokenizer))
        check_tokenizer_json(str(data.tokenizer))
        check_eos_in_files(str(data.tokenizer))


def _cache_settings(source: str, kind: str, tokenizer: str, block_size: int, eval_fraction: float,
                    text_column: str) -> dict[str, Any]:
    """What the cache key hashes: the source's files, the tokenizer, the packing settings."""
    return {
        "version": CACHE_VERSION,
        "source": _source_fingerprint(source, kind),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "block_size": block_size,
        "eval_fraction": eval_fraction,
        "text_column": text_column,
    }


def cache_root(cache_dir: str | os.PathLike | None) -> Path:
    """The folder text caches go under (``data.cache_dir``, else the user cache), resolved: the build's lines,
    `data prepare` and `train --dry-run` name it as the folder read back names it (`prepare.dataset_dir`), so a
    relative ``data.cache_dir`` is one absolute path in all of them."""
    return (Path(cache_dir).expanduser() if cache_dir is not None else DEFAULT_CACHE_DIR).resolve()


def _cache_folder(settings: dict[str, Any], cache_dir: str | os.PathLike | None) -> Path:
    """The cache folder of `settings` under `cache_dir` (`cache_root`)."""
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]
    return cache_root(cache_dir) / f"text-{key}"


@contextmanager
def library_progress_bars(enabled: bool, datasets_too: bool = True) -> Iterator[None]:
    """With `enabled` False, no progress bars from `datasets` (tokenize, pack, save_to_disk, load_from_disk) or
    `huggingface_hub` (hub downloads) inside the block; each library's previous setting is restored after it.

    Both switches are process-wide, so a caller that prints its own progress as plain lines (``train
    --no-progress``) turns the libraries' bars off around the work that builds its data. With `datasets_too`
    False, `datasets` is left alone and not imported: work that never reads text data (an MQAR run) would
    otherwise pay its import, about a second of start-up, for a switch nothing reads.
    """
    if enabled:
        yield
        return
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    datasets = None
    if datasets_too:
        import datasets
    datasets_on = datasets is not None and datasets.is_progress_bar_enabled()
    hub_on = not are_progress_bars_disabled()
    if datasets_on:
        datasets.disable_progress_bars()
    if hub_on:
        disable_progress_bars()
    try:
        yield
    finally:
        if datasets_on:
            datasets.enable_progress_bars()
        if hub_on:
            enable_progress_bars()


def source_kind(source: str) -> str:
    """Classify a data source: text-file, jsonl-file, folder, disk, packed, hub; raise if a local path is missing."""
    path = Path(source)
    if path.is_file():
        if path.suffix not in TEXT_SUFFIXES + JSONL_SUFFIXES:
            raise ValueError(data_path_error(source, f"unsupported file type {path.suffix!r}; use .txt, .md or "
                                                     ".jsonl"))
        problem = file_start_problem(path)
        if problem:
            raise ValueError(data_path_error(source, problem))
        return "text-file" if path.suffix in TEXT_SUFFIXES else "jsonl-file"
    if path.is_dir():
        if _is_saved_dataset(path):
            return "packed" if _is_packed(path) else "disk"
        return "folder" if _text_files(path) else "load_dataset"
    if not may_be_hub_name(source):
        raise FileNotFoundError(data_path_error(source, "no such file or folder (a hub dataset would be named "
                                                        "owner/name, e.g. roneneldan/TinyStories)"))
    return "hub"


def check_source(source: str, text_column: str | None = None) -> str:
    """`source_kind`, and for a folder of text files a glance at each (`FOLDER_SNIFF_BYTES`), and for JSON lines
    the complete lines of the glance (`jsonl_document`; their key `text_column` too when it is given): a
    ValueError in `data_path_error`'s format for what the build would refuse after torch loads. What the glance
    does not reach is checked as the build reads it."""
    kind = source_kind(source)
    if kind in ("text-file", "jsonl-file"):
        files, budget = [Path(source)], SNIFF_BYTES
    elif kind == "folder":
        files, budget = _text_files(Path(source)), FOLDER_SNIFF_BYTES
    else:
        return kind
    for file in files:
        problem = glance_problem(file, budget, text_column, in_folder=kind == "folder")
        if problem:
            raise ValueError(data_path_error(source, problem, file))
    return kind


def glance_problem(file: Path, budget: int, text_column: str | None, in_folder: bool) -> str | None:
    """What the first `budget` bytes of `file` show the build would refuse, or None. An empty file is a problem
    alone (a folder's build skips it, as an empty document)."""
    size = file.stat().st_size
    if size == 0:
        return None if in_folder else "no text (an empty file)"
    with file.open("rb") as f:
        start = f.read(budget)
    whole = len(start) == size
    problem = binary_problem(start) or utf8_problem(start, file, whole)
    if problem or file.suffix not in JSONL_SUFFIXES:
        return problem
    lines = start.split(b"\n")
    if not whole:
        lines.pop()  # cut by the glance: the build reads it whole
    for number, line in enumerate(lines, 1):
        if line.strip():
            _, problem = jsonl_document(line.decode("utf-8"), number, text_column)
            if problem:
                return problem
    return None


def data_path_error(source: str | os.PathLike, problem: str, file: Path | None = None) -> str:
    """The one format of every problem with the data a recipe names: ``data.path <source>: <problem>``, and the
    file inside a folder source it is in, ``data.path <folder>: <file>: <problem>``, so `train`, `data prepare`
    and `eval --data` word a missing, empty, binary or mis-encoded file alike."""
    where = f"{source}: {file}" if file is not None and Path(file) != Path(source) else f"{source}"
    return f"data.path {where}: {problem}"


def file_start_problem(file: Path) -> str | None:
    """What makes `file` no UTF-8 text at a glance, or None: no bytes at all, or its first `SNIFF_BYTES` binary
    (`binary_problem`) or not UTF-8 (`utf8_problem`). A glance, not a read: a large corpus is checked this way
    before torch loads, and the rest of it as it is read (`read_utf8`)."""
    if file.stat().st_size == 0:
        return "no text (an empty file)"
    with file.open("rb") as f:
        start = f.read(SNIFF_BYTES)
    return binary_problem(start) or utf8_problem(start, file, whole=len(start) == file.stat().st_size)


def utf8_problem(data: bytes, file: Path, whole: bool = True) -> str | None:
    """Why `data` (the bytes of `file`, all of them when `whole`, else its start, whose last character may be
    cut) is not UTF-8, naming the byte, its offset and line and the command that converts the file; or None."""
    try:
        codecs.getincrementaldecoder("utf-8")().decode(data, final=whole)
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        return (f"not UTF-8 text: byte 0x{data[err.start]:02x} at offset {err.start} (line {line}) {err.reason}; "
                f"convert it, e.g. iconv -f latin1 -t utf-8 {shlex.quote(str(file))} > "
                f"{shlex.quote(file.stem + '.utf8' + file.suffix)}")  # quoted: the command is pasted into a shell
    return None


def binary_problem(data: bytes) -> str | None:
    """Why `data` is no UTF-8 text at a glance, or None: UTF-16 (its byte-order mark; every ASCII letter then
    comes with a NUL byte), or a NUL byte, at its offset, as in a binary file."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return ("not UTF-8 text: UTF-16 (it starts with a UTF-16 byte-order mark); convert it with iconv -f utf-16 "
                "-t utf-8")
    offset = data.find(b"\0")
    if offset < 0:
        return None
    return (f"not text: a NUL byte at offset {offset}, as in a binary file; give UTF-8 text (.txt, .md) or JSON "
            "lines (.jsonl)")


def pack_blocks(tokenized: Dataset, block_size: int, cache_file: str | None = None,
                advance: Callable[[int], None] | None = None) -> Dataset:
    """Concatenate the ``ids`` column in order and cut it into ``block_size`` blocks (tail dropped); `advance`
    is told the documents of each batch done."""
    from datasets import Features, Sequence, Value

    column = Sequence(Value("int64"), length=block_size)
    return tokenized.map(
        _Packer(block_size, advance),
        batched=True,
        batch_size=MAP_BATCH,
        remove_columns=tokenized.column_names,
        features=Features({"input_ids": column, "labels": column}),
        cache_file_name=cache_file,
        load_from_cache_file=False,
        desc="pack",
    )


class _Packer:
    """Batched-map function that carries the unfinished block over to the next batch.

    `datasets.map` runs batches in order in one process (no num_proc), so the
    carried remainder makes the packing exactly that of the whole token stream.
    """

    def __init__(self, block_size: int, advance: Callable[[int], None] | None = None) -> None:
        self.block_size = block_size
        self.advance = advance
        self.carry: list[int] = []

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        if self.advance is not None:
            self.advance(len(batch["ids"]))
        stream = self.carry
        for ids in batch["ids"]:
            stream.extend(ids)
        full = len(stream) // self.block_size * self.block_size
        blocks = [stream[i : i + self.block_size] for i in range(0, full, self.block_size)]
        self.carry = stream[full:]
        return {"input_ids": blocks, "labels": [list(b) for b in blocks]}


# ----------------------------------------------------------------------------- building
def _build_cache(
    source: str,
    kind: str,
    tokenizer_name: str,
    block_size: int,
    eval_fraction: float,
    text_column: str,
    settings: dict[str, Any],
    final: Path,
    progress: BuildProgress | None = None,
) -> None:
    """Tokenize, pack, split and save under `final` via a temporary folder and a rename."""
    from datasets import DatasetDict

    progress = progress or BuildProgress(lambda line: None)
    tokenizer = load_tokenizer(tokenizer_name)
    # First the cache's folder, which a later run with these data settings reads instead of the source. Files
    # this module reads are said before the read, the long part of a large corpus (its start passed the glance,
    # `check_source`); what `datasets` loads, after it: a source that cannot be read is its error line alone.
    read_here = kind in ("text-file", "jsonl-file", "folder")
    if read_here:
        progress.stage(f"building the data cache {final}: reading {source}")
    docs = _documents(source, kind, text_column)
    if not read_here:
        progress.stage(f"building the data cache {final} from {source}")
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        progress.stage(f"tokenizing {len(docs):,} document{'s' if len(docs) != 1 else ''} of {source} (tokenizer "
                       f"{tokenizer_name})", len(docs), "documents")
        tokens = _tokenize_documents(docs, tokenizer, text_column, str(work / "tokens.arrow"), progress.advance)
        total = _count_tokens(tokens)
        if total == 0:
            raise ValueError(data_path_error(source, "no text (every document is empty)"))
        progress.stage(f"packing {total:,} tokens into blocks of {block_size}", len(tokens), "documents")
        packed = pack_blocks(tokens, block_size, str(work / "blocks.arrow"), progress.advance)
        train, evaluation = _split(packed, eval_fraction, total, block_size, source)
        out = work / "dataset"
        progress.stage(f"saving {len(packed):,} blocks into {final}")
        DatasetDict({"train": train, "eval": evaluation}).save_to_disk(str(out))
        meta = dict(settings, tokens=total, blocks=len(packed), train_blocks=len(train), eval_blocks=len(evaluation))
        (out / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
        try:
            os.replace(out, final)
        except OSError:
            if not (final / "meta.json").is_file():  # not a concurrent writer that won
                raise
        progress.finish("built")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _tokenize_documents(docs: Dataset, tokenizer: Any, text_column: str, cache_file: str,
                        advance: Callable[[int], None]) -> Dataset:
    """Batched map: each non-empty document's ids followed by eos; `advance` is told each batch's documents."""
    from datasets import Features, Sequence, Value

    eos = eos_token_id(tokenizer)

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        advance(len(batch[text_column]))
        return {"ids": [ids + [eos] if ids else [] for ids in encode_batch(tokenizer, batch[text_column])]}

    return docs.map(
        tokenize,
        batched=True,
        batch_size=MAP_BATCH,
        remove_columns=docs.column_names,
        features=Features({"ids": Sequence(Value("int64"))}),
        cache_file_name=cache_file,
        load_from_cache_file=False,
        desc="tokenize",
    )


def _split(packed: Dataset, eval_fraction: float, total: int, block_size: int, source: str) -> tuple[Dataset, Dataset]:
    """The last `eval_fraction` of the blocks (at least one) is the eval split."""
    blocks = len(packed)
    if blocks < 2:
        raise ValueError(data_path_error(
            source, f"{total} tokens make {blocks} block(s) of block_size {block_size}; need at least 2 blocks "
                    f"({2 * block_size} tokens) for a train and an eval split"))
    n_eval = min(blocks - 1, max(1, round(blocks * eval_fraction)))
    return packed.select(range(blocks - n_eval)), packed.select(range(blocks - n_eval, blocks))


def _documents(source: str, kind: str, text_column: str) -> Dataset:
    """The source as a Dataset with one document per row in `text_column`, non-empty."""
    from datasets import Dataset, load_dataset, load_from_disk

    if kind in ("text-file", "jsonl-file", "folder"):
        files = [Path(source)] if kind != "folder" else _text_files(Path(source))
        docs = Dataset.from_dict({text_column: list(_read_files(source, files, text_column))})
    elif kind == "disk":
        docs = load_from_disk(source)
    else:
        if kind == "hub":
            check_hub_dataset(source)  # an unreachable hub: one error now, not after load_dataset's retries
        try:
            docs = load_dataset(source, split="train")
        except Exception as err:  # noqa: BLE001 - datasets raises many types; report them all the same way
            if kind == "hub" and datasets_offline():
                raise offline_error(source, err) from None
            if kind == "hub":
                raise FileNotFoundError(data_path_error(source, f"not a local path, nor a hub dataset: {err}")
                                        ) from None
            raise ValueError(data_path_error(source, "no .txt/.md/.jsonl files in this folder, and "
                                                     f"datasets.load_dataset cannot read it either: {err}")) from None
    if hasattr(docs, "keys"):  # DatasetDict: prefer train
        docs = docs["train"] if "train" in docs else docs[next(iter(docs))]
    if text_column not in docs.column_names:
        raise ValueError(data_path_error(source, f"no column {text_column!r} (data.text_column); its columns: "
                                                 f"{', '.join(docs.column_names)}"))
    if len(docs) == 0:
        raise ValueError(data_path_error(source, "no text (no documents)"))
    return docs.select_columns([text_column])


def _read_files(source: str, files: list[Path], text_column: str) -> Iterable[str]:
    for file in files:
        if file.suffix in JSONL_SUFFIXES:
            yield from _read_jsonl(source, file, text_column)
        else:
            yield read_utf8(file, source)


def read_utf8(file: Path, source: str | None = None) -> str:
    """The text of `file`; a ValueError in `data_path_error`'s format (`source`: the folder it was found in)
    when it holds a NUL byte (binary) or is not UTF-8, naming the byte, its offset and line."""
    data = file.read_bytes()
    source = str(file) if source is None else source
    problem = binary_problem(data)
    if problem:
        raise ValueError(data_path_error(source, problem, file))
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(data_path_error(source, str(utf8_problem(data, file)), file)) from None


def _read_jsonl(source: str, file: Path, text_column: str) -> Iterable[str]:
    for number, line in enumerate(read_utf8(file, source).split("\n"), 1):
        if not line.strip():
            continue
        document, problem = jsonl_document(line, number, text_column)
        if problem:
            raise ValueError(data_path_error(source, problem, file))
        yield document


def jsonl_document(line: str, number: int, text_column: str | None) -> tuple[Any, str | None]:
    """``(document, None)`` for line `number` of a JSON-lines file, or ``(None, why it is no document)``: not JSON,
    not an object, or without the key `text_column` or a string under it. With `text_column` None (not known
    yet) only the first two are checked, and the document is the whole object."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        return None, f"line {number} is not JSON: {err.msg} at column {err.colno}"
    if text_column is None:
        if isinstance(record, dict):
            return record, None
        return None, f"line {number} is a JSON {type(record).__name__}, not an object"
    if not isinstance(record, dict) or text_column not in record:
        keys = (f"its keys: {', '.join(sorted(record))}" if isinstance(record, dict) else
                f"a JSON {type(record).__name__}, not an object")
        return None, f"line {number} has no key {text_column!r} (data.text_column; {keys})"
    if not isinstance(record[text_column], str):
        return None, (f"line {number}: {text_column!r} (data.text_column) holds {type(record[text_column]).__name__} "
                      f"{record[text_column]!r}, not a string")
    return record[text_column], None


def _load_packed(source: str, block_size: int) -> DatasetDict:
    """A folder this module wrote (train/eval of packed blocks): use it directly."""
    from datasets import load_from_disk

    packed = load_from_disk(source)
    length = len(packed["train"][0]["input_ids"])
    if length != block_size:
        raise ValueError(
            f"data.path {source}: holds packed blocks of {length} tokens but data.block_size is {block_size}"
        )
    return packed


def _text_files(folder: Path) -> list[Path]:
    suffixes = TEXT_SUFFIXES + JSONL_SUFFIXES
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in suffixes and not p.name.startswith("."))


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def _is_packed(folder: Path) -> bool:
    if not (folder / "dataset_dict.json").is_file():
        return False
    splits = json.loads((folder / "dataset_dict.json").read_text())["splits"]
    return {"train", "eval"} <= set(splits) and (folder / "train" / "state.json").is_file() and _has_columns(folder)


def _has_columns(folder: Path) -> bool:
    info = json.loads((folder / "train" / "dataset_info.json").read_text())
    return {"input_ids", "labels"} <= set(info.get("features", {}))


def _source_fingerprint(source: str, kind: str) -> str:
    """Paths, sizes and mtimes of every file under a local source; the name of a hub dataset."""
    path = Path(source)
    if kind == "hub":
        return source
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    parts = [f"{p.relative_to(path) if p != path else p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files]
    return str(path.resolve()) + "|" + ";".join(parts)


def _count_tokens(tokens: Dataset) -> int:
    import pyarrow.compute as pc

    return int(pc.sum(pc.list_value_length(tokens.data.column("ids"))).as_py() or 0)
