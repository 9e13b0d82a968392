"""A small asynchronous façade over the Kubernetes API: JSON in, JSON out, typed errors.

Requests go through the official client's ApiClient (its authentication: kubeconfig, in-cluster token with
rotation, client certificates) and run in a bounded thread pool, so the kopf event loop never blocks. Bodies
are plain dicts: the operator builds manifests as data (resources.py) and keeps trimmed objects in memory.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from kontext_lora.api import GROUP, PLURAL, VERSION

JSON = "application/json"
MERGE_PATCH = "application/merge-patch+json"
REQUEST_TIMEOUT = 30.0
# Which replica wrote an Event: kopf's peering identity (the pod name in a cluster), else the host name.
REPORTING_INSTANCE = (os.environ.get("POD_ID") or os.environ.get("POD_NAME") or socket.gethostname())[:128]


class KubeError(Exception):
    """An API request that failed; `status` is the HTTP status (0 when the server was not reached)."""

    def __init__(self, method: str, path: str, status: int, reason: str, message: str):
        self.method, self.path, self.status, self.reason, self.message = method, path, status, reason, message
        super().__init__(f"{method} {path}: {status} {reason}: {message}")

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def conflict(self) -> bool:
        return self.status == 409


def klj_path(namespace: str, name: str | None = None, subresource: str | None = None) -> str:
    path = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}"
    path += f"/{name}" if name else ""
    return path + (f"/{subresource}" if subresource else "")


def object_path(kind: str, namespace: str, name: str | None = None) -> str:
    base = {
        "Job": "/apis/batch/v1/namespaces/{ns}/jobs",
        "ServiceAccount": "/api/v1/namespaces/{ns}/serviceaccounts",
        "Role": "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles",
        "RoleBinding": "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings",
        "Event": "/api/v1/namespaces/{ns}/events",
    }[kind].format(ns=namespace)
    return f"{base}/{name}" if name else base


class Kube:
    def __init__(self, api_client: client.ApiClient, max_workers: int = 16):
        self.api = api_client
        self.executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="kube-api")

    @classmethod
    def from_environment(cls, max_workers: int = 16) -> Kube:
        """$KUBECONFIG (or ~/.kube/config) when present, else the in-cluster service account."""
        configuration = client.Configuration()
        try:
            config.load_kube_config(client_configuration=configuration)
        except config.ConfigException:
            config.load_incluster_config(client_configuration=configuration)
        configuration.connection_pool_maxsize = max_workers
        return cls(client.ApiClient(configuration), max_workers)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.api.close()

    def request_sync(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: dict[str, str] | None = None,
        content_type: str = JSON,
    ) -> dict[str, Any]:
        headers = {"Accept": JSON, "Content-Type": content_type}
        request = self.api.param_serialize(
            method=method,
            resource_path=path,
            query_params=list((query or {}).items()) or None,
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        try:
            response = self.api.call_api(*request, _request_timeout=REQUEST_TIMEOUT)
            response.read()
        except ApiException as error:  # raised for transport-level failures in some client versions
            raise KubeError(method, path, error.status or 0, error.reason or "Error", str(error.body or "")) from None
        except Exception as error:  # connection refused, TLS, timeouts
            raise KubeError(method, path, 0, type(error).__name__, str(error)) from None
        data = response.data or b""
        if not 200 <= response.status < 300:
            try:
                failure = json.loads(data)
                reason, message = failure.get("reason", ""), failure.get("message", "")
            except ValueError:
                reason, message = "", data.decode(errors="replace")[:500]
            raise KubeError(method, path, response.status, reason or str(response.reason), message)
        return json.loads(data) if data else {}

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: dict[str, str] | None = None,
        content_type: str = JSON,
    ) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self.executor, lambda: self.request_sync(method, path, body, query, content_type)
        )

    async def get(self, path: str) -> dict[str, Any] | None:
        try:
            return await self.request("GET", path)
        except KubeError as error:
            if error.not_found:
                return None
            raise

    async def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self.request("POST", path, body)

    async def merge_patch(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self.request("PATCH", path, body, content_type=MERGE_PATCH)

    async def delete(self, path: str, propagation: str = "Background", uid: str | None = None) -> bool:
        """Delete; False when it was already gone. `uid` makes sure a same-named newer object is left alone."""
        options: dict[str, Any] = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": propagation}
        if uid:
            options["preconditions"] = {"uid": uid}
        try:
            await self.request("DELETE", path, options)
        except KubeError as error:
            if error.not_found:
                return False
            raise
        return True

    async def post_event(
        self, involved: dict[str, Any], type_: str, reason: str, message: str, component: str
    ) -> dict[str, Any]:
        """A core/v1 Event on an object (what `kubectl describe` and `kubectl get events` show)."""
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        namespace = involved["namespace"]
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{involved['name']}.", "namespace": namespace},
            "involvedObject": involved,
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": component},
            "reportingComponent": component,
            "reportingInstance": REPORTING_INSTANCE,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        return await self.create(object_path("Event", namespace), event)
