"""Storage faults: the S3 server stops during the dataset download and during checkpoint uploads, and comes back;
or it stays down. The trainer rides out an outage (retries with backoff), never takes a partly uploaded checkpoint
for a complete one (also when it is killed while storage is down), and fails in bounded time with a message naming
the endpoint and bucket when storage does not come back — without retries past backoffLimit.

The trainer talks to MinIO through `S3FaultProxy`, which holds the one request a test wants to cut at (the first
dataset image, a checkpoint's COMPLETE marker) until MinIO has been stopped; MinIO is then restarted on the same
data dir and port. Everything else is real: control plane, operator, node agent running the trainer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime

import pytest
from kontext_trainer.errors import StorageError
from kontext_trainer.storage import Location, S3Settings, S3Storage

from kontext_lora.api.spec import StorageSpec
from tests.conftest import Cluster
from tests.infra.klj import PREPARE, Kljs
from tests.infra.minio import MinioServer
from tests.infra.node_agent import NodeAgent
from tests.infra.operator_process import OperatorProcess
from tests.infra.s3_fault_proxy import Hold, Request, S3FaultProxy

from .support import FaultStore, checkpoints, keys, log_records, record, wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.s3, pytest.mark.slow]


def _storage(minio: MinioServer, bucket: str, retry_seconds: float, attempts: int = 2) -> S3Storage:
    """The trainer's S3 storage as a pod configures it from its environment."""
    environ = {"KONTEXT_LORA_S3_RETRY_SECONDS": str(retry_seconds), "KONTEXT_LORA_S3_MAX_ATTEMPTS": str(attempts)}
    settings = S3Settings.from_spec(StorageSpec(endpoint=minio.endpoint), environ)
    return S3Storage(Location.parse(f"s3://{bucket}/data/"), settings)


def test_s3_storage_retries_through_an_outage_and_gives_up_after_its_budget(
    fault_minio: MinioServer, fault_bucket: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in fault_minio.credentials_env.items():
        monkeypatch.setenv(key, value)
    fault_minio.client().put_object(Bucket=fault_bucket, Key="data/a.txt", Body=b"pair")
    caplog.set_level(logging.WARNING, logger="kontext_trainer.storage")

    # An outage of ~4 s inside a 60 s budget: the listing waits it out.
    storage = _storage(fault_minio, fault_bucket, retry_seconds=60)
    fault_minio.stop()
    restarter = threading.Timer(4, fault_minio.start)
    began = time.monotonic()
    restarter.start()
    try:
        assert [o.key for o in storage.list()] == ["a.txt"]
    finally:
        restarter.join()
    waited = time.monotonic() - began
    retries = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert waited >= 4 and len(retries) >= 2, retries
    delays = [float(m.split("retrying in ")[1].split("s")[0]) for m in retries]
    assert delays[-1] > delays[0], f"backoff grows: {delays}"

    # Down for good: a bounded time, then a StorageError naming endpoint and bucket.
    fault_minio.stop()
    try:
        short = _storage(fault_minio, fault_bucket, retry_seconds=3, attempts=1)
        began = time.monotonic()
        with pytest.raises(StorageError) as raised:
            short.check()
        gave_up = time.monotonic() - began
    finally:
        fault_minio.start()
    message = str(raised.value)
    assert raised.value.transient and 3 <= gave_up < 15, (gave_up, message)
    assert fault_minio.endpoint in message and f"s3://{fault_bucket}/data/" in message and "still failing" in message

    # Refusals are not outages: a missing bucket fails at once, whatever the budget.
    began = time.monotonic()
    with pytest.raises(StorageError, match="does not exist") as refused:
        _storage(fault_minio, "no-such-bucket-kontext-faults", retry_seconds=60).check()
    assert not refused.value.transient and time.monotonic() - began < 5
    record(
        "storage-retry-budget",
        outage_seconds=round(waited, 1),
        retries=len(retries),
        backoff_delays=delays,
        down_for_good_gave_up_after_seconds=round(gave_up, 1),
        budget_seconds=3,
    )


def _retries_logged(agent: NodeAgent, namespace: str, pod: str) -> list[str]:
    return [r["message"] for r in log_records(agent, namespace, pod) if "retrying in" in r.get("message", "")]


def _is_dataset_image_get(bucket: str) -> Callable[[Request], bool]:
    def matches(request: Request) -> bool:
        listing = "list-type" in request.query
        return request.method == "GET" and request.path.startswith(f"/{bucket}/data/") and not listing

    return matches


def _is_complete_put(bucket: str, prefix: str, step: int) -> Callable[[Request], bool]:
    path = f"/{bucket}/{prefix}checkpoints/step-{step:06d}/COMPLETE"
    return lambda request: request.method == "PUT" and request.path == path


def test_outages_during_download_and_checkpoint_uploads_lose_nothing(
    crd: Cluster,
    kljs: Kljs,
    operator: OperatorProcess,
    agent: NodeAgent,
    store: FaultStore,
    proxy: S3FaultProxy,
) -> None:
    steps, save_every, keep = 12, 4, 2
    name, prefix = "outages", "outages/"
    client = store.client()
    store.upload_pairs()
    store.create_secret(kljs)
    agent.env_overrides["KONTEXT_LORA_S3_RETRY_SECONDS"] = "120"
    job = store.job(
        name,
        endpoint=proxy.endpoint,
        steps=steps,
        save_every=save_every,
        keep=keep,
    )
    download = proxy.hold(_is_dataset_image_get(store.bucket))
    first_upload = proxy.hold(_is_complete_put(store.bucket, prefix, save_every))
    second_upload = proxy.hold(_is_complete_put(store.bucket, prefix, 2 * save_every))
    kljs.apply(job)
    outages: list[dict] = []

    def outage(what: str, pod: str, hold: Hold, min_retries: int = 2, min_seconds: float = 10) -> None:
        """Stop MinIO, cut the held request, wait until the trainer has retried (and at least `min_seconds`: longer
        than botocore's own per-request retries last, which were all the trainer had before), start MinIO again."""
        before = len(_retries_logged(agent, kljs.namespace, pod))
        stopped = time.monotonic()
        store.minio.stop()
        hold.release(drop=True)
        wait_until(
            lambda: (
                len(_retries_logged(agent, kljs.namespace, pod)) >= before + min_retries
                and time.monotonic() - stopped >= min_seconds
            ),
            120,
            f"the trainer to retry during the {what} outage",
        )
        store.minio.start()
        retries = len(_retries_logged(agent, kljs.namespace, pod)) - before
        outages.append({"during": what, "seconds": round(time.monotonic() - stopped, 1), "retries": retries})

    # 1. MinIO goes away while the first dataset image is being fetched (by the preparation pod, which validates the
    # pairs before the GPU pod is made).
    download.wait_hit(300)
    preparation_pod = kljs.running_pod(name, role=PREPARE)["metadata"]["name"]
    outage("dataset download", preparation_pod, download)

    # 2. ... and while the first checkpoint's COMPLETE marker is being uploaded: its files are up, the marker not.
    first_upload.wait_hit(300)
    first_pod = kljs.running_pod(name)["metadata"]["name"]
    at_cut = checkpoints(client, store.bucket, prefix)
    assert save_every in at_cut.partial and not at_cut.complete, at_cut
    outage("checkpoint upload", first_pod, first_upload)
    wait_until(
        lambda: save_every in checkpoints(client, store.bucket, prefix).complete,
        120,
        "the retried upload to complete the first checkpoint",
    )

    # 3. Again at the second checkpoint, and this time the trainer is killed while MinIO is down.
    second_upload.wait_hit(300)
    store.minio.stop()
    stopped = time.monotonic()
    second_upload.release(drop=True)
    agent.kill_pod(kljs.namespace, first_pod)
    wait_until(lambda: agent.find(kljs.namespace, first_pod) is None, 30, "the killed trainer to be reported")
    store.minio.start()
    outages.append({"during": "checkpoint upload + SIGKILL", "seconds": round(time.monotonic() - stopped, 1)})
    at_kill = checkpoints(client, store.bucket, prefix)
    assert at_kill.complete == [save_every] and 2 * save_every in at_kill.partial, at_kill

    status = kljs.wait_phase(name, "Succeeded", timeout=420)
    pods = [p["metadata"]["name"] for p in kljs.pods(name)]
    second_pod = next(p for p in pods if p != first_pod)
    second_log = agent.pod_log(kljs.namespace, second_pod)
    resumed = [r for r in log_records(agent, kljs.namespace, second_pod) if "resumed_from_step" in r]
    assert [r["resumed_from_step"] for r in resumed] == [save_every], second_log[-3000:]
    assert f"removing incomplete checkpoint s3://{store.bucket}/{prefix}checkpoints/step-{2 * save_every:06d}/" in (
        second_log
    )

    # Nothing lost beyond the bound; nothing half-made left behind.
    final = checkpoints(client, store.bucket, prefix)
    assert final.complete == [steps - save_every, steps] and not final.partial, final
    assert f"{prefix}{name}.safetensors" in keys(client, store.bucket, prefix)
    assert status["restarts"] == 1 and len(pods) == 2, (status, pods)
    assert sorted(c["step"] for c in status["checkpoints"]) == final.complete
    assert outages[0]["retries"] >= 2 and outages[1]["retries"] >= 2
    record(
        "storage-outages",
        outages=outages,
        lost_steps_at_kill=2 * save_every - save_every,
        save_every=save_every,
        restarts=status["restarts"],
        partial_checkpoints_left=len(final.partial),
        refused_connections_while_down=proxy.refused_connections,
    )


def test_storage_that_stays_down_fails_the_job_in_bounded_time_naming_endpoint_and_bucket(
    crd: Cluster,
    kljs: Kljs,
    operator: OperatorProcess,
    agent: NodeAgent,
    store: FaultStore,
    proxy: S3FaultProxy,
) -> None:
    budget = 8
    store.create_secret(kljs)
    agent.env_overrides.update(KONTEXT_LORA_S3_RETRY_SECONDS=str(budget), KONTEXT_LORA_S3_MAX_ATTEMPTS="2")
    job = store.job("down", endpoint=proxy.endpoint, backoff_limit=3)
    store.minio.stop()
    try:
        kljs.apply(job)
        pod = kljs.running_pod("down", timeout=120, role=PREPARE)["metadata"]["name"]
        status = kljs.wait_phase("down", "Failed", timeout=180)
    finally:
        store.minio.start()
    records = log_records(agent, kljs.namespace, pod)
    first_retry = next(r["time"] for r in records if "retrying in" in r.get("message", ""))
    error = next(r for r in records if r.get("level") == "error")
    assert status["reason"] == "StorageUnreachable", status
    message = status["message"]
    assert proxy.endpoint in message and f"s3://{store.bucket}/down/" in message, message
    assert "code 3" in message and "not retried" in message, message
    event = kljs.wait_event("down", "StorageUnreachable")
    assert event["type"] == "Warning" and proxy.endpoint in event["message"]
    [batch] = kljs.jobs("down", role=PREPARE)
    assert batch["status"].get("failed") == 1 and len(kljs.pods("down", role=PREPARE)) == 1, "exit 3: at once"
    assert kljs.jobs("down") == [], "found in the preparation: no GPU was requested"
    assert status.get("restarts", 0) == 0

    spent = (datetime.fromisoformat(error["time"]) - datetime.fromisoformat(first_retry)).total_seconds()
    assert budget - 1 <= spent <= budget + 30, spent
    record(
        "storage-down-for-good",
        retry_budget_seconds=budget,
        first_retry_to_exit_seconds=round(spent, 1),
        failed_pods=batch["status"].get("failed"),
        reason=status["reason"],
    )
