"""Bad input through the whole stack: datasets and credentials a user gets wrong, each run as a real job (operator,
node agent, the real trainer, MinIO), all in parallel. Each ends Failed at once with the offending file or cause in
`status.message` and a Warning Event, and one failed pod: exit codes 2 and 3 fail the Job without retries, so there
is no crash loop up to backoffLimit. A Secret without the keys the job names keeps the pod from starting, which the
job shows (Pending, CreateContainerConfigError, the key named) with a Warning."""

from __future__ import annotations

import io
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from PIL import Image

from tests.conftest import Cluster
from tests.infra.klj import Kljs
from tests.infra.node_agent import NodeAgent
from tests.infra.operator_process import OperatorProcess

from .support import FaultStore, record, scan_for, wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.s3, pytest.mark.slow]


@dataclass
class Case:
    id: str
    reason: str
    expected: tuple[str, ...]  # what status.message must contain ({uri} = the dataset's s3:// URI)
    prepare: Callable[[Any, str, str], None] = lambda client, bucket, prefix: None
    spec: dict[str, Any] = field(default_factory=dict)
    secret: str = "s3-credentials"


def _put(client, bucket: str, key: str, body: bytes) -> None:
    client.put_object(Bucket=bucket, Key=key, Body=body)


def _gif() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, format="GIF")
    return buffer.getvalue()


def _truncate(name: str) -> Callable[[Any, str, str], None]:
    """Cut an uploaded image in half, as an interrupted copy leaves it."""

    def prepare(client, bucket: str, prefix: str) -> None:
        body = client.get_object(Bucket=bucket, Key=prefix + name)["Body"].read()
        _put(client, bucket, prefix + name, body[: len(body) // 2])

    return prepare


def _replace(name: str, body: bytes | None, new_name: str | None = None) -> Callable[[Any, str, str], None]:
    """Delete `name` under the dataset prefix and (unless body is None) put `body` as `new_name or name`."""

    def prepare(client, bucket: str, prefix: str) -> None:
        client.delete_object(Bucket=bucket, Key=prefix + name)
        if body is not None:
            _put(client, bucket, prefix + (new_name or name), body)

    return prepare


MISSING_BUCKET = f"no-such-bucket-{uuid.uuid4().hex[:8]}"
CASES = [
    Case(
        "unpaired",
        "InvalidInput",
        ("{uri}control/pair-000.png", "control image has no target"),
        _replace("target/pair-000.png", None),
    ),
    Case(
        "no-caption-no-default",
        "InvalidInput",
        ("{uri}target/pair-002.png", "no caption file", "no spec.dataset.defaultCaption"),
        spec={"dataset": {"defaultCaption": None}},
    ),
    Case(
        "corrupt-png",
        "InvalidInput",
        ("{uri}target/pair-001.png", "damaged or truncated"),
        _truncate("target/pair-001.png"),
    ),
    Case(
        "not-an-image",
        "InvalidInput",
        ("{uri}control/pair-002.png", "not a readable image"),
        lambda client, bucket, prefix: _put(client, bucket, prefix + "control/pair-002.png", b"<html>404</html>" * 64),
    ),
    Case(
        "zero-byte",
        "InvalidInput",
        ("{uri}control/pair-001.png", "the file is empty (0 bytes)"),
        lambda client, bucket, prefix: _put(client, bucket, prefix + "control/pair-001.png", b""),
    ),
    Case(
        "wrong-extension",
        "InvalidInput",
        ("{uri}target/pair-001.gif", "unexpected file type .gif"),
        _replace("target/pair-001.png", _gif(), "target/pair-001.gif"),
    ),
    Case("empty-prefix", "InvalidInput", ("no images found in {uri}control/",), spec={"dataset": {"uri": "empty/"}}),
    Case(
        "wrong-credentials",
        "StorageUnreachable",
        ("{endpoint}", "{output}", "access denied"),
        secret="wrong-credentials",
    ),
    Case(
        "bucket-missing",
        "StorageUnreachable",
        (f"bucket '{MISSING_BUCKET}' does not exist", f"s3://{MISSING_BUCKET}/", "{endpoint}"),
        spec={"dataset": {"uri": f"s3://{MISSING_BUCKET}/data/"}},
    ),
]


def test_bad_datasets_and_credentials_fail_at_once_naming_the_cause(
    crd: Cluster,
    kljs: Kljs,
    operator: OperatorProcess,
    agent: NodeAgent,
    store: FaultStore,
) -> None:
    client = store.client()
    agent.env_overrides["KONTEXT_LORA_METRICS_PORT"] = "0"  # parallel pods share this host's network here
    store.create_secret(kljs)
    wrong_secret = "kl-fault-wrong-" + uuid.uuid4().hex
    kljs.create_s3_secret(store.minio.access_key, wrong_secret, name="wrong-credentials")
    # A Secret whose keys are not the ones the job names: the pod cannot start (no crash, no retry).
    crd.kubectl(
        "create",
        "secret",
        "generic",
        "renamed-keys",
        "-n",
        kljs.namespace,
        "--from-literal=access=x",
        "--from-literal=secret=y",
    )

    documents, uris = [], {}
    for case in CASES:
        prefix = f"{case.id}/"
        store.upload_pairs(prefix)
        case.prepare(client, store.bucket, prefix)
        job = store.job(
            case.id,
            dataset=prefix,
            secret=case.secret,
        )
        dataset = job["spec"]["dataset"]
        for key, value in case.spec.get("dataset", {}).items():
            if value is None:
                dataset.pop(key)
            elif key == "uri" and not value.startswith("s3://"):
                dataset["uri"] = f"s3://{store.bucket}/{value}"
            else:
                dataset[key] = value
        uris[case.id] = dataset["uri"]
        documents.append(job)
    renamed = store.job(
        "secret-keys-renamed",
        secret="renamed-keys",
    )
    documents.append(renamed)

    began = time.monotonic()
    for document in documents:
        kljs.apply(document)
    failed_after: dict[str, float] = {}

    def all_failed() -> bool:
        for case in CASES:
            if case.id not in failed_after and kljs.status(case.id).get("phase") == "Failed":
                failed_after[case.id] = round(time.monotonic() - began, 1)
        return len(failed_after) == len(CASES)

    wait_until(all_failed, 420, "every bad job to fail", interval=1)

    outcomes = {}
    for case in CASES:
        status = kljs.status(case.id)
        message = status["message"]
        assert status["reason"] == case.reason, (case.id, status)
        for text in case.expected:
            expected = text.format(uri=uris[case.id], endpoint=store.minio.endpoint, output=f"s3://{store.bucket}/")
            assert expected in message, f"{case.id}: {expected!r} not in status.message:\n{message}"
        event = kljs.wait_event(case.id, case.reason)
        first = case.expected[0].format(uri=uris[case.id], endpoint=store.minio.endpoint, output="")
        assert event["type"] == "Warning" and first in event["message"], event
        [batch] = kljs.jobs(case.id)
        assert batch["status"].get("failed") == 1 and len(kljs.pods(case.id)) == 1, f"{case.id}: retried"
        assert status.get("restarts", 0) == 0
        outcomes[case.id] = {"reason": case.reason, "failed_after_s": failed_after[case.id], "pods": 1}

    # The Secret without the named keys: the pod waits (as the kubelet keeps it), the job says why, with a Warning.
    status = kljs.wait_status(
        "secret-keys-renamed", lambda s: s.get("reason") == "CreateContainerConfigError", 60, "the config error"
    )
    assert "AWS_ACCESS_KEY_ID" in status["message"] and "renamed-keys" in status["message"], status
    assert status["phase"] == "Pending" and not kljs.jobs("secret-keys-renamed")[0]["status"].get("failed")
    warning = kljs.wait_event("secret-keys-renamed", "CreateContainerConfigError")
    assert warning["type"] == "Warning", warning
    outcomes["secret-keys-renamed"] = {"reason": "CreateContainerConfigError", "phase": "Pending", "pods": 1}

    # Failing paths print the offending inputs, never the credentials.
    texts = {f"status {c.id}": str(kljs.get(c.id)) for c in CASES}
    texts |= {f"events {c.id}": str(kljs.events(c.id)) for c in CASES}
    texts |= {
        f"log {p['metadata']['name']}": agent.pod_log(kljs.namespace, p["metadata"]["name"])
        for c in CASES
        for p in kljs.pods(c.id)
    }
    secrets = {**store.secrets, "wrong secret": wrong_secret}
    assert not scan_for(secrets, texts)
    record("bad-input", cases=outcomes, slowest_failure_s=max(failed_after.values()))
