"""The real scheduler places GPU-class pods on matching KWOK nodes, and explains when it cannot."""

from __future__ import annotations

import json
import time

import pytest

from kontext_lora.api import DEFAULT_GPU_CLASSES, GpuClass
from tests.conftest import Cluster

pytestmark = pytest.mark.cluster


def _gpu_job(name: str, gpu_class: GpuClass, gpus: int) -> dict:
    placement = DEFAULT_GPU_CLASSES[gpu_class]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "tolerations": [t.to_wire() for t in placement.tolerations],
                    "affinity": {
                        "nodeAffinity": {
                            "requiredDuringSchedulingIgnoredDuringExecution": {
                                "nodeSelectorTerms": [
                                    {"matchExpressions": [m.to_wire() for m in placement.match_expressions]}
                                ]
                            }
                        }
                    },
                    "containers": [
                        {
                            "name": "trainer",
                            "image": "kontext-lora-trainer:test",
                            "resources": {"limits": {placement.resource_name: str(gpus)}},
                        }
                    ],
                }
            },
        },
    }


def _pod_of(cluster: Cluster, namespace: str, job: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pods = json.loads(cluster.kubectl("get", "pods", "-n", namespace, "-l", f"job-name={job}", "-o", "json").stdout)
        if pods["items"]:
            return pods["items"][0]
        time.sleep(0.3)
    raise TimeoutError(f"no pod for job {job}")


def _wait(predicate, timeout: float = 60, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise TimeoutError(what)


@pytest.mark.parametrize(
    ("gpu_class", "product", "min_memory"),
    [
        (GpuClass.L40S_48GB, "NVIDIA-L40S", 45000),
        (GpuClass.RTX4090_48GB, "NVIDIA-GeForce-RTX-4090", 45000),
    ],
)
def test_gpu_job_lands_on_a_matching_node(
    cluster: Cluster, namespace: str, gpu_class: GpuClass, product: str, min_memory: int
) -> None:
    name = f"place-{gpu_class.value.lower()}"
    cluster.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(_gpu_job(name, gpu_class, 1)))

    def scheduled_node() -> str | None:
        return _pod_of(cluster, namespace, name)["spec"].get("nodeName")

    node_name = _wait(scheduled_node, what=f"{name} scheduled")
    node = json.loads(cluster.kubectl("get", "node", node_name, "-o", "json").stdout)
    labels = node["metadata"]["labels"]
    assert labels["nvidia.com/gpu.product"] == product
    assert int(labels["nvidia.com/gpu.memory"]) > min_memory, "a 24 GB card was picked for a 48 GB class"
    assert not node_name.startswith("cpu-")


def test_job_asking_for_more_gpus_than_exist_stays_pending_with_the_reason(cluster: Cluster, namespace: str) -> None:
    cluster.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(_gpu_job("too-big", GpuClass.L40S_48GB, 16)))

    def unschedulable() -> dict | None:
        pod = _pod_of(cluster, namespace, "too-big")
        for condition in pod["status"].get("conditions", []):
            if condition["type"] == "PodScheduled" and condition.get("reason") == "Unschedulable":
                return {"pod": pod, "condition": condition}
        return None

    found = _wait(unschedulable, what="Unschedulable condition")
    assert found["pod"]["status"]["phase"] == "Pending"
    assert "nvidia.com/gpu" in found["condition"]["message"], found["condition"]["message"]
    assert "Insufficient" in found["condition"]["message"]
    events = cluster.kubectl(
        "get",
        "events",
        "-n",
        namespace,
        "--field-selector",
        "reason=FailedScheduling",
        "-o",
        "jsonpath={.items[*].message}",
    ).stdout
    assert "Insufficient nvidia.com/gpu" in events


def test_cpu_only_pod_without_toleration_never_lands_on_a_gpu_node(cluster: Cluster, namespace: str) -> None:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "cpu-work"},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]},
    }
    cluster.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(pod))

    def node() -> str | None:
        return json.loads(cluster.kubectl("get", "pod", "cpu-work", "-n", namespace, "-o", "json").stdout)["spec"].get(
            "nodeName"
        )

    assert _wait(node, what="cpu pod scheduled").startswith("cpu-")
