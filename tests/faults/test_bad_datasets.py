"""Bad input through the whole stack: datasets, credentials and hub tokens a user gets wrong, each run as a real job
(operator, node agent, the real trainer's preparation, MinIO, the stand-in hub), all in parallel. Each ends Failed
at once with the offending file or cause in `status.message` and a Warning Event, with one failed pod — the CPU-only
preparation pod: no GPU Job is ever created, so a bad dataset costs no GPU time. Exit codes 2, 3 and 4 fail the Job
without retries, so there is no crash loop up to backoffLimit. A Secret without the keys the job names keeps the
preparation pod from starting, which the job shows (Pending, CreateContainerConfigError, the key named) with a
Warning, still without a GPU. Stray files beside the pairs (notes, metadata) are ignored with one warning that names
them, and that job trains."""

from __future__ import annotations

import io
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from PIL import Image

from tests.conftest import Cluster, Hub
from tests.infra.klj import PREPARE, Kljs
from tests.infra.node_agent import NodeAgent
from tests.infra.operator_process import OperatorProcess

from .support import FaultStore, record, scan_for, use_hub_model, wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.s3, pytest.mark.slow]


@dataclass
class Case:
    id: str
    reason: str
    expected: tuple[str, ...]  # what status.message must contain ({uri} = the dataset's s3:// URI)
    prepare: Callable[[Any, str, str], None] = lambda client, bucket, prefix: None
    spec: dict[str, Any] = field(default_factory=dict)
    secret: str = "s3-credentials"
    hub_token: str | None = None  # the model from the stand-in hub, with the token of this Secret


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
    Case(
        "licence-not-accepted",
        "ModelAccessDenied",
        ("is gated", "accept the licence at {hub}/black-forest-labs/FLUX.1-Kontext-dev", "not in the authorized list"),
        hub_token="hf-refused",
    ),
    Case(
        "hub-token-wrong",
        "ModelAccessDenied",
        ("the hub refused the token", "Invalid credentials in Authorization header"),
        hub_token="hf-unknown",
    ),
]
# Not bad: files that are neither images nor captions are ignored, named in one warning, and the job trains.
STRAY = {"target/notes.md": b"shot on the balcony", "control/metadata.json": b"{}"}


def test_bad_datasets_and_credentials_fail_at_once_naming_the_cause(
    crd: Cluster,
    kljs: Kljs,
    start_operator: Callable[..., OperatorProcess],
    agent: NodeAgent,
    store: FaultStore,
    hub: Hub,
) -> None:
    start_operator(config={"hub": {"endpoint": hub.server.endpoint}})
    client = store.client()
    for secret, token in (("hf-refused", hub.refused_token), ("hf-unknown", hub.unknown_token)):
        crd.kubectl("create", "secret", "generic", secret, "-n", kljs.namespace, f"--from-literal=HF_TOKEN={token}")
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
            output=f"out/{case.id}/",  # not the dataset's own prefix: the API refuses outputs mixed into the pairs
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
        if case.hub_token:
            use_hub_model(job, hub.repo, case.hub_token)
        uris[case.id] = dataset["uri"]
        documents.append(job)
    renamed = store.job(
        "secret-keys-renamed",
        secret="renamed-keys",
    )
    documents.append(renamed)
    store.upload_pairs("stray/")
    for key, body in STRAY.items():
        _put(client, store.bucket, f"stray/{key}", body)
    documents.append(store.job("stray-files", dataset="stray/", output="out/stray-files/", steps=2, save_every=2))

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
            expected = text.format(
                uri=uris[case.id],
                endpoint=store.minio.endpoint,
                output=f"s3://{store.bucket}/",
                hub=hub.server.endpoint,
            )
            assert expected in message, f"{case.id}: {expected!r} not in status.message:\n{message}"
        event = kljs.wait_event(case.id, case.reason)
        first = case.expected[0].format(uri=uris[case.id], endpoint=store.minio.endpoint, output="", hub="")
        assert event["type"] == "Warning" and first in event["message"], event
        # It failed in the preparation pod, on the CPU node: no GPU Job, no GPU pod, not a GPU second.
        [batch] = kljs.jobs(case.id, role=PREPARE)
        assert batch["status"].get("failed") == 1 and len(kljs.pods(case.id, role=PREPARE)) == 1, f"{case.id}: retried"
        assert kljs.pods(case.id, role=PREPARE)[0]["spec"]["nodeName"] == agent.cpu_name
        assert kljs.jobs(case.id) == [] and kljs.pods(case.id) == [], f"{case.id}: a GPU was requested"
        assert message.startswith("preparation failed, no GPU was requested")
        prepared = next(c for c in status["conditions"] if c["type"] == "Prepared")
        assert prepared["status"] == "False" and prepared["reason"] == case.reason
        assert status.get("restarts", 0) == 0
        outcomes[case.id] = {
            "reason": case.reason,
            "failed_after_s": failed_after[case.id],
            "preparation_pods": 1,
            "gpu_pods": 0,
            "gpu_seconds": 0,
        }

    # The Secret without the named keys: the pod waits (as the kubelet keeps it), the job says why, with a Warning.
    status = kljs.wait_status(
        "secret-keys-renamed", lambda s: s.get("reason") == "CreateContainerConfigError", 60, "the config error"
    )
    assert "AWS_ACCESS_KEY_ID" in status["message"] and "renamed-keys" in status["message"], status
    assert "preparation pod" in status["message"] and kljs.jobs("secret-keys-renamed") == [], "no GPU held"
    assert status["phase"] == "Pending"
    assert not kljs.jobs("secret-keys-renamed", role=PREPARE)[0]["status"].get("failed")
    warning = kljs.wait_event("secret-keys-renamed", "CreateContainerConfigError")
    assert warning["type"] == "Warning", warning
    outcomes["secret-keys-renamed"] = {"reason": "CreateContainerConfigError", "phase": "Pending", "gpu_pods": 0}

    # The stray files: ignored, named in one warning (status and a Warning Event), and the job trains on.
    status = kljs.wait_status(
        "stray-files", lambda s: any(c["type"] == "Prepared" for c in s.get("conditions") or []), 120, "prepared"
    )
    [warning] = status["preparation"]["warnings"]
    for key in STRAY:
        assert f"s3://{store.bucket}/stray/{key}" in warning, warning
    assert "ignored 2 files that are neither an image" in warning
    event = kljs.wait_event("stray-files", "PreparationWarnings")
    assert event["type"] == "Warning" and "stray/target/notes.md" in event["message"]
    kljs.wait_status("stray-files", lambda s: kljs.jobs("stray-files"), 60, "the GPU Job")
    outcomes["stray-files"] = {"ignored_files": len(STRAY), "warnings": 1, "trains": True}

    # Failing paths print the offending inputs, never the credentials.
    texts = {f"status {c.id}": str(kljs.get(c.id)) for c in CASES}
    texts |= {f"events {c.id}": str(kljs.events(c.id)) for c in CASES}
    texts |= {
        f"log {p['metadata']['name']}": agent.pod_log(kljs.namespace, p["metadata"]["name"])
        for c in CASES
        for p in kljs.pods(c.id, role=PREPARE)
    }
    secrets = {**store.secrets, "wrong secret": wrong_secret, "refused token": hub.refused_token}
    secrets["unknown token"] = hub.unknown_token
    assert not scan_for(secrets, texts)
    record("bad-input", cases=outcomes, slowest_failure_s=max(failed_after.values()))
