"""Test helpers around KontextLoRAJobs on the real control plane: manifests, reads, waits, events, pod endings.

Reads go through the Python client (cheap to poll); what a user does (apply, patch, delete) goes through kubectl.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from typing import Any

import yaml
from kubernetes import client

from kontext_lora.api import API_VERSION, GROUP, KIND, PLURAL, VERSION

from .controlplane import ControlPlane

JOB_LABEL = "kontext-lora.io/job"
ROLE_LABEL = "kontext-lora.io/role"
PREPARE, TRAIN = "prepare", "train"
# On KWOK nodes a preparation pod succeeds by itself (tests/infra/kwok-stages) unless its pod carries this; the
# operator config `{"preparation": {"annotations": MANUAL_PREPARATION}}` lets a test end it (`end_pod`).
MANUAL_PREPARATION = {"kwok.kontext-lora.io/manual": "true"}


def _role(role: str) -> str:
    # Objects made before preparation Jobs existed carry no role label: they are GPU ones.
    return f"{ROLE_LABEL}!={PREPARE}" if role == TRAIN else f"{ROLE_LABEL}={role}"


def job_manifest(name: str, **spec: Any) -> dict[str, Any]:
    """A small valid KontextLoRAJob; keyword arguments replace top-level spec sections."""
    base: dict[str, Any] = {
        "dataset": {
            "uri": "s3://loras-data/test/",
            "controlDir": "control",
            "targetDir": "target",
            "defaultCaption": "remove the object",
            "triggerWord": "RMV,",
        },
        "lora": {"rank": 16},
        "training": {"steps": 100},
        "checkpoints": {"saveEvery": 50, "keep": 2},
        "output": {"uri": "s3://loras-out/test/"},
        "storage": {"endpoint": "http://127.0.0.1:9000", "credentialsSecret": "s3-credentials"},
        "resources": {"gpu": "L40S-48GB", "cpu": "1", "memory": "1Gi"},
    }
    base.update(copy.deepcopy(spec))
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name}, "spec": base}


class Kljs:
    """Reads and user actions for the KontextLoRAJobs of one namespace."""

    def __init__(self, plane: ControlPlane, namespace: str, api_client: client.ApiClient):
        self.plane = plane
        self.namespace = namespace
        self.api = api_client
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self.batch = client.BatchV1Api(api_client)

    # ---- user actions (kubectl) ----

    def apply(self, manifest: dict[str, Any], check: bool = True):
        return self.plane.kubectl("apply", "-n", self.namespace, "-f", "-", input=yaml.safe_dump(manifest), check=check)

    def patch_spec(self, name: str, spec: dict[str, Any], check: bool = True):
        return self.plane.kubectl(
            "patch", "klj", name, "-n", self.namespace, "--type=merge", "-p", json.dumps({"spec": spec}), check=check
        )

    def delete(self, name: str, wait: bool = True, timeout: str = "60s"):
        return self.plane.kubectl(
            "delete", "klj", name, "-n", self.namespace, f"--wait={str(wait).lower()}", f"--timeout={timeout}"
        )

    def create_s3_secret(
        self, access_key: str = "test-access", secret_key: str = "test-secret", name: str = "s3-credentials"
    ):
        """The storage Secret a job names in spec.storage.credentialsSecret (pods read it; the operator never)."""
        return self.plane.kubectl(
            "create",
            "secret",
            "generic",
            name,
            "-n",
            self.namespace,
            f"--from-literal=AWS_ACCESS_KEY_ID={access_key}",
            f"--from-literal=AWS_SECRET_ACCESS_KEY={secret_key}",
        )

    # ---- reads (API) ----

    def get(self, name: str) -> dict[str, Any] | None:
        try:
            return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)
        except client.ApiException as error:
            if error.status == 404:
                return None
            raise

    def status(self, name: str) -> dict[str, Any]:
        return (self.get(name) or {}).get("status") or {}

    def condition(self, name: str, kind: str) -> dict[str, Any] | None:
        return next((c for c in self.status(name).get("conditions", []) if c["type"] == kind), None)

    def wait_status(
        self, name: str, predicate: Callable[[dict[str, Any]], Any], timeout: float = 60, what: str = "status"
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        status: dict[str, Any] = {}
        while time.monotonic() < deadline:
            status = self.status(name)
            if predicate(status):
                return status
            time.sleep(0.2)
        raise TimeoutError(f"{name}: timed out after {timeout:.0f}s waiting for {what}; status: {json.dumps(status)}")

    def wait_phase(self, name: str, phase: str, timeout: float = 60) -> dict[str, Any]:
        return self.wait_status(name, lambda s: s.get("phase") == phase, timeout, f"phase {phase}")

    def jobs(self, name: str | None = None, role: str = TRAIN) -> list[dict[str, Any]]:
        """The batch Jobs of a job (of all jobs without a name): its GPU Jobs, or with `role=PREPARE` its
        preparation Jobs."""
        selector = f"{JOB_LABEL}={name}" if name else JOB_LABEL
        items = self.batch.list_namespaced_job(self.namespace, label_selector=f"{selector},{_role(role)}").items
        return [self.api.sanitize_for_serialization(item) for item in items]

    def pods(self, name: str, role: str = TRAIN) -> list[dict[str, Any]]:
        """A job's trainer (GPU) pods, oldest first; with `role=PREPARE` its preparation pods."""
        selector = f"{JOB_LABEL}={name},{_role(role)}"
        items = self.core.list_namespaced_pod(self.namespace, label_selector=selector).items
        pods = [self.api.sanitize_for_serialization(item) for item in items]
        return sorted(pods, key=lambda p: p["metadata"]["creationTimestamp"])

    def running_pod(self, name: str, timeout: float = 60, role: str = TRAIN) -> dict[str, Any]:
        def running() -> dict[str, Any] | None:
            live = [
                p
                for p in self.pods(name, role)
                if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")
            ]
            return live[-1] if live else None

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if found := running():
                return found
            time.sleep(0.2)
        phases = [p["status"].get("phase") for p in self.pods(name, role)]
        raise TimeoutError(f"no running {role} pod for {name}: {phases}")

    def events(self, name: str) -> list[dict[str, Any]]:
        items = self.core.list_namespaced_event(
            self.namespace, field_selector=f"involvedObject.kind={KIND},involvedObject.name={name}"
        ).items
        return [self.api.sanitize_for_serialization(item) for item in items]

    def wait_event(self, name: str, reason: str, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events(name):
                if event.get("reason") == reason:
                    return event
            time.sleep(0.2)
        found = [(e.get("reason"), e.get("message")) for e in self.events(name)]
        raise TimeoutError(f"no {reason} event for {name}; events: {found}")

    def get_table(self, name: str) -> dict[str, str]:
        """`kubectl get klj NAME` as {column: value}."""
        lines = self.plane.kubectl("get", "klj", name, "-n", self.namespace).stdout.splitlines()
        header, row = lines[0], lines[1]
        starts = [i for i, ch in enumerate(header) if ch != " " and (i == 0 or header[i - 1] == " ")]
        bounds = [*starts[1:], None]
        return {header[s:e].strip(): row[s:e].strip() for s, e in zip(starts, bounds, strict=True)}

    # ---- what a kubelet would do ----

    def end_pod(self, pod: str, exit_code: int, message: str = "") -> None:
        """Finish a running trainer pod as the kubelet reports it: phase, exit code and termination message."""
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        state = {
            "terminated": {
                "exitCode": exit_code,
                "reason": "Completed" if exit_code == 0 else "Error",
                "message": message,
                "startedAt": now,
                "finishedAt": now,
            }
        }
        body = {
            "status": {
                "phase": "Succeeded" if exit_code == 0 else "Failed",
                "conditions": [
                    {"type": "Ready", "status": "False", "reason": "PodCompleted", "lastTransitionTime": now},
                    {"type": "ContainersReady", "status": "False", "reason": "PodCompleted", "lastTransitionTime": now},
                ],
                "containerStatuses": [
                    {
                        "name": "trainer",
                        "image": "trainer",
                        "imageID": "",
                        "ready": False,
                        "restartCount": 0,
                        "started": False,
                        "state": state,
                    }
                ],
            }
        }
        self.core.patch_namespaced_pod_status(pod, self.namespace, body)

    def token_for(self, service_account: str, seconds: int = 3600) -> str:
        request = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"expirationSeconds": seconds},
        }
        response = self.core.create_namespaced_service_account_token(service_account, self.namespace, request)
        return self.api.sanitize_for_serialization(response)["status"]["token"]
