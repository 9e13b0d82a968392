"""The test-only node agent (tests/infra/node_agent.py) behaves like a kubelet for what the e2e test needs,
and, with a contract-following stand-in trainer, carries a KontextLoRAJob from apply to Succeeded through the
operator, the real scheduler and the per-job RBAC."""

from __future__ import annotations

import json
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import Cluster
from tests.infra.klj import Kljs, job_manifest
from tests.infra.node_agent import NodeAgent
from tests.infra.processes import wait_for

pytestmark = pytest.mark.cluster
FAKE_TRAINER = Path(__file__).resolve().parents[1] / "infra" / "fake_trainer.py"

SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys, time
    from pathlib import Path
    out = Path(os.environ["OUT"])
    out.joinpath("env.json").write_text(json.dumps(dict(os.environ)))
    mode = os.environ["MODE"]
    if mode == "fail":
        Path(os.environ["KONTEXT_LORA_TERMINATION_LOG"]).write_text("spec.dataset: 3 pairs have no caption")
        sys.exit(3)
    if mode == "sleep":
        signal.signal(signal.SIGTERM, lambda *_: (out.joinpath("sigterm").write_text("yes"), sys.exit(143)))
        while True:
            time.sleep(0.05)
    """
)


def bare_pod(name: str, node: str, mode: str, secret: str = "creds") -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "probe"}},
        "spec": {
            "nodeName": node,
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 5,
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "volumes": [{"name": "scratch", "emptyDir": {}}],
            "containers": [
                {
                    "name": "main",
                    "image": "python",
                    "command": [sys.executable, "-c", SCRIPT],
                    "terminationMessagePolicy": "FallbackToLogsOnError",
                    "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
                    "env": [
                        {"name": "MODE", "value": mode},
                        {"name": "OUT", "value": "/scratch"},
                        {"name": "GREETING", "value": "hello $(MODE)"},
                        {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                        {"name": "KEY", "valueFrom": {"secretKeyRef": {"name": secret, "key": "key"}}},
                    ],
                }
            ],
        },
    }


def pod_status(crd: Cluster, namespace: str, name: str) -> dict:
    result = crd.kubectl("get", "pod", name, "-n", namespace, "-o", "json", check=False)
    return json.loads(result.stdout)["status"] if result.returncode == 0 else {}


def test_agent_runs_pods_like_a_kubelet(crd: Cluster, namespace: str, agent_node: NodeAgent) -> None:
    node = json.loads(crd.kubectl("get", "node", agent_node.name, "-o", "json").stdout)
    assert node["metadata"]["labels"]["nvidia.com/gpu.product"] == "NVIDIA-L40S"
    assert node["status"]["allocatable"]["nvidia.com/gpu"] == "1"

    # A missing Secret keeps the container from starting, as on a kubelet; creating it lets the pod start.
    crd.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(bare_pod("fails", agent_node.name, "fail")))
    waiting = wait_for(
        lambda: (
            (pod_status(crd, namespace, "fails").get("containerStatuses") or [{}])[0].get("state", {}).get("waiting")
        ),
        what="CreateContainerConfigError",
    )
    assert waiting == {"reason": "CreateContainerConfigError", "message": 'secret "creds" not found'}
    crd.kubectl("create", "secret", "generic", "creds", "-n", namespace, "--from-literal=key=s3cr3t")
    status = wait_for(
        lambda: (s := pod_status(crd, namespace, "fails")).get("phase") == "Failed" and s, what="pod Failed"
    )
    terminated = status["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 3 and terminated["message"] == "spec.dataset: 3 pairs have no caption"
    env = json.loads((agent_node.find_dir(namespace, "fails") / "volumes" / "scratch" / "env.json").read_text())
    assert env["KEY"] == "s3cr3t" and env["POD"] == "fails" and env["GREETING"] == "hello fail"
    assert env["OUT"].endswith("/volumes/scratch"), "mount paths map to the volume's folder"
    assert "KUBECONFIG" in env and "KUBERNETES_SERVICE_HOST" not in env

    # Deletion: SIGTERM first, then the pod object goes.
    crd.kubectl(
        "apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(bare_pod("sleeper", agent_node.name, "sleep"))
    )
    agent_node.wait_process(namespace, "sleeper")
    wait_for(lambda: pod_status(crd, namespace, "sleeper").get("phase") == "Running", what="Running")
    crd.kubectl("delete", "pod", "sleeper", "-n", namespace, "--wait=true", "--timeout=30s")
    assert (agent_node.find_dir(namespace, "sleeper") / "volumes" / "scratch" / "sigterm").read_text() == "yes"

    # kill_pod: the process dies as in an OOM kill or node failure; the pod reports 137.
    crd.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(bare_pod("victim", agent_node.name, "sleep")))
    agent_node.wait_process(namespace, "victim")
    agent_node.kill_pod(namespace, "victim")
    status = wait_for(
        lambda: (s := pod_status(crd, namespace, "victim")).get("phase") == "Failed" and s, what="killed pod Failed"
    )
    assert status["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 137


def test_operator_and_agent_take_a_job_from_apply_to_succeeded(
    crd: Cluster, kljs: Kljs, operator, agent_node: NodeAgent
) -> None:
    agent_node.commands["kontext-lora"] = [sys.executable, str(FAKE_TRAINER)]
    kljs.create_s3_secret()
    kljs.apply(job_manifest("agent-job"))
    status = kljs.wait_phase("agent-job", "Succeeded", timeout=60)
    pod = kljs.pods("agent-job")[0]
    assert pod["spec"]["nodeName"] == agent_node.name, "the scheduler picked the only schedulable L40S node"
    # The stand-in trainer wrote its progress with the pod's token, through the per-job Role.
    assert status["step"] == 100 and status["loss"] == pytest.approx(0.125)
    assert status["loraUri"] == "s3://loras-out/test/agent-job.safetensors"
    assert f"LoRA written to {status['loraUri']}" == status["message"]
    reasons = [e["reason"] for e in kljs.events("agent-job")]
    assert "Succeeded" in reasons


def test_failure_message_from_a_real_process_reaches_the_status(crd: Cluster, kljs: Kljs, operator, agent_node) -> None:
    agent_node.commands["kontext-lora"] = [sys.executable, str(FAKE_TRAINER)]
    kljs.create_s3_secret()
    agent_node.env_overrides.update(
        FAKE_TRAINER_EXIT="3", FAKE_TRAINER_MESSAGE="cannot reach s3://loras-data/ at http://127.0.0.1:9"
    )
    kljs.apply(job_manifest("unreachable"))
    status = kljs.wait_phase("unreachable", "Failed", timeout=60)
    assert status["reason"] == "StorageUnreachable" and "cannot reach s3://loras-data/" in status["message"]


def test_suspend_terminates_the_process_and_resume_starts_a_new_one(
    crd: Cluster, kljs: Kljs, operator, agent_node
) -> None:
    agent_node.commands["kontext-lora"] = [sys.executable, str(FAKE_TRAINER)]
    kljs.create_s3_secret()
    agent_node.env_overrides["FAKE_TRAINER_WAIT"] = "1"
    kljs.apply(job_manifest("sleepy"))
    kljs.wait_phase("sleepy", "Training")
    first = kljs.pods("sleepy")[0]["metadata"]["name"]
    kljs.patch_spec("sleepy", {"suspend": True})
    kljs.wait_phase("sleepy", "Suspended")
    wait_for(lambda: not kljs.pods("sleepy"), what="the suspended pod to go")
    assert (agent_node.find_dir(kljs.namespace, first) / "volumes" / "work" / "terminated").read_text() == "SIGTERM"
    kljs.patch_spec("sleepy", {"suspend": False})
    status = kljs.wait_status("sleepy", lambda s: s.get("phase") == "Training" and kljs.pods("sleepy"), what="resumed")
    assert kljs.pods("sleepy")[0]["metadata"]["name"] != first
    assert status["step"] == 50
    time.sleep(0.1)
