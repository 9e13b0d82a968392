"""The operator turns a KontextLoRAJob into a scheduled GPU Job and reports its life in status and Events.

The operator runs as a subprocess under its least-privilege ServiceAccount; the control plane, scheduler and
job controller are real; pods run on KWOK GPU nodes and end when the test says how (as a kubelet would report).
"""

from __future__ import annotations

import json
import time

import pytest
from kubernetes import client, config

from tests.conftest import Cluster
from tests.infra.klj import MANUAL_PREPARATION, PREPARE, Kljs, job_manifest
from tests.infra.operator_process import OperatorProcess
from tests.infra.processes import wait_for

pytestmark = pytest.mark.cluster


def trainer_client(cluster: Cluster, kljs: Kljs, service_account: str) -> client.CustomObjectsApi:
    """The API as the trainer pod sees it: its own service-account token, nothing else."""
    kubeconfig = cluster.plane.write_kubeconfig(f"trainer-{kljs.namespace}", token=kljs.token_for(service_account))
    return client.CustomObjectsApi(config.new_client_from_config(config_file=str(kubeconfig)))


def test_apply_creates_an_owned_gpu_job_and_status_follows_it_to_success(
    crd: Cluster, kljs: Kljs, operator: OperatorProcess
) -> None:
    began = time.monotonic()
    kljs.apply(job_manifest("jewels"))
    preparation = wait_for(lambda: kljs.jobs("jewels", role=PREPARE), timeout=30, what="preparation Job")[0]
    created_after = time.monotonic() - began
    # KWOK's CPU node ends the preparation pod half a second after it started (tests/infra/kwok-stages).
    job = wait_for(lambda: kljs.jobs("jewels"), timeout=30, what="batch Job")[0]
    gpu_job_after = time.monotonic() - began
    print(f"\napply -> preparation Job created: {created_after:.2f}s, GPU Job created: {gpu_job_after:.2f}s")
    assert created_after < 5
    [prepared_on] = [p["spec"]["nodeName"] for p in kljs.pods("jewels", role=PREPARE)]
    assert prepared_on.startswith("cpu-"), "the preparation runs on a CPU node, never holding a GPU"
    assert preparation["metadata"]["name"] == "jewels-prepare"
    assert preparation["metadata"]["ownerReferences"][0]["uid"] == kljs.get("jewels")["metadata"]["uid"]

    klj = kljs.get("jewels")
    owner = {"apiVersion": "kontext-lora.io/v1alpha1", "kind": "KontextLoRAJob", "name": "jewels"}
    assert job["metadata"]["name"] == "jewels-trainer"
    [reference] = job["metadata"]["ownerReferences"]
    assert owner.items() <= reference.items() and reference["uid"] == klj["metadata"]["uid"]
    assert reference["controller"] is True
    for kind in ("serviceaccount", "role", "rolebinding"):
        obj = json.loads(crd.kubectl("get", kind, "jewels-trainer", "-n", kljs.namespace, "-o", "json").stdout)
        assert obj["metadata"]["ownerReferences"][0]["uid"] == klj["metadata"]["uid"], kind
    role = json.loads(crd.kubectl("get", "role", "jewels-trainer", "-n", kljs.namespace, "-o", "json").stdout)
    assert all(rule["resourceNames"] == ["jewels"] for rule in role["rules"])

    # The real scheduler puts the pod on a 48 GB L40S node.
    pod = kljs.running_pod("jewels")
    node = json.loads(crd.kubectl("get", "node", pod["spec"]["nodeName"], "-o", "json").stdout)
    assert node["metadata"]["labels"]["nvidia.com/gpu.product"] == "NVIDIA-L40S"
    env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {
        "name": "s3-credentials",
        "key": "AWS_ACCESS_KEY_ID",
    }
    assert json.loads(env["KONTEXT_LORA_JOB"]["value"])["spec"]["lora"]["rank"] == 16

    status = kljs.wait_phase("jewels", "Downloading")
    assert status["jobName"] == "jewels-trainer" and status["startTime"]
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        "Prepared": "True",
        "Created": "True",
        "Running": "True",
    }

    # The trainer reports progress with its pod's token, through the per-job Role.
    trainer = trainer_client(crd, kljs, "jewels-trainer")
    progress = {
        "stage": "Training",
        "step": 40,
        "totalSteps": 100,
        "loss": 0.1234,
        "stepsPerSecond": 2.5,
        "etaSeconds": 24,
        "lastProgressTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "checkpoints": [
            {"step": 40, "uri": "s3://loras-out/test/checkpoints/step-000040/jewels-step-000040.safetensors"}
        ],
    }
    trainer.patch_namespaced_custom_object_status(
        "kontext-lora.io", "v1alpha1", kljs.namespace, "kontextlorajobs", "jewels", {"status": progress}
    )
    status = kljs.wait_phase("jewels", "Training")
    assert status["step"] == 40 and status["loss"] == pytest.approx(0.1234)
    table = kljs.get_table("jewels")
    assert table["PHASE"] == "Training" and table["STEP"] == "40" and table["LOSS"] == "0.1234"
    assert table["GPU"] == "L40S-48GB" and table["AGE"]

    # ...and nothing more: not the spec, not another job.
    with pytest.raises(client.ApiException) as refused:
        trainer.patch_namespaced_custom_object(
            "kontext-lora.io", "v1alpha1", kljs.namespace, "kontextlorajobs", "jewels", {"spec": {"suspend": True}}
        )
    assert refused.value.status == 403
    kljs.apply(job_manifest("other", suspend=True))
    with pytest.raises(client.ApiException) as refused:
        trainer.patch_namespaced_custom_object_status(
            "kontext-lora.io", "v1alpha1", kljs.namespace, "kontextlorajobs", "other", {"status": {"step": 1}}
        )
    assert refused.value.status == 403

    kljs.end_pod(pod["metadata"]["name"], 0)
    status = kljs.wait_phase("jewels", "Succeeded")
    assert status["completionTime"] and status["restarts"] == 0
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Succeeded"]["status"] == "True" and conditions["Running"]["status"] == "False"
    for reason in ("PreparationCreated", "JobCreated", "Pending", "Downloading", "Training", "Succeeded"):
        kljs.wait_event("jewels", reason)  # an Event is posted just after the status write it reports

    # Operator metrics on its own port.
    assert operator.metric_value("kontext_operator_jobs", phase="Succeeded") == 1
    assert operator.metric_value("kontext_operator_jobs", phase="Suspended") == 1
    assert operator.metric_value("kontext_operator_jobs", phase="Failed") == 0
    assert operator.metric_value("kontext_operator_reconcile_seconds_count", handler="create") >= 2
    assert operator.metric_value("kontext_operator_reconcile_seconds_count", handler="sync") >= 5
    assert operator.metric_value("kontext_operator_reconcile_errors_total", handler="create") in (None, 0)


def test_invalid_spec_fails_with_the_field_named_and_creates_nothing(kljs: Kljs, start_operator, crd: Cluster) -> None:
    # This cluster's operator only knows the L40S class: a spec the CRD accepts but the operator cannot run.
    start_operator(
        config={
            "gpuClasses": {
                "L40S-48GB": {
                    "matchExpressions": [{"key": "nvidia.com/gpu.product", "operator": "In", "values": ["NVIDIA-L40S"]}]
                }
            }
        }
    )
    kljs.apply(job_manifest("wrong-gpu", resources={"gpu": "RTX4090-48GB"}))
    status = kljs.wait_phase("wrong-gpu", "Failed")
    assert status["reason"] == "InvalidSpec"
    assert "spec.resources.gpu" in status["message"] and "RTX4090-48GB" in status["message"]
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "InvalidSpec" and "spec.resources.gpu" in failed["message"]
    event = kljs.wait_event("wrong-gpu", "InvalidSpec")
    assert event["type"] == "Warning" and "spec.resources.gpu" in event["message"]

    # A name the CRD accepts (DNS subdomain) but a job cannot have (it becomes a label value and pod names).
    kljs.apply(job_manifest("dotted.name"))
    status = kljs.wait_phase("dotted.name", "Failed")
    assert status["reason"] == "InvalidSpec" and "metadata.name" in status["message"]

    # The hub's FLUX.1-Kontext-dev at 1024² in batches of 16: its measured peak cannot fit a 48 GB card.
    kljs.apply(job_manifest("too-big", training={"steps": 100, "batchSize": 16}))
    status = kljs.wait_phase("too-big", "Failed")
    assert status["reason"] == "InvalidSpec" and "spec.training.batchSize" in status["message"]
    assert "GB of GPU memory" in status["message"] and "batchSize: " in status["message"]  # what fits instead
    assert kljs.jobs() == [] and kljs.jobs(role=PREPARE) == []


def test_a_job_that_cannot_be_scheduled_shows_the_schedulers_reason(kljs: Kljs, start_operator) -> None:
    # No node carries this product: the scheduler says so, and the status repeats it.
    start_operator(
        config={
            "gpuClasses": {
                "L40S-48GB": {
                    "matchExpressions": [{"key": "nvidia.com/gpu.product", "operator": "In", "values": ["NVIDIA-H200"]}]
                }
            }
        }
    )
    kljs.apply(job_manifest("nowhere"))
    status = kljs.wait_status("nowhere", lambda s: s.get("reason") == "Unschedulable", what="Unschedulable")
    assert status["phase"] == "Pending"
    assert "0/" in status["message"] and "node affinity" in status["message"], status["message"]
    running = next(c for c in status["conditions"] if c["type"] == "Running")
    assert running["status"] == "False" and running["reason"] == "Unschedulable"
    event = kljs.wait_event("nowhere", "Unschedulable")
    assert event["type"] == "Warning" and "node affinity" in event["message"]


def test_the_preparation_runs_on_the_configured_cpu_node_and_its_failure_means_no_gpu_job(
    crd: Cluster, kljs: Kljs, start_operator
) -> None:
    start_operator(
        config={"preparation": {"annotations": MANUAL_PREPARATION, "nodeSelector": {"kubernetes.io/hostname": "cpu-1"}}}
    )
    kljs.apply(job_manifest("unprepared"))
    pod = kljs.running_pod("unprepared", role=PREPARE)
    assert pod["spec"]["nodeName"] == "cpu-1" and pod["spec"]["nodeSelector"] == {"kubernetes.io/hostname": "cpu-1"}
    [container] = pod["spec"]["containers"]
    assert container["command"] == ["kontext-lora", "prepare", "--from-env"]
    assert "nvidia.com/gpu" not in container["resources"]["requests"]
    assert not [t for t in pod["spec"].get("tolerations") or [] if "gpu" in t["key"]], "it tolerates no GPU taint"
    # The preparation pod reports its progress through the job's Role, as the trainer does.
    preparer = trainer_client(crd, kljs, "unprepared-trainer")
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 1))
    report = {
        "stage": "Preparing",
        "lastProgressTime": now,
        "preparation": {"task": "downloading pairs", "done": 3, "total": 10},
    }
    preparer.patch_namespaced_custom_object_status(
        "kontext-lora.io", "v1alpha1", kljs.namespace, "kontextlorajobs", "unprepared", {"status": report}
    )
    status = kljs.wait_status("unprepared", lambda s: "downloading pairs (3/10)" in (s.get("message") or ""), 30)
    assert status["phase"] == "Preparing" and status["reason"] == "Preparing"

    refusal = "model black-forest-labs/FLUX.1-Kontext-dev is gated: ... not in the authorized list"
    kljs.end_pod(pod["metadata"]["name"], 4, refusal)
    status = kljs.wait_phase("unprepared", "Failed")
    assert status["reason"] == "ModelAccessDenied" and refusal in status["message"]
    assert status["message"].startswith("preparation failed, no GPU was requested")
    prepared = next(c for c in status["conditions"] if c["type"] == "Prepared")
    assert prepared["status"] == "False" and prepared["reason"] == "ModelAccessDenied"
    time.sleep(1)
    assert kljs.jobs("unprepared") == [], "no GPU Job after a failed preparation"
    assert kljs.wait_event("unprepared", "ModelAccessDenied")["type"] == "Warning"


def test_invalid_input_exit_code_fails_at_once_with_the_trainers_message(kljs: Kljs, operator) -> None:
    kljs.apply(job_manifest("bad-data", runPolicy={"backoffLimit": 3}))
    pod = kljs.running_pod("bad-data")
    reason = "dataset: target/7.png has no control image in control/ (expected control/7.png)"
    kljs.end_pod(pod["metadata"]["name"], 2, reason)
    status = kljs.wait_phase("bad-data", "Failed")
    assert status["reason"] == "InvalidInput"
    assert "exited with code 2" in status["message"] and reason in status["message"]
    assert status["restarts"] == 0
    time.sleep(1)
    assert len(kljs.pods("bad-data")) == 1, "podFailurePolicy FailJob: no retry for invalid input"
    event = kljs.wait_event("bad-data", "InvalidInput")
    assert event["type"] == "Warning" and reason in event["message"]


def test_crashes_are_retried_up_to_the_backoff_limit(crd: Cluster, kljs: Kljs, operator) -> None:
    kljs.apply(job_manifest("flaky", runPolicy={"backoffLimit": 1}))
    first = kljs.running_pod("flaky")
    kljs.end_pod(first["metadata"]["name"], 1, "CUDA error: an illegal memory access was encountered")
    status = kljs.wait_status("flaky", lambda s: s.get("restarts") == 1, what="a restart")
    second = wait_for(
        lambda: [p for p in kljs.pods("flaky") if p["metadata"]["name"] != first["metadata"]["name"]],
        what="a second pod",
    )[0]
    restarting = kljs.wait_event("flaky", "Restarting")
    assert "illegal memory access" in restarting["message"]
    kljs.running_pod("flaky")
    status = kljs.wait_status("flaky", lambda s: s.get("phase") == "Downloading", what="running again")
    assert next(c for c in status["conditions"] if c["type"] == "Restarting")["status"] == "False"

    kljs.end_pod(second["metadata"]["name"], 137)
    status = kljs.wait_phase("flaky", "Failed")
    assert status["reason"] == "BackoffLimitExceeded" and status["restarts"] == 1
    assert "backoffLimit is 1" in status["message"] and "code 137" in status["message"]


def test_an_object_in_the_way_is_never_taken_over(crd: Cluster, kljs: Kljs, operator) -> None:
    # Someone else's ServiceAccount has the name the job's would get: the operator must not adopt it.
    crd.kubectl("create", "serviceaccount", "taken-trainer", "-n", kljs.namespace)
    kljs.apply(job_manifest("taken"))
    status = kljs.wait_status("taken", lambda s: s.get("reason") == "NameTaken", what="NameTaken")
    assert status["phase"] == "Pending"
    assert "ServiceAccount named taken-trainer already exists" in status["message"]
    event = kljs.wait_event("taken", "NameTaken")
    assert event["type"] == "Warning"
    assert kljs.jobs("taken") == []
