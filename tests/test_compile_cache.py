"""`bmojo-neuron cache`: the Neuron compile-cache layout, ls/verify/prune, and S3 push/pull (moto server).

Cache trees are built here in the layout docs/compile-cache.md documents
(``neuronxcc-<version>/MODULE_<graph>+<flags>/`` with model.hlo_module.pb,
compile_flags.json, model.neff, model.done, model.log, *.lock); ages are set with
os.utime. The S3 tests talk to a real S3 API served locally by moto.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import socket
import sys
import time
import uuid
from pathlib import Path

import pytest
from rank_processes import start_ranks

from bmojo_neuron.cli import main
from bmojo_neuron.compile_cache.local import QUIET_SECONDS, LocalCache
from bmojo_neuron.compile_cache.location import DEFAULT_CACHE_DIR, parse_s3_url, resolve_cache_dir
from bmojo_neuron.compile_cache.units import parse_size

VERSION = "neuronxcc-2.23.6484.0+ab12cd34"
DAY = 86400

# files of each entry state (the independent expectation: the states docs/compile-cache.md lists)
KINDS = {
    "ok": ["model.hlo_module.pb", "compile_flags.json", "model.neff", "model.done"],
    "failed": ["model.hlo_module.pb", "compile_flags.json", "model.log"],
    "extracted": ["model.hlo_module.pb", "compile_flags.json"],
    "locked": ["model.hlo_module.pb", "compile_flags.json", "model.hlo_module.pb.lock"],
    "neff_no_done": ["model.hlo_module.pb", "compile_flags.json", "model.neff"],
}
EXPECTED_STATUS = {"ok": "ok", "failed": "failed", "extracted": "incomplete", "locked": "incomplete",
                   "neff_no_done": "incomplete"}


def make_entry(root: Path, module: str, kind: str = "ok", age_days: float = 0.0, size: int = 1000,
               version: str = VERSION, lock_age_days: float | None = None) -> Path:
    """One entry of `kind`; model.neff holds `size` random-ish bytes; every file is `age_days` old."""
    folder = root / version / f"MODULE_{module}+d41d8cd9"
    folder.mkdir(parents=True)
    for name in KINDS[kind]:
        data = {"model.neff": os.urandom(size), "compile_flags.json": b'["-O1"]',
                "model.log": b"ERROR: compilation failed\nNCC_ABC123: something broke\n"}.get(name, b"hlo" * 10)
        (folder / name).write_bytes(data if not name.endswith((".done", ".lock")) else b"")
    stamp = time.time() - age_days * DAY
    for f in folder.iterdir():
        os.utime(f, (stamp, stamp))
        if f.name.endswith(".lock") and lock_age_days is not None:
            lock_stamp = time.time() - lock_age_days * DAY
            os.utime(f, (lock_stamp, lock_stamp))
    return folder


def entry_key(module: str, version: str = VERSION) -> str:
    return f"{version}/MODULE_{module}+d41d8cd9"


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def keys_in(root: Path) -> set[str]:
    return {e.key for e in LocalCache(root).entries()}


# ------------------------------------------------------------------ layout, location, units
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_entry_status_follows_the_files(tmp_path, kind):
    make_entry(tmp_path, "1", kind)
    (entry,) = LocalCache(tmp_path).entries()
    assert entry.status == EXPECTED_STATUS[kind]
    assert entry.compiler_version == "2.23.6484.0+ab12cd34" and entry.module == "MODULE_1+d41d8cd9"
    assert entry.size == sum(f.stat().st_size for f in (tmp_path / entry.key).iterdir())


def test_listing_ignores_what_is_not_an_entry(tmp_path):
    make_entry(tmp_path, "1")
    (tmp_path / VERSION / "0_REGISTRY").mkdir()  # optimum-neuron's registry folder
    (tmp_path / VERSION / ".bmojo-tmp-MODULE_9+x-abc").mkdir()
    (tmp_path / ".bmojo-locks").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "other").mkdir()
    empty = tmp_path / VERSION / "MODULE_2+d41d8cd9"
    empty.mkdir()
    entries = {e.key: e for e in LocalCache(tmp_path).entries()}
    assert set(entries) == {entry_key("1"), entry_key("2")}
    assert entries[entry_key("2")].status == "incomplete" and entries[entry_key("2")].size == 0


def test_cache_dir_precedence_matches_the_neuron_wrapper():
    flags = "--model-type transformer --cache_dir=/from/flags -O1"
    env = {"NEURON_CC_FLAGS": flags, "NEURON_COMPILE_CACHE_URL": "s3://bucket/url"}
    assert resolve_cache_dir("/explicit", env) == ("/explicit", "--cache-dir")
    assert resolve_cache_dir(None, env) == ("/from/flags", "--cache_dir in NEURON_CC_FLAGS")
    assert resolve_cache_dir(None, {"NEURON_CC_FLAGS": "--cache_dir /a --cache_dir=/b"})[0] == "/b"
    assert resolve_cache_dir(None, {"NEURON_CC_FLAGS": "-O1", "NEURON_COMPILE_CACHE_URL": "s3://b/u"}) == (
        "s3://b/u", "NEURON_COMPILE_CACHE_URL")
    assert resolve_cache_dir(None, {}) == ("/var/tmp/neuron-compile-cache", "default")
    from bmojo_neuron.launch import plan

    assert DEFAULT_CACHE_DIR == plan.DEFAULT_CACHE_DIR


BAD_LOCATIONS = ["s3:/typo", "s3:bucket", "S3://x", "gs://x", "https://x/y", "s3:///x", "s3://b/a//c"]


@pytest.mark.parametrize("bad", BAD_LOCATIONS)
def test_a_malformed_cache_url_is_refused_from_every_source(bad):
    with pytest.raises(ValueError, match="^--cache-dir"):
        resolve_cache_dir(bad, {})
    with pytest.raises(ValueError, match="^--cache_dir in NEURON_CC_FLAGS"):
        resolve_cache_dir(None, {"NEURON_CC_FLAGS": f"--cache_dir={bad}"})
    with pytest.raises(ValueError, match="^NEURON_COMPILE_CACHE_URL"):
        resolve_cache_dir(None, {"NEURON_COMPILE_CACHE_URL": bad})


@pytest.mark.parametrize("good", ["cache", "./s3:bucket", "runs/neff-cache", "/var/tmp/x", "s3://b", "s3://b/p/q"])
def test_local_paths_and_s3_urls_are_taken_as_given(good):
    assert resolve_cache_dir(good, {}) == (good, "--cache-dir")


@pytest.mark.parametrize("command", [["cache", "ls"], ["plan", "trn1/bmojo-130m"],
                                     ["precompile", "trn1/bmojo-130m", "--dry-run"]])
@pytest.mark.parametrize("bad", ["s3:/typo", "S3://x"])
def test_commands_refuse_a_malformed_cache_url_with_one_line(capsys, command, bad):
    code, out, err = cli(capsys, *command, "--cache-dir", bad)
    assert code == 2 and out == ""
    assert err == (f"error: --cache-dir is {bad!r}, which looks like a URL but is not s3://bucket[/prefix], the "
                   f"only remote cache; for a local folder with a colon in its name write ./{bad}\n")


def test_sizes_and_s3_urls():
    assert parse_size("50G") == 50 * 2**30
    assert parse_size("1.5M") == 3 * 2**19
    assert parse_size("2GiB") == parse_size("2gb") == 2 * 2**30
    assert parse_size("100") == 100
    with pytest.raises(ValueError, match="50X"):
        parse_size("50X")
    assert parse_s3_url("s3://my-bucket/a/b/") == ("my-bucket", "a/b")
    assert parse_s3_url("s3://my-bucket") == ("my-bucket", "")
    for bad in ("s3:///x", "https://x/y", "s3://b/a//c"):
        with pytest.raises(ValueError):
            parse_s3_url(bad)


# ------------------------------------------------------------------ ls and verify
def test_ls_table_and_totals(tmp_path, capsys):
    make_entry(tmp_path, "1", "ok", age_days=3, size=2048)
    make_entry(tmp_path, "2", "failed", age_days=1)
    make_entry(tmp_path, "3", "extracted")
    code, out, _ = cli(capsys, "cache", "ls", "--cache-dir", str(tmp_path))
    assert code == 0
    rows = {line.split()[1]: line for line in out.splitlines() if "MODULE_" in line}
    assert "ok" in rows["MODULE_1+d41d8cd9"] and "3d" in rows["MODULE_1+d41d8cd9"]
    assert "failed" in rows["MODULE_2+d41d8cd9"] and "incomplete" in rows["MODULE_3+d41d8cd9"]
    assert "HLO extracted, not compiled" in rows["MODULE_3+d41d8cd9"]
    assert "3 entries" in out and "1 ok, 1 failed, 1 incomplete" in out


def test_ls_json_sizes_and_ages(tmp_path, capsys):
    make_entry(tmp_path, "1", "ok", age_days=2, size=5000)
    make_entry(tmp_path, "2", "locked", age_days=0.5)
    code, out, _ = cli(capsys, "cache", "--cache-dir", str(tmp_path), "ls", "--json")
    assert code == 0
    report = json.loads(out)
    rows = {r["module"]: r for r in report["entries"]}
    expected_size = 5000 + len(b"hlo" * 10) + len(b'["-O1"]')  # neff + hlo + flags (+ empty done)
    assert rows["MODULE_1+d41d8cd9"]["size"] == expected_size
    assert abs(rows["MODULE_1+d41d8cd9"]["age_s"] - 2 * DAY) < 60
    assert abs(rows["MODULE_2+d41d8cd9"]["age_s"] - DAY / 2) < 60
    assert rows["MODULE_2+d41d8cd9"]["status"] == "incomplete" and "lock" in rows["MODULE_2+d41d8cd9"]["detail"]
    assert report["totals"] == {"ok": 1, "failed": 0, "incomplete": 1, "entries": 2,
                                "bytes": sum(r["size"] for r in report["entries"])}


def test_cache_dir_comes_from_the_environment(tmp_path, capsys, monkeypatch):
    flags_dir, url_dir = tmp_path / "flags", tmp_path / "url"
    make_entry(flags_dir, "1")
    make_entry(url_dir, "2")
    monkeypatch.setenv("NEURON_COMPILE_CACHE_URL", str(url_dir))
    monkeypatch.setenv("NEURON_CC_FLAGS", f"-O1 --cache_dir={flags_dir}")
    code, out, _ = cli(capsys, "cache", "ls")
    assert code == 0 and "MODULE_1+" in out and "MODULE_2+" not in out and "NEURON_CC_FLAGS" in out
    monkeypatch.setenv("NEURON_CC_FLAGS", "-O1")
    code, out, _ = cli(capsys, "cache", "ls")
    assert code == 0 and "MODULE_2+" in out and "MODULE_1+" not in out


def test_ls_of_a_missing_cache_is_a_clear_error(tmp_path, capsys):
    code, out, err = cli(capsys, "cache", "ls", "--cache-dir", str(tmp_path / "nope"))
    assert code == 2 and out == ""
    assert err == f"error: compile cache {tmp_path / 'nope'} does not exist (from --cache-dir)\n"
    (tmp_path / "file").write_text("")
    code, out, err = cli(capsys, "cache", "verify", "--cache-dir", str(tmp_path / "file"))
    assert (code, out, err) == (2, "", f"error: compile cache {tmp_path / 'file'} is a file, not a folder (from "
                                       "--cache-dir)\n")


def test_verify_exit_status(tmp_path, capsys):
    make_entry(tmp_path, "1", "ok")
    make_entry(tmp_path, "2", "ok")
    code, out, _ = cli(capsys, "cache", "verify", "--cache-dir", str(tmp_path))
    assert code == 0 and "2 ok, 0 failed, 0 incomplete" in out
    make_entry(tmp_path, "3", "failed")
    make_entry(tmp_path, "4", "neff_no_done")
    code, out, _ = cli(capsys, "cache", "verify", "--cache-dir", str(tmp_path))
    assert code == 1
    assert f"failed     {entry_key('3')}" in out and f"incomplete {entry_key('4')}" in out
    assert entry_key("1") not in out and "prune --failed" in out
    code, out, _ = cli(capsys, "cache", "verify", "--json", "--cache-dir", str(tmp_path))
    assert code == 1 and {p["module"] for p in json.loads(out)["problems"]} == {"MODULE_3+d41d8cd9",
                                                                                 "MODULE_4+d41d8cd9"}
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli(capsys, "cache", "verify", "--cache-dir", str(empty))[0] == 0


# ------------------------------------------------------------------ prune
def test_prune_older_than_and_dry_run(tmp_path, capsys):
    make_entry(tmp_path, "old", age_days=40)
    make_entry(tmp_path, "new", age_days=10)
    code, out, _ = cli(capsys, "cache", "prune", "--older-than", "30", "--dry-run", "--cache-dir", str(tmp_path))
    assert code == 0 and f"would remove {entry_key('old')}" in out and entry_key("new") not in out
    assert keys_in(tmp_path) == {entry_key("old"), entry_key("new")}  # dry run deleted nothing
    code, out, _ = cli(capsys, "cache", "prune", "--older-than", "30", "--cache-dir", str(tmp_path))
    assert code == 0 and "removed 1 entry, freed" in out
    assert keys_in(tmp_path) == {entry_key("new")}
    assert not [p for p in (tmp_path / VERSION).iterdir() if p.name.startswith(".bmojo-")]  # no leftovers


def test_prune_max_size_removes_oldest_first(tmp_path, capsys):
    for module, age in (("a", 4), ("b", 3), ("c", 2), ("d", 1)):
        make_entry(tmp_path, module, age_days=age, size=1000)
    entry_size = LocalCache(tmp_path).entries()[0].size
    budget = 2 * entry_size + entry_size // 2  # room for two and a half entries
    code, out, _ = cli(capsys, "cache", "prune", "--max-size", str(budget), "--cache-dir", str(tmp_path))
    assert code == 0
    assert keys_in(tmp_path) == {entry_key("c"), entry_key("d")}
    assert sum(e.size for e in LocalCache(tmp_path).entries()) <= budget


def test_prune_failed_only(tmp_path, capsys):
    make_entry(tmp_path, "ok", age_days=5)
    make_entry(tmp_path, "bad", "failed", age_days=5)
    make_entry(tmp_path, "ext", "extracted", age_days=5)
    code, _, _ = cli(capsys, "cache", "prune", "--failed", "--cache-dir", str(tmp_path))
    assert code == 0 and keys_in(tmp_path) == {entry_key("ok"), entry_key("ext")}


def test_prune_never_removes_an_entry_in_use(tmp_path, capsys):
    make_entry(tmp_path, "compiling", "locked", age_days=40, lock_age_days=2 / 24)  # lock 2 h old: held
    make_entry(tmp_path, "stale", "locked", age_days=40, lock_age_days=3)  # a killed compile's lock
    make_entry(tmp_path, "writing", "extracted", age_days=(QUIET_SECONDS / 2) / DAY)  # written 5 min ago
    make_entry(tmp_path, "pulling", "ok", age_days=40)
    make_entry(tmp_path, "idle", "ok", age_days=40)
    cache = LocalCache(tmp_path)
    with cache.entry_lock(VERSION, "MODULE_pulling+d41d8cd9"):  # as a pull of this entry holds it
        code, out, _ = cli(capsys, "cache", "prune", "--max-size", "0", "--cache-dir", str(tmp_path))
    assert code == 0
    assert keys_in(tmp_path) == {entry_key("compiling"), entry_key("writing"), entry_key("pulling")}
    assert "in use" in out and "lock file" in out and "still being written" in out


def test_prune_renames_before_deleting(tmp_path, capsys, monkeypatch):
    """Killed between the rename and the delete: the entry is already gone from the layout, whole."""
    from bmojo_neuron.compile_cache import local

    make_entry(tmp_path, "old", age_days=40)
    monkeypatch.setattr(local.shutil, "rmtree", lambda *a, **k: None)  # the delete "never happens"
    assert cli(capsys, "cache", "prune", "--older-than", "1", "--cache-dir", str(tmp_path))[0] == 0
    assert keys_in(tmp_path) == set()
    (trash,) = [p for p in (tmp_path / VERSION).iterdir()]
    assert trash.name.startswith(".bmojo-trash-") and (trash / "model.neff").stat().st_size == 1000
    monkeypatch.undo()
    assert cli(capsys, "cache", "prune", "--failed", "--cache-dir", str(tmp_path))[0] == 0
    assert list((tmp_path / VERSION).iterdir()) == []  # the next prune swept the leftover


@pytest.mark.parametrize("noreplace_syscall", [True, False])
def test_install_never_replaces_an_existing_entry(tmp_path, monkeypatch, noreplace_syscall):
    from bmojo_neuron.compile_cache import local

    if not noreplace_syscall:
        monkeypatch.setattr(local, "_renameat2", None)  # the fallback: existence check, then rename
    cache = LocalCache(tmp_path)
    module = "MODULE_1+d41d8cd9"
    (tmp_path / VERSION / module).mkdir(parents=True)  # e.g. the compiler just created it, still empty
    staging = cache.new_staging_dir(VERSION, module)
    (staging / "model.neff").write_bytes(b"neff")
    assert cache.install(staging, VERSION, module) is False
    assert os.listdir(tmp_path / VERSION / module) == [] and (staging / "model.neff").is_file()
    other = cache.new_staging_dir(VERSION, "MODULE_2+d41d8cd9")
    (other / "model.neff").write_bytes(b"neff")
    assert cache.install(other, VERSION, "MODULE_2+d41d8cd9") is True and not other.exists()
    assert (tmp_path / VERSION / "MODULE_2+d41d8cd9" / "model.neff").read_bytes() == b"neff"


def test_prune_argument_errors(tmp_path, capsys):
    make_entry(tmp_path, "1")
    code, _, err = cli(capsys, "cache", "prune", "--cache-dir", str(tmp_path))
    assert code == 2 and "--older-than" in err and "--max-size" in err and "--failed" in err
    code, _, err = cli(capsys, "cache", "prune", "--max-size", "lots", "--cache-dir", str(tmp_path))
    assert code == 2 and "--max-size" in err and "lots" in err
    code, _, err = cli(capsys, "cache", "prune", "--failed", "--cache-dir", "s3://some-bucket/cache")
    assert code == 2 and "local cache folder" in err


def test_missing_boto3_names_the_extra(tmp_path, capsys, monkeypatch):
    make_entry(tmp_path, "1")
    monkeypatch.setitem(sys.modules, "boto3", None)  # import boto3 -> ImportError
    code, _, err = cli(capsys, "cache", "push", "s3://some-bucket/cache", "--cache-dir", str(tmp_path))
    assert code == 2 and 'pip install "bmojo-neuron[s3]"' in err


# ------------------------------------------------------------------ S3 (moto server)
@pytest.fixture(scope="module")
def moto_endpoint():
    server_module = pytest.importorskip("moto.server", reason="moto[server] (the dev extra) is not installed")
    pytest.importorskip("boto3", reason="boto3 (the s3/dev extra) is not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def bucket(moto_endpoint, monkeypatch):
    """A fresh bucket on the local S3 API; returns its s3:// URL with a prefix."""
    import boto3

    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": moto_endpoint}.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(key, raising=False)
    name = f"cache-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}/team/neuron-cache"


def objects(url: str) -> dict[str, bytes]:
    import boto3

    name, prefix = parse_s3_url(url)
    client = boto3.client("s3")
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=name)
            for o in page.get("Contents", [])]
    return {k[len(prefix) + 1:]: client.get_object(Bucket=name, Key=k)["Body"].read() for k in keys}


def file_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_push_then_pull_round_trip(tmp_path, capsys, bucket):
    src, dst = tmp_path / "src", tmp_path / "dst"
    good = [make_entry(src, m, age_days=1, size=3000) for m in ("1", "2")]
    make_entry(src, "3", "failed", age_days=1)
    make_entry(src, "4", "extracted", age_days=1)
    code, out, _ = cli(capsys, "cache", "push", bucket, "--cache-dir", str(src))
    assert code == 0 and "pushed 2 entries" in out and "not pushed" in out
    remote = objects(bucket)
    for folder in good:
        key = f"{folder.parent.name}/{folder.name}"
        marker = json.loads(remote[f"{key}/.bmojo-complete"])
        assert marker["entry"] == key
        assert marker["files"] == {name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                                   for name, data in file_bytes(folder).items()}
        assert all(remote[f"{key}/{name}"] == data for name, data in file_bytes(folder).items())
    assert not any("MODULE_3" in k or "MODULE_4" in k for k in remote)  # failed / incomplete stay local
    assert not any(k.startswith(".bmojo-staging/") for k in remote)  # staging copies dropped

    code, out, _ = cli(capsys, "cache", "pull", bucket, "--cache-dir", str(dst))
    assert code == 0 and "pulled 2 entries" in out
    assert keys_in(dst) == {entry_key("1"), entry_key("2")}
    for folder in good:
        assert file_bytes(dst / folder.parent.name / folder.name) == file_bytes(folder)
    assert all(e.status == "ok" for e in LocalCache(dst).entries())

    code, out, _ = cli(capsys, "cache", "push", bucket, "--cache-dir", str(src))
    assert code == 0 and "pushed 0 entries" in out and "2 already there" in out
    code, out, _ = cli(capsys, "cache", "pull", bucket, "--cache-dir", str(dst))
    assert code == 0 and "pulled 0 entries" in out and "2 already there" in out


def test_ls_and_verify_read_the_bucket_directly(tmp_path, capsys, bucket):
    from bmojo_neuron.compile_cache.s3 import S3Store

    make_entry(tmp_path, "1", size=1500)
    assert cli(capsys, "cache", "push", bucket, "--cache-dir", str(tmp_path))[0] == 0
    store = S3Store(bucket)
    store.put(f"{entry_key('2')}/model.neff", b"x" * 10)  # written without a marker, no model.done
    code, out, _ = cli(capsys, "cache", "ls", "--cache-dir", bucket)
    assert code == 0
    rows = {line.split()[1]: line.split() for line in out.splitlines() if "MODULE_" in line}
    assert rows["MODULE_1+d41d8cd9"][-1] == "yes" and "ok" in rows["MODULE_1+d41d8cd9"]
    assert rows["MODULE_2+d41d8cd9"][-1] == "no" and "incomplete:" in rows["MODULE_2+d41d8cd9"]
    code, out, _ = cli(capsys, "cache", "ls", "--json", "--cache-dir", bucket)
    published = {r["module"]: r["published"] for r in json.loads(out)["entries"]}
    assert published == {"MODULE_1+d41d8cd9": True, "MODULE_2+d41d8cd9": False}
    code, out, _ = cli(capsys, "cache", "verify", "--cache-dir", bucket)
    assert code == 1 and entry_key("2") in out


def test_s3_errors_are_clear(tmp_path, capsys, bucket):
    missing = bucket.replace("s3://cache-", "s3://nosuchbucket-")
    code, out, err = cli(capsys, "cache", "pull", missing, "--cache-dir", str(tmp_path))
    assert code == 2 and out == "" and missing.split("/")[2] in err and "NoSuchBucket" in err
    code, _, err = cli(capsys, "cache", "push", bucket, "--cache-dir", str(tmp_path / "nope"))
    assert code == 2 and "does not exist" in err
    code, _, err = cli(capsys, "cache", "pull", bucket, "--cache-dir", bucket)
    assert code == 2 and "local cache folder" in err


def test_interrupted_push_publishes_nothing_and_the_next_push_completes(tmp_path, bucket, monkeypatch):
    from bmojo_neuron.compile_cache import sync
    from bmojo_neuron.compile_cache.s3 import S3Store

    src = tmp_path / "src"
    folder = make_entry(src, "1", size=4000)
    real_upload, calls = S3Store.upload, []

    def flaky_upload(self, path, relpath):
        calls.append(relpath)
        if len(calls) == 3:
            raise ConnectionError("network dropped")
        return real_upload(self, path, relpath)

    monkeypatch.setattr(S3Store, "upload", flaky_upload)
    with pytest.raises(ConnectionError):
        sync.push(LocalCache(src), S3Store(bucket), log=lambda _: None)
    assert not any(k.endswith(".bmojo-complete") for k in objects(bucket))
    assert not any(k.startswith(entry_key("1")) for k in objects(bucket))  # only staging objects exist
    report = sync.pull(S3Store(bucket), LocalCache(tmp_path / "dst"), log=lambda _: None)
    assert report.done == [] and not (tmp_path / "dst" / entry_key("1")).exists()

    monkeypatch.setattr(S3Store, "upload", real_upload)  # the network is back
    report = sync.push(LocalCache(src), S3Store(bucket), log=lambda _: None)
    assert report.done == [entry_key("1")]
    report = sync.pull(S3Store(bucket), LocalCache(tmp_path / "dst"), log=lambda _: None)
    assert report.done == [entry_key("1")]
    assert file_bytes(tmp_path / "dst" / entry_key("1")) == file_bytes(folder)


def test_push_interrupted_while_publishing_leaves_no_marker(tmp_path, bucket, monkeypatch):
    from bmojo_neuron.compile_cache import sync
    from bmojo_neuron.compile_cache.s3 import S3Store

    make_entry(tmp_path / "src", "1")
    real_copy, calls = S3Store.copy, []

    def flaky_copy(self, src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise ConnectionError("killed while copying")
        return real_copy(self, src, dst)

    monkeypatch.setattr(S3Store, "copy", flaky_copy)
    with pytest.raises(ConnectionError):
        sync.push(LocalCache(tmp_path / "src"), S3Store(bucket), log=lambda _: None)
    final = [k for k in objects(bucket) if k.startswith(entry_key("1"))]
    assert len(final) == 1 and not final[0].endswith(".bmojo-complete")  # one file copied, not published
    report = sync.pull(S3Store(bucket), LocalCache(tmp_path / "dst"), log=lambda _: None)
    assert report.done == [] and report.skipped[0][0] == entry_key("1") and "not published" in report.skipped[0][1]


def test_pull_checks_the_marker(tmp_path, bucket):
    from bmojo_neuron.compile_cache import sync
    from bmojo_neuron.compile_cache.s3 import S3Store

    make_entry(tmp_path / "src", "1")
    make_entry(tmp_path / "src", "2")
    sync.push(LocalCache(tmp_path / "src"), S3Store(bucket), log=lambda _: None)
    store = S3Store(bucket)
    store.put(f"{entry_key('1')}/model.neff", os.urandom(1000))  # same size, other bytes: sha256 differs
    marker = json.loads(store.get(f"{entry_key('2')}/.bmojo-complete"))
    marker["files"]["model.neff"]["size"] = 999
    store.put(f"{entry_key('2')}/.bmojo-complete", json.dumps(marker).encode())
    dst = tmp_path / "dst"
    report = sync.pull(store, LocalCache(dst), log=lambda _: None)
    assert report.done == []
    why = dict(report.skipped)
    assert "SHA-256" in why[entry_key("1")] and "marker" in why[entry_key("2")]
    assert keys_in(dst) == set()
    assert not [p for p in (dst / VERSION).iterdir()]  # the rejected download left nothing behind


def test_pull_replaces_a_failed_local_entry_but_not_one_in_use(tmp_path, bucket):
    from bmojo_neuron.compile_cache import sync
    from bmojo_neuron.compile_cache.s3 import S3Store

    good1, good2 = make_entry(tmp_path / "src", "1"), make_entry(tmp_path / "src", "2")
    sync.push(LocalCache(tmp_path / "src"), S3Store(bucket), log=lambda _: None)
    dst = tmp_path / "dst"
    make_entry(dst, "1", "failed", age_days=1)  # idle failure: replaced
    make_entry(dst, "2", "locked", age_days=1, lock_age_days=0.01)  # a compile holds its lock: left alone
    report = sync.pull(S3Store(bucket), LocalCache(dst), log=lambda _: None)
    assert report.done == [entry_key("1")] and dict(report.skipped)[entry_key("2")].startswith("the local copy")
    assert file_bytes(dst / entry_key("1")) == file_bytes(good1)
    assert "model.hlo_module.pb.lock" in os.listdir(dst / entry_key("2"))
    assert good2.is_dir()


def _pull_worker(rank: int, url: str, cache_dir: str, barrier, out: str) -> None:
    from bmojo_neuron.compile_cache import sync
    from bmojo_neuron.compile_cache.local import LocalCache
    from bmojo_neuron.compile_cache.s3 import S3Store

    store, cache = S3Store(url), LocalCache(cache_dir)  # boto3 imported before the race starts
    barrier.wait(timeout=60)  # both start pulling together
    report = sync.pull(store, cache, log=lambda _: None)
    Path(out, f"pull{rank}.json").write_text(json.dumps([report.done, report.present, report.skipped]))


def test_concurrent_pulls_share_one_cache_safely(tmp_path, bucket):
    """Two pulls race for the same three entries of one shared cache: each entry is downloaded once, whole."""
    from bmojo_neuron.compile_cache import sync
    from bmojo_neuron.compile_cache.s3 import S3Store

    src = tmp_path / "src"
    folders = [make_entry(src, m, size=200_000) for m in ("1", "2", "3")]
    sync.push(LocalCache(src), S3Store(bucket), log=lambda _: None)
    dst = tmp_path / "shared"
    # forked from the suite's preloaded fork server (not from this process, which runs the moto server thread),
    # with this process's environment: the bucket's endpoint and credentials
    barrier = multiprocessing.get_context("forkserver").Barrier(2)
    start_ranks(_pull_worker, (bucket, str(dst), barrier, str(tmp_path)), nprocs=2)
    results = [json.loads((tmp_path / f"pull{rank}.json").read_text()) for rank in range(2)]
    done = [key for d, _, _ in results for key in d]
    assert sorted(done) == sorted(entry_key(m) for m in ("1", "2", "3"))  # each entry downloaded once
    assert all(not skipped for _, _, skipped in results)
    assert all(len(d) + len(p) == 3 for d, p, _ in results)
    for folder in folders:
        assert file_bytes(dst / folder.parent.name / folder.name) == file_bytes(folder)
    assert [p.name for p in (dst / VERSION).iterdir() if p.name.startswith(".bmojo-")] == []
