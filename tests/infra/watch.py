"""Record every watch event of a resource kind in a namespace, with the local time it arrived (for latency and
for proving that an object was created exactly once)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from kubernetes import client, watch


@dataclass(frozen=True)
class Seen:
    type: str
    name: str
    uid: str
    at: float


class Recorder:
    def __init__(self, api_client: client.ApiClient, namespace: str, kind: str, label_selector: str | None = None):
        if kind not in ("jobs", "kontextlorajobs"):
            raise ValueError(f"cannot record {kind}")
        self.api = api_client
        self.namespace = namespace
        self.kind = kind
        self.label_selector = label_selector
        self.events: list[Seen] = []
        self._version: str | None = None
        self._watch = watch.Watch()
        self._ready = threading.Event()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"record-{kind}", daemon=True)

    def _list(self, **kwargs: Any) -> Any:
        if self.kind == "jobs":
            return client.BatchV1Api(self.api).list_namespaced_job(self.namespace, **kwargs)
        return client.CustomObjectsApi(self.api).list_namespaced_custom_object(
            "kontext-lora.io", "v1alpha1", self.namespace, "kontextlorajobs", **kwargs
        )

    def _metadata(self, obj: Any) -> dict[str, Any]:
        return obj["metadata"] if isinstance(obj, dict) else self.api.sanitize_for_serialization(obj)["metadata"]

    def _relist(self) -> None:
        """List what exists now (recorded as LISTED) and watch on from there."""
        listing = self._list(label_selector=self.label_selector)
        data = listing if isinstance(listing, dict) else self.api.sanitize_for_serialization(listing)
        for item in data.get("items") or []:
            metadata = item["metadata"]
            self.events.append(Seen("LISTED", metadata["name"], metadata["uid"], time.monotonic()))
        self._version = data["metadata"]["resourceVersion"]

    def _run(self) -> None:
        self._version = self._metadata(self._list(label_selector=self.label_selector))["resourceVersion"]
        self._ready.set()
        while not self._stopped.is_set():
            try:
                for event in self._watch.stream(
                    self._list, label_selector=self.label_selector, resource_version=self._version, timeout_seconds=300
                ):
                    metadata = self._metadata(event["object"])
                    self._version = metadata.get("resourceVersion", self._version)
                    self.events.append(Seen(event["type"], metadata["name"], metadata["uid"], time.monotonic()))
            except Exception as error:  # the connection is cut when the recorder stops, or the apiserver went away
                if self._stopped.is_set():
                    return
                time.sleep(1)
                try:
                    if isinstance(error, client.ApiException) and error.status == 410:
                        self._relist()
                except Exception:  # still unreachable: try again
                    continue

    def start(self) -> Recorder:
        self._thread.start()
        if not self._ready.wait(10):
            raise TimeoutError(f"could not list {self.kind}")
        return self

    def stop(self) -> None:
        self._stopped.set()
        self._watch.stop()

    def added(self, name: str | None = None) -> list[Seen]:
        return [e for e in self.events if e.type == "ADDED" and (name is None or e.name == name)]

    def uids(self, name: str | None = None) -> set[str]:
        """Every object (of `name`) ever seen, a relist included: one uid per object created."""
        return {e.uid for e in self.events if name is None or e.name == name}
