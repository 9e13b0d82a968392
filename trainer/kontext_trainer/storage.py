"""Object storage for datasets, models and outputs: `s3://bucket/prefix/` or `file:///path/`, one interface.

S3 goes through boto3: listings with the paginator, transfers with the transfer manager (many files in
parallel, multipart for large ones), retries and timeouts from botocore's `standard` retry mode, so every
failure surfaces after a bounded time as a `StorageError` naming the endpoint and bucket (exit code 3).
Credentials come from the standard `AWS_*` environment (a Secret in the cluster) and are never logged.
Local folders implement the same interface; every file they write appears atomically (temp file + rename).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import random
import shutil
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlparse

from pydantic import BaseModel, ConfigDict

from kontext_lora.api.spec import AddressingStyle, StorageSpec

from .errors import StorageError

log = logging.getLogger(__name__)

SYNC_MANIFEST = ".kontext-sync.json"
# Environment variables through which the endpoint reaches boto3 (it reads them natively).
ENDPOINT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
# Retries of a whole storage operation while storage is down (on top of botocore's per-request attempts).
RETRY_FIRST_DELAY = 1.0
RETRY_MAX_DELAY = 30.0
# Answers that mean "try again later" rather than "no".
TRANSIENT_ERROR_CODES = ("SlowDown", "RequestTimeout", "ServiceUnavailable", "InternalError", "RequestTimeTooSkewed")


@dataclass(frozen=True)
class Location:
    """A parsed storage URI: `s3://bucket/prefix/` (prefix "" or ending in "/") or a local folder."""

    scheme: str  # "s3" or "file"
    bucket: str
    prefix: str  # s3: key prefix; file: absolute folder path

    @classmethod
    def parse(cls, uri: str, base_dir: Path | None = None) -> Location:
        """Parse an `s3://` or `file://` URI (or a plain path); relative file paths resolve against `base_dir`."""
        if uri.startswith("s3://"):
            parsed = urlparse(uri)
            if not parsed.netloc:
                raise ValueError(f"{uri!r}: expected s3://bucket/prefix/")
            prefix = parsed.path.lstrip("/")
            if prefix and not prefix.endswith("/"):
                prefix += "/"
            return cls("s3", parsed.netloc, prefix)
        raw = uri.removeprefix("file://") if uri.startswith("file://") else uri
        path = Path(unquote(raw)).expanduser()
        if not path.is_absolute():
            path = (base_dir or Path.cwd()) / path
        return cls("file", "", str(path.resolve()))

    def child(self, relative: str) -> Location:
        relative = relative.strip("/")
        if not relative:
            return self
        if self.scheme == "s3":
            return Location("s3", self.bucket, f"{self.prefix}{relative}/")
        return Location("file", "", str(Path(self.prefix) / relative))

    def uri(self, key: str = "") -> str:
        if self.scheme == "s3":
            return f"s3://{self.bucket}/{self.prefix}{key}"
        uri = Path(self.prefix, key).as_uri()
        return uri + "/" if not key or key.endswith("/") else uri

    def __str__(self) -> str:
        return self.uri()


class StoredObject(BaseModel):
    model_config = ConfigDict(frozen=True)

    key: str  # relative to the storage root, "/"-separated
    size: int
    etag: str  # content identity: the S3 ETag, or size + mtime for local files


class S3Settings(BaseModel):
    """How to reach S3: from the job's `spec.storage` and the pod's `AWS_*` environment."""

    endpoint_url: str | None = None
    region: str = "us-east-1"
    addressing_style: AddressingStyle = AddressingStyle.auto
    max_attempts: int = 6
    retry_seconds: float = 300.0
    """How long a storage operation keeps being retried while storage is unreachable, before exit code 3."""
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    max_concurrency: int = 8

    @classmethod
    def from_spec(cls, spec: StorageSpec, environ: Mapping[str, str] | None = None) -> S3Settings:
        environ = os.environ if environ is None else environ
        endpoint = next((environ[name] for name in ENDPOINT_ENV if environ.get(name)), None) or spec.endpoint
        region = environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION") or spec.region
        attempts = int(environ.get("KONTEXT_LORA_S3_MAX_ATTEMPTS", cls.model_fields["max_attempts"].default))
        retry_seconds = float(environ.get("KONTEXT_LORA_S3_RETRY_SECONDS", cls.model_fields["retry_seconds"].default))
        return cls(
            endpoint_url=endpoint,
            region=region,
            addressing_style=spec.addressing_style,
            max_attempts=attempts,
            retry_seconds=retry_seconds,
        )

    @property
    def effective_addressing_style(self) -> str:
        """Path style for custom endpoints (MinIO, Ceph...) unless the spec says otherwise; virtual on AWS."""
        if self.addressing_style is AddressingStyle.auto:
            return "path" if self.endpoint_url else "virtual"
        return self.addressing_style.value

    @property
    def endpoint_name(self) -> str:
        return self.endpoint_url or f"AWS S3 ({self.region})"


@dataclass
class FetchStats:
    downloaded: int = 0  # files transferred by the last fetch
    reused: int = 0  # files already in the cache (or read in place)


class Storage(ABC):
    """Files under one root URI; keys are relative to it and "/"-separated."""

    location: Location
    last_fetch: FetchStats

    def uri(self, key: str = "") -> str:
        return self.location.uri(key)

    @abstractmethod
    def check(self) -> None:
        """Fail fast (StorageError) when the root cannot be reached or read."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[StoredObject]:
        """Every object under `prefix` (recursive), sorted by key."""

    @abstractmethod
    def fetch(
        self,
        keys: Sequence[str],
        cache_dir: Path,
        on_file: Callable[[str], None] | None = None,
        known: Mapping[str, StoredObject] | None = None,
    ) -> dict[str, Path]:
        """Local paths of `keys`, downloading into `cache_dir` what is not already there and unchanged. `known`:
        the objects as a `stat` or `list` just gave them (spares listing them again)."""

    @abstractmethod
    def stat(self, keys: Sequence[str]) -> dict[str, StoredObject]:
        """The objects among `keys` that exist (one request each, in parallel: no listing of the whole root)."""

    @abstractmethod
    def local_path(self, key: str, cache_dir: Path) -> Path:
        """Where `fetch(..., cache_dir)` puts (or finds) the object."""

    @abstractmethod
    def put_files(self, items: Sequence[tuple[Path, str]]) -> None:
        """Upload (local path, key) pairs; each object appears whole or not at all."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """Content of one object; FileNotFoundError when it does not exist."""

    @abstractmethod
    def delete(self, keys: Sequence[str]) -> None:
        """Delete objects; missing ones are ignored."""


class LocalStorage(Storage):
    """A folder on disk (file:// URIs): reads in place, writes atomically."""

    def __init__(self, location: Location):
        self.location = location
        self.root = Path(location.prefix)
        self.last_fetch = FetchStats()

    def check(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise StorageError(f"{self.uri()} is a file, expected a folder")

    def list(self, prefix: str = "") -> list[StoredObject]:
        base = self.root / prefix if prefix else self.root
        if not base.is_dir():
            return []
        objects = []
        for path in base.rglob("*"):
            relative = path.relative_to(self.root)
            # Files being written (".name.partial-*") and hidden files are not objects yet.
            if not path.is_file() or any(part.startswith(".") for part in relative.parts):
                continue
            stat = path.stat()
            objects.append(StoredObject(key=relative.as_posix(), size=stat.st_size, etag=f"{stat.st_mtime_ns}"))
        return sorted(objects, key=lambda o: o.key)

    def fetch(
        self,
        keys: Sequence[str],
        cache_dir: Path,
        on_file: Callable[[str], None] | None = None,
        known: Mapping[str, StoredObject] | None = None,
    ) -> dict[str, Path]:
        paths = {}
        for key in keys:
            path = self.root / key
            if not path.is_file():
                raise FileNotFoundError(f"{self.uri(key)} does not exist")
            paths[key] = path
            if on_file:
                on_file(key)
        self.last_fetch = FetchStats(reused=len(paths))
        return paths

    def stat(self, keys: Sequence[str]) -> dict[str, StoredObject]:
        found = {}
        for key in keys:
            path = self.root / key
            if path.is_file():
                stat = path.stat()
                found[key] = StoredObject(key=key, size=stat.st_size, etag=f"{stat.st_mtime_ns}")
        return found

    def local_path(self, key: str, cache_dir: Path) -> Path:
        return self.root / key

    def put_files(self, items: Sequence[tuple[Path, str]]) -> None:
        for source, key in items:
            destination = self.root / key
            destination.parent.mkdir(parents=True, exist_ok=True)
            partial = destination.with_name(f".{destination.name}.partial-{os.getpid()}")
            shutil.copyfile(source, partial)
            os.replace(partial, destination)

    def get_bytes(self, key: str) -> bytes:
        path = self.root / key
        if not path.is_file():
            raise FileNotFoundError(f"{self.uri(key)} does not exist")
        return path.read_bytes()

    def delete(self, keys: Sequence[str]) -> None:
        folders = set()
        for key in keys:
            path = self.root / key
            path.unlink(missing_ok=True)
            folders.add(path.parent)
        # Remove folders the deletion emptied (checkpoint folders), never the root.
        for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
            while folder != self.root and folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
                folder = folder.parent


_T = TypeVar("_T")
_retrying = threading.local()
TRANSFER_POLL_SECONDS = 0.1


def _wait_for(futures: Sequence[Any]) -> None:
    """Wait for s3transfer futures, raising the first failure. Waking every TRANSFER_POLL_SECONDS rather than
    blocking in `result()`: Python runs signal handlers only when the main thread executes bytecode, and a SIGTERM
    the kernel delivers to a transfer thread must stop a long model download now, not when its file is done."""
    for future in futures:
        while not future.done():
            time.sleep(TRANSFER_POLL_SECONDS)
        future.result()


def _retried(method: Callable[..., _T]) -> Callable[..., _T]:
    """Retry a whole S3Storage operation while it fails transiently (see `S3Storage._with_retries`). Nested calls
    (`fetch` lists first) are retried by the outermost one only, so the budget is not spent twice."""

    @functools.wraps(method)
    def wrapper(self: S3Storage, *args: Any, **kwargs: Any) -> _T:
        if getattr(_retrying, "active", False):
            return method(self, *args, **kwargs)
        _retrying.active = True
        try:
            return self._with_retries(lambda: method(self, *args, **kwargs))
        finally:
            _retrying.active = False

    return wrapper


class S3Storage(Storage):
    """An s3:// prefix on AWS S3 or any S3-compatible server (MinIO, Ceph, R2...).

    Every operation is retried as a whole while storage is unreachable (connection refused or cut, timeouts, 5xx),
    with exponential backoff, for up to `settings.retry_seconds` (`$KONTEXT_LORA_S3_RETRY_SECONDS`, 300 s): an S3
    gateway restarting under a long training run costs a pause, not the job. Operations are idempotent (whole
    objects, deletes), so a retry after a cut is safe. Refusals fail at once.
    """

    def __init__(self, location: Location, settings: S3Settings):
        import boto3
        from botocore.config import Config

        self.location = location
        self.settings = settings
        self.last_fetch = FetchStats()
        config = Config(
            region_name=settings.region,
            retries={"mode": "standard", "max_attempts": settings.max_attempts},
            connect_timeout=settings.connect_timeout,
            read_timeout=settings.read_timeout,
            s3={"addressing_style": settings.effective_addressing_style},
            max_pool_connections=max(10, settings.max_concurrency * 2),
        )
        # boto3 reads credentials (and AWS_ENDPOINT_URL_S3) from the environment; endpoint_url covers
        # spec.storage.endpoint in local runs where the environment does not name one.
        self.client = boto3.session.Session().client("s3", endpoint_url=settings.endpoint_url, config=config)

    @property
    def bucket(self) -> str:
        return self.location.bucket

    def _with_retries(self, operation: Callable[[], _T]) -> _T:
        budget = self.settings.retry_seconds
        started = time.monotonic()
        delay, tries = RETRY_FIRST_DELAY, 1
        jitter = random.Random()  # not the global generator: its state is part of a resumable checkpoint
        while True:
            try:
                return operation()
            except StorageError as error:
                elapsed = time.monotonic() - started
                if not error.transient or elapsed >= budget:
                    if error.transient and tries > 1:
                        raise StorageError(
                            f"{error}; still failing after {elapsed:.0f}s and {tries} tries "
                            f"(retry budget {budget:g}s, $KONTEXT_LORA_S3_RETRY_SECONDS)",
                            transient=True,
                        ) from None
                    raise
                wait = min(delay * jitter.uniform(0.5, 1.0), budget - elapsed)
                log.warning(
                    "%s; retrying in %.1fs (try %d, %.0fs of the %gs retry budget left)",
                    error,
                    wait,
                    tries,
                    budget - elapsed,
                    budget,
                )
                time.sleep(wait)
                delay = min(delay * 2, RETRY_MAX_DELAY)
                tries += 1

    def _key(self, key: str) -> str:
        return f"{self.location.prefix}{key}"

    @contextmanager
    def _errors(self, action: str, key: str = "") -> Iterator[None]:
        """Turn botocore failures into StorageError naming the endpoint, bucket and what was being done."""
        from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError, NoCredentialsError
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from s3transfer.exceptions import RetriesExceededError

        where = f"{self.uri(key)} at {self.settings.endpoint_name}"
        try:
            yield
        except ClientError as error:
            code = str(error.response.get("Error", {}).get("Code", "Unknown"))
            http_status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            if http_status >= 500 or code in TRANSIENT_ERROR_CODES:
                raise StorageError(
                    f"cannot {action} {where}: the server answered {code} (HTTP {http_status})", transient=True
                ) from None
            if code in ("NoSuchKey", "404", "NotFound") and key:
                raise FileNotFoundError(f"{self.uri(key)} does not exist") from None
            hint = {
                "NoSuchBucket": f"bucket {self.bucket!r} does not exist",
                "AccessDenied": "access denied: check the credentials Secret and the bucket policy",
                "InvalidAccessKeyId": "the access key id is not known to the server: check the credentials Secret",
                "SignatureDoesNotMatch": "the secret access key is wrong: check the credentials Secret",
                "403": "access denied: the credentials are wrong or may not use this bucket (check the credentials "
                "Secret and the bucket policy)",
                "404": f"bucket {self.bucket!r} does not exist",
            }.get(code, f"the server answered {code}")
            raise StorageError(f"cannot {action} {where}: {hint}") from None
        except NoCredentialsError:
            raise StorageError(
                f"cannot {action} {where}: no S3 credentials; set spec.storage.credentialsSecret "
                "(or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY for local runs)"
            ) from None
        except (BotoCoreError, RetriesExceededError) as error:
            raise StorageError(
                f"cannot {action} {where}: storage unreachable after {self.settings.max_attempts} attempts "
                f"({type(error).__name__}: {error})",
                transient=isinstance(error, (BotoConnectionError, HTTPClientError, RetriesExceededError)),
            ) from None

    @_retried
    def check(self) -> None:
        with self._errors("reach"):
            self.client.head_bucket(Bucket=self.bucket)

    @_retried
    def list(self, prefix: str = "") -> list[StoredObject]:
        objects = []
        with self._errors("list", prefix):
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key(prefix)):
                for item in page.get("Contents", []):
                    key = item["Key"][len(self.location.prefix) :]
                    if key and not key.endswith("/"):
                        objects.append(StoredObject(key=key, size=item["Size"], etag=item["ETag"].strip('"')))
        return sorted(objects, key=lambda o: o.key)

    def _transfer_manager(self):
        from boto3.s3.transfer import TransferConfig, create_transfer_manager

        config = TransferConfig(max_concurrency=self.settings.max_concurrency, preferred_transfer_client="classic")
        return create_transfer_manager(self.client, config)

    @_retried
    def stat(self, keys: Sequence[str]) -> dict[str, StoredObject]:
        from concurrent.futures import ThreadPoolExecutor

        def head(key: str) -> StoredObject | None:
            try:
                with self._errors("read", key):
                    answer = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            except FileNotFoundError:
                return None
            return StoredObject(key=key, size=answer["ContentLength"], etag=answer["ETag"].strip('"'))

        if not keys:
            return {}
        with ThreadPoolExecutor(max_workers=self.settings.max_concurrency, thread_name_prefix="s3-stat") as pool:
            found = list(pool.map(head, keys))
        return {o.key: o for o in found if o is not None}

    def local_path(self, key: str, cache_dir: Path) -> Path:
        return cache_dir / key

    @_retried
    def fetch(
        self,
        keys: Sequence[str],
        cache_dir: Path,
        on_file: Callable[[str], None] | None = None,
        known: Mapping[str, StoredObject] | None = None,
    ) -> dict[str, Path]:
        """Download `keys` in parallel; files already in `cache_dir` with the same ETag are not downloaded again."""
        from s3transfer.subscribers import BaseSubscriber

        cache_dir.mkdir(parents=True, exist_ok=True)
        manifest_path = cache_dir / SYNC_MANIFEST
        manifest: dict[str, str] = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
        wanted = set(keys)
        if known is not None and wanted <= known.keys():
            listing = {key: known[key] for key in wanted}
        else:
            listing = {o.key: o for o in self.list() if o.key in wanted} if keys else {}
        missing = wanted - listing.keys()
        if missing:
            raise FileNotFoundError(f"{self.uri(sorted(missing)[0])} does not exist")
        paths = {key: cache_dir / key for key in keys}
        todo = [
            key
            for key in keys
            if not (
                paths[key].is_file()
                and paths[key].stat().st_size == listing[key].size
                and manifest.get(key) == listing[key].etag
            )
        ]
        for key in set(keys) - set(todo):
            if on_file:
                on_file(key)

        class _Done(BaseSubscriber):
            def __init__(self, key: str):
                self.key = key

            def on_queued(self, future, **kwargs):
                # Size and ETag are known from the listing: without both, the transfer manager sends a HeadObject
                # first, one more round trip per file (half the requests for a dataset of small files).
                future.meta.provide_transfer_size(listing[self.key].size)
                future.meta.provide_object_etag(f'"{listing[self.key].etag}"')

            def on_done(self, future, **kwargs):
                if on_file:
                    on_file(self.key)

        if todo:
            log.info("downloading %d of %d files from %s", len(todo), len(keys), self.uri())
            with self._errors("download from", todo[0]), self._transfer_manager() as manager:
                futures = []
                for key in todo:
                    paths[key].parent.mkdir(parents=True, exist_ok=True)
                    futures.append(
                        manager.download(self.bucket, self._key(key), str(paths[key]), subscribers=[_Done(key)])
                    )
                _wait_for(futures)
            manifest.update({key: listing[key].etag for key in todo})
            partial = manifest_path.with_name(manifest_path.name + ".partial")
            partial.write_text(json.dumps(manifest, indent=0, sort_keys=True))
            os.replace(partial, manifest_path)
        self.last_fetch = FetchStats(downloaded=len(todo), reused=len(keys) - len(todo))
        return paths

    @_retried
    def put_files(self, items: Sequence[tuple[Path, str]]) -> None:
        if not items:
            return
        with self._errors("upload to", items[0][1]), self._transfer_manager() as manager:
            _wait_for([manager.upload(str(path), self.bucket, self._key(key)) for path, key in items])

    @_retried
    def get_bytes(self, key: str) -> bytes:
        with self._errors("read", key):
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()

    @_retried
    def delete(self, keys: Sequence[str]) -> None:
        keys = list(keys)
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            chunk = keys[start : start + 1000]
            with self._errors("delete from", chunk[0]):
                response = self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": self._key(k)} for k in chunk], "Quiet": True}
                )
            if errors := response.get("Errors"):
                first = errors[0]
                raise StorageError(
                    f"cannot delete {self.uri(first['Key'][len(self.location.prefix) :])} at "
                    f"{self.settings.endpoint_name}: {first.get('Code')} {first.get('Message', '')}".rstrip()
                )


def open_storage(location: Location, s3: S3Settings) -> Storage:
    return S3Storage(location, s3) if location.scheme == "s3" else LocalStorage(location)
