"""Lifecycle of a KontextLoRAJob: suspend/resume (and Kueue's way of doing it), spec changes refused or applied,
deletion that keeps the LoRAs in storage, activeDeadlineSeconds and ttlSecondsAfterFinished."""

from __future__ import annotations

import json
import time

import pytest

from tests.conftest import Cluster
from tests.infra.klj import PREPARE, Kljs, job_manifest
from tests.infra.minio import MinioServer
from tests.infra.processes import wait_for

pytestmark = pytest.mark.cluster
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"


def report_stage(crd: Cluster, kljs: Kljs, name: str, stage: str) -> None:
    """What the trainer does when it moves on (here through the admin identity, the trainer's RBAC is tested
    in test_operator_reconcile)."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    patch = {"status": {"stage": stage, "lastProgressTime": now}}
    crd.kubectl(
        "patch", "klj", name, "-n", kljs.namespace, "--subresource=status", "--type=merge", "-p", json.dumps(patch)
    )


def job_env(job: dict) -> dict[str, dict]:
    return {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}


def test_suspend_stops_the_trainer_and_resume_starts_it_again(kljs: Kljs, operator) -> None:
    kljs.apply(job_manifest("pausable"))
    first = kljs.running_pod("pausable")
    kljs.wait_phase("pausable", "Downloading")

    kljs.patch_spec("pausable", {"suspend": True})
    status = kljs.wait_phase("pausable", "Suspended")
    assert status["reason"] == "Suspended" and "spec.suspend" in status["message"]
    assert next(c for c in status["conditions"] if c["type"] == "Suspended")["status"] == "True"
    assert kljs.jobs("pausable")[0]["spec"]["suspend"] is True
    wait_for(lambda: not kljs.pods("pausable"), what="the job controller to delete the trainer pod")
    kljs.wait_event("pausable", "Suspended")

    kljs.patch_spec("pausable", {"suspend": False})
    second = kljs.running_pod("pausable")
    assert second["metadata"]["uid"] != first["metadata"]["uid"]
    status = kljs.wait_phase("pausable", "Downloading")
    assert next(c for c in status["conditions"] if c["type"] == "Suspended")["status"] == "False"
    assert len(kljs.jobs("pausable")) == 1, "resume reuses the Job: no second one"
    kljs.wait_event("pausable", "Resume")


def test_kueue_style_admission_and_preemption(crd: Cluster, kljs: Kljs, operator) -> None:
    # Kueue-aware tooling creates the job suspended and in a queue; admission clears suspend. Nothing runs meanwhile,
    # not even the preparation.
    manifest = job_manifest("queued", suspend=True)
    manifest["metadata"]["labels"] = {QUEUE_LABEL: "gpu-queue", "team": "vision"}
    kljs.apply(manifest)
    preparation = wait_for(lambda: kljs.jobs("queued", role=PREPARE), what="preparation Job")[0]
    assert preparation["spec"]["suspend"] is True
    assert QUEUE_LABEL not in preparation["metadata"]["labels"], "the queue admits the Job that holds the GPU"
    kljs.wait_phase("queued", "Suspended")
    time.sleep(1)
    assert kljs.pods("queued", role=PREPARE) == [] and kljs.jobs("queued") == []

    kljs.patch_spec("queued", {"suspend": False})
    job = wait_for(lambda: kljs.jobs("queued"), what="the GPU Job, once the preparation succeeded")[0]
    assert job["metadata"]["labels"][QUEUE_LABEL] == "gpu-queue", "Kueue manages the batch Job that holds the GPU"
    assert "team" not in job["metadata"]["labels"]
    kljs.running_pod("queued")
    kljs.wait_phase("queued", "Downloading")

    # Kueue preempts by suspending the batch Job itself: shown as Suspended, and the operator does not undo it.
    crd.kubectl(
        "patch", "job", "queued-trainer", "-n", kljs.namespace, "--type=merge", "-p", '{"spec":{"suspend":true}}'
    )
    status = kljs.wait_phase("queued", "Suspended")
    assert status["reason"] == "SuspendedByQueue" and "another controller" in status["message"]
    time.sleep(2)
    assert kljs.jobs("queued")[0]["spec"]["suspend"] is True
    crd.kubectl(
        "patch", "job", "queued-trainer", "-n", kljs.namespace, "--type=merge", "-p", '{"spec":{"suspend":false}}'
    )
    kljs.wait_phase("queued", "Downloading")


def test_spec_changes_are_refused_once_training_started(crd: Cluster, kljs: Kljs, operator) -> None:
    manifest = job_manifest("frozen", runPolicy={"backoffLimit": 2})
    kljs.apply(manifest)
    kljs.running_pod("frozen")
    report_stage(crd, kljs, "frozen", "Training")
    kljs.wait_phase("frozen", "Training")

    changed = json.loads(json.dumps(manifest))
    changed["spec"]["lora"]["rank"] = 64
    refused = kljs.apply(changed, check=False)
    assert refused.returncode != 0
    assert "spec.lora cannot change: the job is Training" in refused.stderr, refused.stderr
    assert "Create a new KontextLoRAJob" in refused.stderr
    assert kljs.get("frozen")["spec"]["lora"]["rank"] == 16

    # What can change on a live Job does, and reaches it.
    kljs.patch_spec("frozen", {"runPolicy": {"backoffLimit": 5, "activeDeadlineSeconds": 7200}})
    job = wait_for(
        lambda: next((j for j in kljs.jobs("frozen") if j["spec"].get("activeDeadlineSeconds") == 7200), None),
        what="the new deadline on the Job",
    )
    assert job["spec"]["backoffLimit"] == 5
    assert len(kljs.jobs("frozen")) == 1


def test_spec_change_before_training_replaces_the_job(kljs: Kljs, operator) -> None:
    kljs.apply(job_manifest("draft", suspend=True))
    old = wait_for(lambda: kljs.jobs("draft", role=PREPARE), what="preparation Job")[0]
    kljs.wait_phase("draft", "Suspended")
    kljs.patch_spec("draft", {"lora": {"rank": 32}})

    def replaced() -> dict | None:
        jobs = [j for j in kljs.jobs("draft", role=PREPARE) if j["metadata"]["uid"] != old["metadata"]["uid"]]
        return jobs[0] if jobs else None

    new = wait_for(replaced, what="the replacement Job")
    assert json.loads(job_env(new)["KONTEXT_LORA_JOB"]["value"])["spec"]["lora"]["rank"] == 32
    assert new["spec"]["suspend"] is True
    kljs.wait_event("draft", "SpecChanged")
    wait_for(lambda: len(kljs.jobs("draft", role=PREPARE)) == 1, what="the old Job to go")
    kljs.wait_phase("draft", "Suspended")

    # Prepared and waiting for a GPU (no node has 500 CPUs): a change replaces the GPU Job and the preparation,
    # which validated the old spec.
    kljs.patch_spec("draft", {"suspend": False, "resources": {"gpu": "L40S-48GB", "cpu": "500", "memory": "1Gi"}})
    kljs.wait_status("draft", lambda s: s.get("reason") == "Unschedulable", 60, "waiting for a GPU node")
    gpu_job = kljs.jobs("draft")[0]
    prepared = kljs.jobs("draft", role=PREPARE)[0]
    kljs.patch_spec("draft", {"lora": {"rank": 48}})
    wait_for(
        lambda: (
            {j["metadata"]["uid"] for j in kljs.jobs("draft") + kljs.jobs("draft", role=PREPARE)}
            - {gpu_job["metadata"]["uid"], prepared["metadata"]["uid"]}
        ),
        what="both Jobs replaced",
    )
    wait_for(lambda: len(kljs.jobs("draft")) == 1 and len(kljs.jobs("draft", role=PREPARE)) == 1, what="one each")
    rank = json.loads(job_env(kljs.jobs("draft")[0])["KONTEXT_LORA_JOB"]["value"])["spec"]["lora"]["rank"]
    assert rank == 48


def test_delete_removes_cluster_objects_and_keeps_the_loras(
    crd: Cluster, kljs: Kljs, operator, minio: MinioServer, bucket: str
) -> None:
    s3 = minio.client()
    kept = ["loras/keep/keep.safetensors", "loras/keep/checkpoints/step-000050/keep-step-000050.safetensors"]
    for key in kept:
        s3.put_object(Bucket=bucket, Key=key, Body=b"lora weights")
    manifest = job_manifest("keep", output={"uri": f"s3://{bucket}/loras/keep/"})
    manifest["spec"]["storage"] = {"endpoint": minio.endpoint, "credentialsSecret": "s3-credentials"}
    kljs.apply(manifest)
    kljs.running_pod("keep")
    kljs.wait_phase("keep", "Downloading")
    klj = kljs.get("keep")
    assert "kontext-lora.io/cleanup" in klj["metadata"]["finalizers"]

    kljs.delete("keep")  # waits until the object is gone, i.e. the finalizer ran
    assert kljs.get("keep") is None
    for kind in ("job", "serviceaccount", "role", "rolebinding"):
        wait_for(
            lambda kind=kind: (
                crd.kubectl("get", kind, "keep-trainer", "-n", kljs.namespace, check=False).returncode != 0
            ),
            what=f"{kind} keep-trainer to be deleted",
        )
    wait_for(lambda: not kljs.pods("keep"), what="the trainer pod to be deleted")
    listed = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", []))
    assert listed == sorted(kept), "deleting a job never deletes its LoRAs"
    deleted = kljs.wait_event("keep", "Deleted")
    assert f"s3://{bucket}/loras/keep/" in deleted["message"] and "kept" in deleted["message"]


@pytest.mark.slow
def test_active_deadline_fails_the_job_and_ttl_deletes_it(crd: Cluster, kljs: Kljs, operator) -> None:
    # 60 s is the smallest deadline the API accepts; the real job controller enforces it.
    kljs.apply(job_manifest("deadline", runPolicy={"activeDeadlineSeconds": 60, "ttlSecondsAfterFinished": 3}))
    kljs.running_pod("deadline")
    assert kljs.jobs("deadline")[0]["spec"]["activeDeadlineSeconds"] == 60
    status = kljs.wait_phase("deadline", "Failed", timeout=100)
    assert status["reason"] == "DeadlineExceeded" and "activeDeadlineSeconds (60s)" in status["message"]
    failed_at = time.monotonic()
    assert next(c for c in status["conditions"] if c["type"] == "Failed")["reason"] == "DeadlineExceeded"

    wait_for(lambda: kljs.get("deadline") is None, timeout=30, what="ttlSecondsAfterFinished to delete the job")
    print(f"\ndeleted {time.monotonic() - failed_at:.1f}s after Failed was seen (ttlSecondsAfterFinished: 3)")
    expired = kljs.wait_event("deadline", "Expired")
    assert "ttlSecondsAfterFinished" in expired["message"]
    wait_for(lambda: not kljs.jobs("deadline"), what="the Job to go with it")


def test_a_deleted_batch_job_is_made_again(crd: Cluster, kljs: Kljs, operator) -> None:
    kljs.apply(job_manifest("phoenix"))
    old = wait_for(lambda: kljs.jobs("phoenix"), what="batch Job")[0]
    kljs.wait_phase("phoenix", "Downloading")
    crd.kubectl("delete", "job", "phoenix-trainer", "-n", kljs.namespace, "--cascade=foreground", "--wait=false")
    new = wait_for(
        lambda: [j for j in kljs.jobs("phoenix") if j["metadata"]["uid"] != old["metadata"]["uid"]],
        what="the Job to be made again",
    )[0]
    assert new["metadata"]["name"] == "phoenix-trainer"
    kljs.wait_event("phoenix", "JobMissing")
    kljs.wait_phase("phoenix", "Downloading")
