"""The operator's own watch machinery without a cluster: the LIST/WATCH loop (pagination, resourceVersion, 410 Gone,
reconnects), the stores it feeds, the peering rule, and the priority order of API requests."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from kontext_operator import watches
from kontext_operator.kube import KubeError, Priority, PrioritySlots
from kontext_operator.peering import PeeringGate, PeeringIdentity, blocking_peers
from kontext_operator.status import trim_job, trim_pod
from kontext_operator.watches import ChildStore, Watch


def pod(name: str, job: str = "a", uid: str | None = None, phase: str = "Pending", **status: Any) -> dict:
    return {
        "metadata": {
            "name": name,
            "namespace": "ns",
            "uid": uid or f"uid-{name}",
            "resourceVersion": "1",
            "labels": {"kontext-lora.io/job": job, "batch.kubernetes.io/controller-uid": "job-uid"},
            "managedFields": [{"manager": "kubelet", "fieldsV1": {"f:status": {}}}],
        },
        "spec": {"nodeName": "n1", "containers": [{"name": "trainer", "env": [{"name": "X", "value": "y" * 500}]}]},
        "status": {"phase": phase, **status},
    }


class FakeKube:
    """Serves pages for LIST and scripted streams for WATCH; records every query."""

    def __init__(self, pages: list[dict], streams: list[list[dict] | Exception]):
        self.pages, self.streams = pages, streams
        self.lists: list[dict] = []
        self.watches: list[dict] = []
        self.done = threading.Event()

    def request_sync(self, method: str, path: str, query: dict | None = None, **_: Any) -> dict:
        self.lists.append(dict(query or {}))
        return self.pages[len(self.lists) - 1] if len(self.lists) <= len(self.pages) else self.pages[-1]

    def stream_sync(self, path: str, query: dict, server_timeout: int) -> Iterator[dict]:
        self.watches.append(dict(query))
        if not self.streams:
            self.done.set()
            time.sleep(60)
            return
        script = self.streams.pop(0)
        if isinstance(script, Exception):
            raise script
        yield from script


class Recording:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def replace(self, scope: str | None, items: list) -> None:
        self.calls.append(("replace", scope, [i["name"] for i in items]))

    def apply(self, kind: str, item: dict) -> None:
        self.calls.append((kind, item["name"]))


def run_watch(kube: FakeKube) -> tuple[Recording, Watch]:
    async def main() -> tuple[Recording, Watch]:
        sink = Recording()
        watch = Watch(kube, "/api/v1/namespaces/ns/pods", scope="ns", sink=sink, trim=trim_pod,  # type: ignore[arg-type]
                      loop=asyncio.get_running_loop(), label_selector="app=x")  # fmt: skip
        watch.start()
        while not kube.done.is_set():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        watch.stop()
        return sink, watch

    return asyncio.run(main())


def test_watch_lists_in_pages_then_watches_from_the_lists_version() -> None:
    pages = [
        {"metadata": {"continue": "c1"}, "items": [pod("p1")]},
        {"metadata": {"resourceVersion": "100"}, "items": [pod("p2")]},
    ]
    events = [
        {"type": "ADDED", "object": {**pod("p3"), "metadata": {**pod("p3")["metadata"], "resourceVersion": "101"}}},
        {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "150"}}},
    ]
    kube = FakeKube(pages, [events])
    sink, _ = run_watch(kube)
    assert kube.lists[0] == {"labelSelector": "app=x", "limit": str(watches.PAGE_SIZE)}
    assert kube.lists[1]["continue"] == "c1"
    assert sink.calls == [("replace", "ns", ["p1", "p2"]), ("ADDED", "p3")]
    assert kube.watches[0]["resourceVersion"] == "100" and kube.watches[0]["allowWatchBookmarks"] == "true"
    assert kube.watches[1]["resourceVersion"] == "150", "a bookmark moves the resourceVersion on"


def test_watch_relists_on_410_gone_and_reconnects_after_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watches, "BACKOFF_FIRST", 0.01)
    pages = [{"metadata": {"resourceVersion": "10"}, "items": [pod("p1")]}]
    streams: list[list[dict] | Exception] = [
        [{"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired"}}],
        KubeError("WATCH", "/x", 0, "ConnectionRefused", "down"),
        [{"type": "DELETED", "object": pod("p1")}],
    ]
    kube = FakeKube(pages, streams)
    sink, watch = run_watch(kube)
    assert len(kube.lists) == 2, "410 Gone lists again"
    assert [w["resourceVersion"] for w in kube.watches[:3]] == ["10", "10", "10"]
    assert sink.calls == [("replace", "ns", ["p1"]), ("replace", "ns", ["p1"]), ("DELETED", "p1")]
    assert watch.relists == 2


def test_trimmed_pods_keep_only_what_status_reads() -> None:
    body = pod(
        "p",
        phase="Failed",
        conditions=[
            {"type": "PodScheduled", "status": "True", "lastProbeTime": None},
            {"type": "Ready", "status": "False", "reason": "PodFailed", "message": "x" * 200},
        ],
        containerStatuses=[
            {
                "name": "trainer",
                "image": "img",
                "imageID": "sha256:" + "0" * 64,
                "state": {"terminated": {"exitCode": 2, "message": "bad", "containerID": "c" * 70, "reason": "Error"}},
            }
        ],
    )
    trimmed = trim_pod(body)
    assert trimmed["namespace"] == "ns" and trimmed["job"] == "a" and trimmed["jobUid"] == "job-uid"
    assert trimmed["conditions"] == [{"type": "PodScheduled", "status": "True"}]
    assert trimmed["state"] == {"terminated": {"exitCode": 2, "message": "bad", "reason": "Error"}}
    job = trim_job(
        {
            "metadata": {"name": "j", "namespace": "ns", "uid": "u", "labels": {"kontext-lora.io/job": "a"}},
            "spec": {"suspend": False, "template": {"spec": {"containers": [{}]}}},
            "status": {"ready": 1, "conditions": [{"type": "Complete", "status": "True", "lastProbeTime": "t"}]},
        }
    )
    assert job["status"] == {"conditions": [{"type": "Complete", "status": "True"}]}
    assert job["job"] == "a" and job["appliedSuspend"] is None


def test_store_reports_only_changes_of_kept_fields_and_relists_drop_the_vanished() -> None:
    changes: list[tuple] = []
    store = ChildStore(lambda key, kind: changes.append((key, kind)))
    first = trim_pod(pod("p1"))
    store.apply("ADDED", first)
    store.apply("MODIFIED", trim_pod(pod("p1")))  # e.g. only resourceVersion/managedFields changed
    store.apply("MODIFIED", trim_pod(pod("p1", phase="Running")))
    store.apply("ADDED", trim_pod(pod("p2", job="b")))
    assert changes == [(("ns", "a"), "ADDED"), (("ns", "a"), "MODIFIED"), (("ns", "b"), "ADDED")]
    changes.clear()
    store.replace("ns", [trim_pod(pod("p1", phase="Running"))])  # p2 was deleted while the watch was down
    assert changes == [(("ns", "b"), "DELETED")]
    assert [p["name"] for p in store.get(("ns", "a"))] == ["p1"] and list(store.get(("ns", "b"))) == []
    store.replace("other", [])  # another namespace's relist leaves this one alone
    assert len(store) == 1


def test_peering_rule_is_kopfs() -> None:
    me = PeeringIdentity("kontext-lora", "me", 10)
    now = datetime.now(UTC)
    seen = (now - timedelta(seconds=5)).isoformat()
    stale = (now - timedelta(seconds=61)).isoformat()
    assert blocking_peers({"me": {"priority": 10, "lastseen": seen, "lifetime": 60}}, me, now)[0] == []
    assert blocking_peers({"low": {"priority": 9, "lastseen": seen, "lifetime": 60}}, me, now)[0] == []
    blocking, expiry = blocking_peers({"high": {"priority": 11, "lastseen": seen, "lifetime": 60}}, me, now)
    assert blocking == ["high (priority 11)"] and expiry is not None and 54 < (expiry - now).total_seconds() <= 55
    assert blocking_peers({"same": {"priority": 10, "lastseen": seen, "lifetime": 60}}, me, now)[0]
    assert blocking_peers({"dead": {"priority": 99, "lastseen": stale, "lifetime": 60}}, me, now)[0] == []


def test_peering_gate_opens_when_the_blocking_peer_expires() -> None:
    async def main() -> list[bool]:
        flips: list[bool] = []
        gate = PeeringGate(PeeringIdentity("p", "me", 1), flips.append)
        assert not gate.active
        gate.replace(None, [])  # no peering object: stays closed
        lastseen = (datetime.now(UTC) - timedelta(seconds=59.8)).isoformat()
        gate.apply("MODIFIED", {"status": {"other": {"priority": 5, "lastseen": lastseen, "lifetime": 60}}})
        assert not gate.active
        await asyncio.sleep(0.5)
        assert gate.active
        gate.stop()
        return flips

    assert asyncio.run(main()) == [True]
    assert PeeringGate(None, lambda active: None).active, "standalone: always open"


def test_waiting_requests_are_served_by_priority_then_order() -> None:
    async def main() -> list[str]:
        slots = PrioritySlots(1)
        served: list[str] = []

        async def use(name: str, priority: Priority) -> None:
            await slots.acquire(priority)
            served.append(name)
            await asyncio.sleep(0.01)
            slots.release()

        await slots.acquire(Priority.CHANGE)  # busy: everything below waits
        tasks = [
            asyncio.create_task(use(name, priority))
            for name, priority in (
                ("status-1", Priority.STATUS),
                ("create-1", Priority.CREATE),
                ("status-2", Priority.STATUS),
                ("create-2", Priority.CREATE),
            )
        ]
        cancelled = asyncio.create_task(use("cancelled", Priority.CREATE))
        await asyncio.sleep(0.01)
        cancelled.cancel()
        slots.release()
        await asyncio.gather(*tasks)
        assert slots.waiting == 0
        return served

    assert asyncio.run(main()) == ["create-1", "create-2", "status-1", "status-2"]
