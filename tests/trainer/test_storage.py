"""S3 for real (MinIO): parallel, cached downloads; bounded, clear failures; credentials never printed."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from kontext_trainer.data.dataset import prepare_dataset
from kontext_trainer.errors import ExitCode, StorageError
from kontext_trainer.storage import LocalStorage, Location, S3Settings, S3Storage

from kontext_lora.api.spec import DatasetSpec, StorageSpec
from tests.infra.processes import free_port

from .helpers import job_document, run_cli, trainer_env, upload_tree, write_job


def test_dataset_download_is_parallel_and_cached(
    minio, bucket: str, s3_env: dict, pairs_dir: Path, tmp_path: Path
) -> None:
    client = minio.client()
    uploaded = upload_tree(client, bucket, pairs_dir, "pairs/")
    spec = DatasetSpec(uri=f"s3://{bucket}/pairs/", resolution=512, default_caption="remove it")
    storage = S3Storage(Location.parse(spec.uri), S3Settings.from_spec(StorageSpec()))
    threads: set[str] = set()
    original = storage.fetch

    def fetch_recording_threads(keys, cache_dir, on_file=None):
        return original(keys, cache_dir, on_file=lambda key: threads.add(threading.current_thread().name))

    storage.fetch = fetch_recording_threads  # type: ignore[method-assign]  # observe, not replace
    cache = tmp_path / "cache"
    pairs, _ = prepare_dataset(storage, spec, cache, show_progress=False)
    assert len(pairs) == 6
    assert storage.last_fetch.downloaded == uploaded == 6 * 2 + 5  # 6 pairs, 5 captions
    assert len(threads) > 1, f"downloads completed on one thread only: {threads}"
    assert (cache / "control" / "pair-000.png").read_bytes() == (pairs_dir / "control" / "pair-000.png").read_bytes()

    mtimes = {p: p.stat().st_mtime_ns for p in cache.rglob("*.png")}
    prepare_dataset(storage, spec, cache, show_progress=False)
    assert storage.last_fetch.downloaded == 0 and storage.last_fetch.reused == uploaded
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*.png")} == mtimes

    client.put_object(Bucket=bucket, Key="pairs/target/pair-001.txt", Body=b"remove the blue shape")
    pairs, _ = prepare_dataset(storage, spec, cache, show_progress=False)
    assert storage.last_fetch.downloaded == 1
    assert next(p for p in pairs if p.stem == "pair-001").caption == "remove the blue shape"


def test_unreachable_storage_exits_3_in_bounded_time_naming_endpoint_and_bucket(
    tiny_model: Path, tmp_path: Path
) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = trainer_env(
        AWS_ENDPOINT_URL_S3=endpoint,
        AWS_ACCESS_KEY_ID="kontext-test-id",
        AWS_SECRET_ACCESS_KEY="not-a-real-secret-value-0123",
        AWS_REGION="us-east-1",
        KONTEXT_LORA_S3_MAX_ATTEMPTS="3",
        KONTEXT_LORA_S3_RETRY_SECONDS="3",
        KONTEXT_LORA_TERMINATION_LOG=str(tmp_path / "termination-log"),
    )
    job = write_job(
        tmp_path / "job.yaml",
        job_document("no-storage", str(tiny_model), "s3://training-data/pairs/", "s3://loras/out/"),
    )
    finished = run_cli(["train", str(job), "--work-dir", str(tmp_path / "work")], env, tmp_path / "train.log")
    assert finished.code == ExitCode.STORAGE_UNREACHABLE, finished.output
    assert finished.seconds < 60
    message = (tmp_path / "termination-log").read_text()
    assert endpoint in message and "s3://loras/out/" in message and "after 3 attempts" in message, message
    assert "still failing after" in message and "retry budget 3s" in message, message


def test_wrong_credentials_exit_3_and_the_secret_is_never_printed(
    minio, bucket: str, tiny_model: Path, tmp_path: Path
) -> None:
    secret = "wrong-secret-" + "x7" * 12
    env = trainer_env(
        AWS_ENDPOINT_URL_S3=minio.endpoint,
        AWS_ACCESS_KEY_ID=minio.access_key,
        AWS_SECRET_ACCESS_KEY=secret,
        AWS_REGION=minio.region,
        KONTEXT_LORA_S3_MAX_ATTEMPTS="2",
        KONTEXT_LORA_TERMINATION_LOG=str(tmp_path / "termination-log"),
    )
    job = write_job(
        tmp_path / "job.yaml",
        job_document("bad-key", str(tiny_model), f"s3://{bucket}/pairs/", f"s3://{bucket}/out/"),
    )
    finished = run_cli(["train", str(job), "--work-dir", str(tmp_path / "work")], env, tmp_path / "train.log")
    assert finished.code == ExitCode.STORAGE_UNREACHABLE, finished.output
    message = (tmp_path / "termination-log").read_text()
    assert "access denied: the credentials are wrong" in message and minio.endpoint in message, message
    for text in (finished.output, message):
        assert secret not in text
        assert minio.access_key not in text


def test_local_storage_writes_atomically_and_cleans_up_folders(tmp_path: Path) -> None:
    storage = LocalStorage(Location.parse(str(tmp_path / "out")))
    source = tmp_path / "file.bin"
    source.write_bytes(b"x" * 1000)
    storage.put_files([(source, "checkpoints/step-000001/a.bin"), (source, "b.bin")])
    (tmp_path / "out" / "checkpoints" / "step-000001" / ".c.bin.partial-1").write_bytes(b"half")
    assert [o.key for o in storage.list()] == ["b.bin", "checkpoints/step-000001/a.bin"]
    storage.delete(["checkpoints/step-000001/a.bin", "checkpoints/step-000001/.c.bin.partial-1"])
    assert not (tmp_path / "out" / "checkpoints").exists()
    assert storage.get_bytes("b.bin") == b"x" * 1000
    with pytest.raises(FileNotFoundError):
        storage.get_bytes("missing")


def test_s3_errors_are_storage_errors_naming_the_object(minio, bucket: str, s3_env: dict) -> None:
    settings = S3Settings.from_spec(StorageSpec())
    assert settings.effective_addressing_style == "path"  # custom endpoint -> path style
    assert S3Settings(endpoint_url=None).effective_addressing_style == "virtual"
    missing = S3Storage(Location.parse("s3://no-such-bucket-kontext/x/"), settings)
    started = time.monotonic()
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-kontext' does not exist"):
        missing.check()
    assert time.monotonic() - started < 10
    with pytest.raises(FileNotFoundError, match=f"s3://{bucket}/p/missing.txt does not exist"):
        S3Storage(Location.parse(f"s3://{bucket}/p/"), settings).get_bytes("missing.txt")
