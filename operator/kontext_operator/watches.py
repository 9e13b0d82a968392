"""Lean watches of the batch Jobs and pods the operator made: LIST, then WATCH, forever, keeping a few fields.

kopf watches only the KontextLoRAJobs (handlers.py). The Jobs and trainer pods are followed here instead, because
kopf keeps per-object state for everything it watches (a memory record, a worker task and queue while events
flow, the parsed event bodies); for a thousand jobs that was most of the operator's memory. A `Watch` runs in a
daemon thread: it parses each event line, keeps only what `status.py` reads (`trim_job`, `trim_pod`: a few hundred
bytes), and hands that to the event loop, where a `ChildStore` indexes it by (namespace, KontextLoRAJob name) and
tells the reconciler which job changed (only when a kept field changed).

Correctness of each watch: an initial LIST (paginated) whose result replaces what the store held for that scope
(so a relist also drops objects deleted meanwhile), then WATCH from the list's resourceVersion with bookmarks;
each event moves the resourceVersion on; `410 Gone` (too old) relists; any other failure reconnects with
exponential backoff and jitter (0.5 s .. 5 s: after an apiserver outage the watches resume within seconds of its
return). The server ends a watch after `SERVER_TIMEOUT` seconds and it is
resumed from the last resourceVersion. `ready(namespace)` is set once the first LIST of that scope is in, and
the reconciler waits for it before deriving a status, so a restarted operator never mistakes "not listed yet"
for "missing".
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from .kube import Kube, KubeError

Key = tuple[str, str]
Trimmed = dict[str, Any]

SERVER_TIMEOUT = 300  # seconds a watch request lasts before the server ends it (then it is resumed)
PAGE_SIZE = 100  # objects per LIST page: bounds the memory a relist of a large cluster parses at once
BACKOFF_FIRST, BACKOFF_MAX = 0.5, 5.0

logger = logging.getLogger("kontext_operator")


class Gone(Exception):
    """The resourceVersion is too old for the server (410): list again."""


class Sink(Protocol):
    """Where a watch delivers; called on the event loop's thread."""

    def replace(self, scope: str | None, items: list[Trimmed]) -> None: ...

    def apply(self, kind: str, item: Trimmed) -> None: ...


class Watch:
    """One collection (a namespace, or cluster-wide), listed then watched in a daemon thread."""

    def __init__(
        self,
        kube: Kube,
        path: str,
        *,
        scope: str | None,
        sink: Sink,
        trim: Callable[[dict[str, Any]], Trimmed | None],
        loop: asyncio.AbstractEventLoop,
        label_selector: str | None = None,
        field_selector: str | None = None,
        name: str = "watch",
    ):
        self.kube, self.path, self.scope, self.sink, self.trim, self.loop = kube, path, scope, sink, trim, loop
        self.selectors = {
            key: value for key, value in (("labelSelector", label_selector), ("fieldSelector", field_selector)) if value
        }
        self.name = name
        self.version: str | None = None
        self.relists = 0
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> Watch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()

    # ---- in the watch thread ---------------------------------------------------------------------------------

    def _deliver(self, fn: Callable[..., None], *args: Any) -> None:
        if not self._stopped.is_set() and not self.loop.is_closed():
            try:
                self.loop.call_soon_threadsafe(fn, *args)
            except RuntimeError:  # the loop closed meanwhile: the operator is exiting
                self._stopped.set()

    def _run(self) -> None:
        delay = BACKOFF_FIRST
        while not self._stopped.is_set():
            try:
                if self.version is None:
                    self._list()
                self._watch()
                delay = BACKOFF_FIRST
            except Gone:
                logger.debug("%s: resourceVersion %s expired, listing again", self.name, self.version)
                self.version = None
            except Exception as error:  # the server unreachable, 5xx, 403 while RBAC propagates, a cut connection
                if self._stopped.is_set():
                    return
                wait = delay * random.uniform(0.8, 1.2)
                logger.warning("%s failed (%s); reconnecting in %.1fs", self.name, error, wait)
                self._stopped.wait(wait)
                delay = min(delay * 2, BACKOFF_MAX)

    def _list(self) -> None:
        items: list[Trimmed] = []
        query = {**self.selectors, "limit": str(PAGE_SIZE)}
        while True:
            try:
                page = self.kube.request_sync("GET", self.path, query=query)
            except KubeError as error:
                if error.status == 410:  # the continue token expired: start the listing over
                    items, query = [], {**self.selectors, "limit": str(PAGE_SIZE)}
                    continue
                raise
            for body in page.get("items") or ():
                trimmed = self.trim(body)
                if trimmed is not None:
                    items.append(trimmed)
            metadata = page.get("metadata") or {}
            if not metadata.get("continue"):
                break
            query = {**self.selectors, "limit": str(PAGE_SIZE), "continue": metadata["continue"]}
        self.version = metadata.get("resourceVersion")
        self.relists += 1
        self._deliver(self.sink.replace, self.scope, items)

    def _watch(self) -> None:
        query = {
            **self.selectors,
            "watch": "true",
            "allowWatchBookmarks": "true",
            "resourceVersion": self.version or "",
            "timeoutSeconds": str(SERVER_TIMEOUT),
        }
        try:
            for event in self.kube.stream_sync(self.path, query, SERVER_TIMEOUT):
                if self._stopped.is_set():
                    return
                kind, body = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if body.get("code") == 410:
                        raise Gone()
                    raise KubeError(
                        "WATCH", self.path, int(body.get("code") or 0), body.get("reason", ""), body.get("message", "")
                    )
                version = (body.get("metadata") or {}).get("resourceVersion")
                if version:
                    self.version = version
                if kind in ("ADDED", "MODIFIED", "DELETED"):
                    trimmed = self.trim(body)
                    if trimmed is not None:
                        self._deliver(self.sink.apply, kind, trimmed)
        except KubeError as error:
            if error.status == 410:
                raise Gone() from None
            raise


# ---- the stores -------------------------------------------------------------------------------------------------


class ChildStore:
    """Trimmed objects of one kind (Jobs or pods) by the KontextLoRAJob they belong to: (namespace, job) -> {uid}.

    Trimmed objects carry `namespace`, `job` (the `kontext-lora.io/job` label) and `uid`. `changed(key, kind)` is
    called (on the loop) whenever what is kept of an object of that job changes, `kind` being the watch event's
    type (a relist reports objects that vanished as DELETED).
    """

    def __init__(self, changed: Callable[[Key, str], None]):
        self.changed = changed
        self.by_job: dict[Key, dict[str, Trimmed]] = {}

    def get(self, key: Key) -> Iterable[Trimmed]:
        return self.by_job.get(key, {}).values()

    def __len__(self) -> int:
        return sum(len(items) for items in self.by_job.values())

    def put(self, item: Trimmed, notify: bool = False) -> None:
        """Record an object this operator just created or patched (the watch brings the same version later)."""
        key = (item["namespace"], item["job"])
        self.by_job.setdefault(key, {})[item["uid"]] = item
        if notify:
            self.changed(key, "MODIFIED")

    def apply(self, kind: str, item: Trimmed) -> None:
        key = (item["namespace"], item["job"])
        items = self.by_job.get(key)
        if kind == "DELETED":
            if items is None or items.pop(item["uid"], None) is None:
                return
            if not items:
                del self.by_job[key]
        else:
            if items is None:
                items = self.by_job[key] = {}
            if items.get(item["uid"]) == item:
                return  # nothing the operator reads changed (most pod and Job updates)
            items[item["uid"]] = item
        self.changed(key, kind)

    def replace(self, scope: str | None, listed: list[Trimmed]) -> None:
        fresh: dict[Key, dict[str, Trimmed]] = {}
        for item in listed:
            fresh.setdefault((item["namespace"], item["job"]), {})[item["uid"]] = item
        stale = [key for key in self.by_job if scope is None or key[0] == scope]
        for key in stale:
            for uid, item in list(self.by_job[key].items()):
                if uid not in fresh.get(key, {}):
                    self.apply("DELETED", item)
        for items in fresh.values():
            for item in items.values():
                self.apply("ADDED", item)


class ChildWatches:
    """The Job and pod watches of every namespace the operator serves, and their stores.

    Cluster-wide: one watch per kind. Otherwise one per kind and namespace: the named namespaces from the start,
    and namespaces that only a pattern matched (`--namespace 'team-*'`) once kopf reports a KontextLoRAJob there.
    """

    def __init__(
        self,
        kube: Kube,
        namespaces: Iterable[str] | None,
        changed: Callable[[Key, str, str], None],
        *,
        label_selector: str,
        job_trim: Callable[[dict[str, Any]], Trimmed | None],
        pod_trim: Callable[[dict[str, Any]], Trimmed | None],
    ):
        self.kube = kube
        self.clusterwide = namespaces is None
        self.named = [n for n in namespaces or () if not any(c in n for c in "*?!,")]
        self.label_selector = label_selector
        self.trims = {"jobs": job_trim, "pods": pod_trim}
        self.jobs = ChildStore(lambda key, kind: changed(key, "job", kind))
        self.pods = ChildStore(lambda key, kind: changed(key, "pod", kind))
        self._watches: dict[str | None, list[Watch]] = {}
        self._listed: dict[tuple[str | None, str], asyncio.Event] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for scope in [None] if self.clusterwide else self.named:
            self._start(scope)

    def stop(self) -> None:
        for watches in self._watches.values():
            for watch in watches:
                watch.stop()

    def serve(self, namespace: str) -> None:
        """Make sure the namespace is watched (kopf saw a KontextLoRAJob there)."""
        if not self.clusterwide and namespace not in self._watches:
            self._start(namespace)

    async def ready(self, namespace: str) -> None:
        """Until the first LIST of both kinds in this namespace has been delivered."""
        scope = None if self.clusterwide else namespace
        self.serve(namespace)
        for kind in ("jobs", "pods"):
            await self._listed[(scope, kind)].wait()

    def is_ready(self, namespace: str) -> bool:
        scope = None if self.clusterwide else namespace
        return all((event := self._listed.get((scope, k))) is not None and event.is_set() for k in ("jobs", "pods"))

    def _start(self, scope: str | None) -> None:
        assert self._loop is not None, "start() first"
        where = "" if scope is None else f"/namespaces/{scope}"
        paths = {"jobs": f"/apis/batch/v1{where}/jobs", "pods": f"/api/v1{where}/pods"}
        stores = {"jobs": self.jobs, "pods": self.pods}
        self._watches[scope] = []
        for kind in ("jobs", "pods"):
            listed = self._listed[(scope, kind)] = asyncio.Event()
            sink = _ReadySink(stores[kind], listed)
            watch = Watch(
                self.kube,
                paths[kind],
                scope=scope,
                sink=sink,
                trim=self.trims[kind],
                loop=self._loop,
                label_selector=self.label_selector,
                name=f"watch {kind} in {scope or 'all namespaces'}",
            )
            self._watches[scope].append(watch.start())

    def stats(self) -> Mapping[str, int]:
        return {"jobs": len(self.jobs), "pods": len(self.pods), "watches": sum(map(len, self._watches.values()))}


class _ReadySink:
    """A store that also marks its scope listed once the first LIST is in."""

    def __init__(self, store: ChildStore, listed: asyncio.Event):
        self.store, self.listed = store, listed

    def replace(self, scope: str | None, items: list[Trimmed]) -> None:
        self.store.replace(scope, items)
        self.listed.set()

    def apply(self, kind: str, item: Trimmed) -> None:
        self.store.apply(kind, item)
