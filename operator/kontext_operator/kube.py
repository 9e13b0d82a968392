"""A small asynchronous façade over the Kubernetes API: JSON in, JSON out, typed errors.

Requests go through the official client's ApiClient (its authentication: kubeconfig, in-cluster token with
rotation, client certificates) and run in a bounded thread pool, so the kopf event loop never blocks. Bodies
are plain dicts: the operator builds manifests as data (resources.py) and keeps trimmed objects in memory.

At most `max_workers` requests are in flight; when more wait, they go in `Priority` order: in a burst of new
jobs, creating their objects goes before status writes and Events, which then coalesce (a later status write
carries everything). Watches (watches.py) stream on a second ApiClient, so a long-lived watch connection never
takes a slot or a pooled connection from the requests.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import json
import logging
import os
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from enum import IntEnum
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

from kontext_lora.api import GROUP, PLURAL, VERSION

JSON = "application/json"
MERGE_PATCH = "application/merge-patch+json"
REQUEST_TIMEOUT = 30.0
# Which replica wrote an Event: kopf's peering identity (the pod name in a cluster), else the host name.
REPORTING_INSTANCE = (os.environ.get("POD_ID") or os.environ.get("POD_NAME") or socket.gethostname())[:128]
# A watch connection that has been silent this much longer than its server-side timeout is dead.
WATCH_READ_SLACK = 30.0

logger = logging.getLogger("kontext_operator")


class Priority(IntEnum):
    """Order of requests waiting for a slot (lower first)."""

    CREATE = 0  # what a new job waits for: its ServiceAccount, Role, RoleBinding and Job (and adopting them)
    CHANGE = 1  # changing or deleting what exists
    STATUS = 2  # status writes and Events: a later write carries what an earlier, skipped one would have said


class PrioritySlots:
    """An asyncio semaphore whose waiters are served lowest `Priority` first, then lowest `order`.

    `order` is the arrival number of the job a request is for (`next_order()` when the job is first seen), so a
    job's second round of creates (RoleBinding and Job, after its ServiceAccount and Role) goes before the first
    round of jobs that arrived after it: earliest job first, not every job's first step first.
    """

    def __init__(self, slots: int):
        self._free = slots
        self._waiters: list[tuple[int, int, int, asyncio.Future[None]]] = []
        self._counter = itertools.count()

    def next_order(self) -> int:
        return next(self._counter)

    async def acquire(self, priority: Priority, order: int | None = None) -> None:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        arrival = next(self._counter)
        heapq.heappush(self._waiters, (int(priority), arrival if order is None else order, arrival, future))
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():  # handed a slot just as it was cancelled: pass it on
                self.release()
            raise

    def release(self) -> None:
        while self._waiters:
            *_, future = heapq.heappop(self._waiters)
            if not future.done():
                future.set_result(None)  # the slot goes straight to the waiter
                return
        self._free += 1

    @property
    def waiting(self) -> int:
        return len(self._waiters)


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
        "Service": "/api/v1/namespaces/{ns}/services",
        "Role": "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles",
        "RoleBinding": "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings",
        "Event": "/api/v1/namespaces/{ns}/events",
    }[kind].format(ns=namespace)
    return f"{base}/{name}" if name else base


class Kube:
    def __init__(
        self, api_client: client.ApiClient, max_workers: int = 16, watch_client: client.ApiClient | None = None
    ):
        self.api = api_client
        self.watch_api = watch_client or api_client
        self.executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="kube-api")
        self.slots = PrioritySlots(max_workers)

    @classmethod
    def from_environment(cls, max_workers: int = 16, max_watches: int = 64) -> Kube:
        """$KUBECONFIG (or ~/.kube/config) when present, else the in-cluster service account."""
        configuration = client.Configuration()
        try:
            config.load_kube_config(client_configuration=configuration)
        except config.ConfigException:
            config.load_incluster_config(client_configuration=configuration)
        configuration.connection_pool_maxsize = max_workers
        watching = client.Configuration()
        watching.__dict__.update(configuration.__dict__)  # same server and credentials (and refresh hook)
        watching.connection_pool_maxsize = max_watches
        return cls(client.ApiClient(configuration), max_workers, client.ApiClient(watching))

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.api.close()
        if self.watch_api is not self.api:
            self.watch_api.close()

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
        priority: Priority = Priority.CHANGE,
        order: int | None = None,
    ) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        await self.slots.acquire(priority, order)
        try:
            return await loop.run_in_executor(
                self.executor, lambda: self.request_sync(method, path, body, query, content_type)
            )
        finally:
            self.slots.release()

    async def get(
        self, path: str, priority: Priority = Priority.CHANGE, order: int | None = None
    ) -> dict[str, Any] | None:
        try:
            return await self.request("GET", path, priority=priority, order=order)
        except KubeError as error:
            if error.not_found:
                return None
            raise

    async def create(
        self, path: str, body: dict[str, Any], priority: Priority = Priority.CREATE, order: int | None = None
    ) -> dict[str, Any]:
        return await self.request("POST", path, body, priority=priority, order=order)

    async def merge_patch(
        self, path: str, body: dict[str, Any], priority: Priority = Priority.CHANGE, order: int | None = None
    ) -> dict[str, Any]:
        return await self.request("PATCH", path, body, content_type=MERGE_PATCH, priority=priority, order=order)

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

    def stream_sync(self, path: str, query: dict[str, str], server_timeout: int) -> Iterator[dict[str, Any]]:
        """A watch: yields each event (a parsed JSON line) as it arrives; blocking, for a watch thread.

        Ends when the server closes the stream (after `server_timeout` seconds); a connection that stays silent
        `WATCH_READ_SLACK` seconds longer raises KubeError (bookmarks keep a healthy one from being silent).
        """
        request = self.watch_api.param_serialize(
            method="GET",
            resource_path=path,
            query_params=list(query.items()),
            header_params={"Accept": JSON},
            auth_settings=["BearerToken"],
        )
        try:
            response = self.watch_api.call_api(
                *request, _request_timeout=(REQUEST_TIMEOUT, server_timeout + WATCH_READ_SLACK)
            )
        except ApiException as error:
            raise KubeError("WATCH", path, error.status or 0, error.reason or "Error", str(error.body or "")) from None
        except Exception as error:
            raise KubeError("WATCH", path, 0, type(error).__name__, str(error)) from None
        raw = response.response
        try:
            if not 200 <= response.status < 300:
                data = raw.read()
                try:
                    failure = json.loads(data)
                    reason, message = failure.get("reason", ""), failure.get("message", "")
                except ValueError:
                    reason, message = "", data.decode(errors="replace")[:500]
                raise KubeError("WATCH", path, response.status, reason or str(response.reason), message)
            try:
                for line in iter_resp_lines(raw):  # the official client's line splitting of a watch stream
                    if line.strip():
                        yield json.loads(line)
            except (KubeError, GeneratorExit):
                raise
            except Exception as error:  # read timeout, connection reset, malformed line
                raise KubeError("WATCH", path, 0, type(error).__name__, str(error)) from None
        finally:
            raw.release_conn()

    async def post_event(
        self,
        involved: dict[str, Any],
        type_: str,
        reason: str,
        message: str,
        component: str,
        order: int | None = None,
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
        return await self.create(object_path("Event", namespace), event, priority=Priority.STATUS, order=order)
