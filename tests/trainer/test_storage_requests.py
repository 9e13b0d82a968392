"""What the S3 downloader sends over the wire (MinIO): one GetObject per file, no HeadObject before it.

The size and ETag of every object come from the listing, so the transfer manager is told them instead of asking
the server; on a real network each saved request is a round trip (bench/data_pull.py measures the effect).
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from pathlib import Path

from kontext_trainer.storage import Location, S3Settings, S3Storage

from kontext_lora.api.spec import StorageSpec


def _count_calls(storage: S3Storage) -> Counter:
    calls: Counter = Counter()
    lock = threading.Lock()

    def before(model, **_):
        with lock:
            calls[model.name] += 1

    storage.client.meta.events.register("before-call.s3", before)
    return calls


def test_fetch_sends_one_get_per_file_and_no_head(minio, bucket: str, s3_env: dict, tmp_path: Path) -> None:
    client = minio.client()
    small = {f"data/file-{i}.bin": os.urandom(1000 + i) for i in range(5)}
    # Above the transfer manager's 8 MiB multipart threshold: ranged GETs that carry the listing's ETag (If-Match).
    large = {"data/large.bin": os.urandom(9 * 1024 * 1024 + 17)}
    for key, body in {**small, **large}.items():
        client.put_object(Bucket=bucket, Key=key, Body=body)

    storage = S3Storage(Location.parse(f"s3://{bucket}/data/"), S3Settings.from_spec(StorageSpec()))
    calls = _count_calls(storage)
    keys = [o.key for o in storage.list()]
    paths = storage.fetch(keys, tmp_path / "cache")
    for key, body in {**small, **large}.items():
        assert paths[key.removeprefix("data/")].read_bytes() == body
    assert calls["HeadObject"] == 0, dict(calls)
    assert calls["GetObject"] == len(small) + 2  # the large object comes in two ranged parts
    assert storage.last_fetch.downloaded == len(keys)

    calls.clear()
    storage.fetch(keys, tmp_path / "cache")
    assert calls["GetObject"] == 0 and calls["HeadObject"] == 0, dict(calls)
    assert storage.last_fetch.downloaded == 0 and storage.last_fetch.reused == len(keys)
