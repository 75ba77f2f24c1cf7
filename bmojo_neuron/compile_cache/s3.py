"""A compile cache in S3 (``s3://bucket/prefix``), through boto3, imported only when used.

Keys mirror the local layout: ``<prefix>/neuronxcc-<version>/MODULE_<key>/<file>``,
plus our completion markers (``.../.bmojo-complete``) and a staging area
(``<prefix>/.bmojo-staging/<token>/...``) that the layout ignores. Credentials,
region and endpoint come from the usual AWS sources (environment, ~/.aws, instance
role; ``AWS_ENDPOINT_URL`` for an S3-compatible server).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from bmojo_neuron.compile_cache.layout import Entry, group_entries
from bmojo_neuron.compile_cache.location import parse_s3_url

STAGING = ".bmojo-staging"
BOTO3_MISSING = 'S3 support needs boto3, which is not installed: pip install "bmojo-neuron[s3]"'


def make_client() -> Any:
    """A boto3 S3 client; ValueError with the install command when boto3 is missing."""
    try:
        import boto3
    except ImportError:
        raise ValueError(BOTO3_MISSING) from None
    return boto3.client("s3")


@contextmanager
def s3_errors(url: str) -> Iterator[None]:
    """Turn boto errors (no credentials, no bucket, access denied, no network) into a ValueError naming `url`."""
    try:
        yield
    except Exception as exc:
        module = type(exc).__module__ or ""
        if module.startswith(("botocore", "boto3", "s3transfer")):
            raise ValueError(f"S3 {url}: {exc}") from exc
        raise


class S3Store:
    """Reads and writes objects of one ``s3://bucket/prefix`` by paths relative to the prefix."""

    def __init__(self, url: str, client: Any = None) -> None:
        self.bucket, self.prefix = parse_s3_url(url)
        self.url = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self._client = client

    def __str__(self) -> str:
        return self.url

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = make_client()
        return self._client

    def key(self, relpath: str) -> str:
        return f"{self.prefix}/{relpath}" if self.prefix else relpath

    def url_of(self, relpath: str) -> str:
        return f"{self.url}/{relpath}"

    # ---------------------------------------------------------------- reading
    def list(self, relprefix: str = "") -> Iterator[tuple[str, int, float]]:
        """(path relative to the prefix, size, mtime) of every object under `relprefix`."""
        start = self.key(relprefix) if relprefix else (f"{self.prefix}/" if self.prefix else "")
        strip = len(self.prefix) + 1 if self.prefix else 0
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=start):
            for obj in page.get("Contents", []):
                yield obj["Key"][strip:], int(obj["Size"]), obj["LastModified"].timestamp()

    def entries(self) -> list[Entry]:
        """The entries under the prefix (published or not; the staging area is ignored)."""
        return group_entries(self.list(), lambda v, m: self.url_of(f"{v}/{m}"))

    def get(self, relpath: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=self.key(relpath))["Body"].read()

    def download(self, relpath: str, path: Path) -> None:
        self.client.download_file(self.bucket, self.key(relpath), str(path))

    # ---------------------------------------------------------------- writing
    def upload(self, path: Path, relpath: str) -> None:
        self.client.upload_file(str(path), self.bucket, self.key(relpath))

    def copy(self, src_relpath: str, dst_relpath: str) -> None:
        """Server-side copy (managed: multipart for objects over 5 GB)."""
        self.client.copy({"Bucket": self.bucket, "Key": self.key(src_relpath)}, self.bucket, self.key(dst_relpath))

    def put(self, relpath: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.key(relpath), Body=data)

    def delete(self, relpaths: list[str]) -> None:
        for start in range(0, len(relpaths), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": self.key(p)} for p in relpaths[start:start + 1000]]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})

    def clean_stale_staging(self, max_age: float, now: float | None = None) -> int:
        """Delete staging objects older than `max_age` seconds (left by killed pushes); returns how many."""
        now = time.time() if now is None else now
        stale = [rel for rel, _, mtime in self.list(f"{STAGING}/") if now - mtime > max_age]
        self.delete(stale)
        return len(stale)
