"""Progress of a run: smoothed loss, step rate and ETA, and the status reports the operator shows.

`StatusReporter` keeps the trainer-owned status fields (docs/architecture.md, "Status ownership") and sends
all of them as one merge patch to the job's `status` subresource — throttled to one patch every few seconds,
immediately at stage changes and checkpoints — from a background thread, so a slow or briefly unreachable
API server never stalls or crashes training. Each patch carries every trainer field, so one that is lost is
made good by the next.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tenacity import Retrying, stop_after_attempt, wait_exponential

from kontext_lora.api import GROUP, PLURAL, VERSION, KontextLoRAJobStatus

log = logging.getLogger(__name__)

TRAINER_FIELDS = frozenset(
    {
        "stage",
        "step",
        "total_steps",
        "loss",
        "learning_rate",
        "steps_per_second",
        "eta_seconds",
        "progress_percentage",
        "dataset_pairs",
        "preparation",
        "checkpoints",
        "last_checkpoint",
        "best_checkpoint",
        "lora_uri",
        "last_progress_time",
    }
)
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class ProgressTracker:
    """Loss EMA, steps per second over a sliding window, and the ETA derived from it."""

    def __init__(self, total_steps: int, start_step: int = 0, smoothing: float = 0.1, window: int = 50):
        self.total_steps = total_steps
        self.step = start_step
        self.smoothing = smoothing
        self.loss: float | None = None
        self.learning_rate: float | None = None
        self._times: deque[tuple[int, float]] = deque(maxlen=window)
        self._times.append((start_step, time.monotonic()))

    def update(self, step: int, loss: float, learning_rate: float) -> None:
        self.step = step
        self.loss = loss if self.loss is None else self.smoothing * loss + (1 - self.smoothing) * self.loss
        self.learning_rate = learning_rate
        self._times.append((step, time.monotonic()))

    @property
    def steps_per_second(self) -> float | None:
        (first_step, first_time), (last_step, last_time) = self._times[0], self._times[-1]
        if last_step <= first_step or last_time <= first_time:
            return None
        return (last_step - first_step) / (last_time - first_time)

    @property
    def eta_seconds(self) -> int | None:
        rate = self.steps_per_second
        return None if rate is None else round((self.total_steps - self.step) / rate)

    @property
    def percentage(self) -> int:
        return min(100, int(100 * self.step / self.total_steps)) if self.total_steps else 0

    def status_fields(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "total_steps": self.total_steps,
            "loss": None if self.loss is None else round(self.loss, 6),
            "learning_rate": self.learning_rate,
            "steps_per_second": None if self.steps_per_second is None else round(self.steps_per_second, 4),
            "eta_seconds": self.eta_seconds,
            "progress_percentage": self.percentage,
            "last_progress_time": datetime.now(UTC),
        }


def status_payload(fields: dict[str, Any]) -> dict[str, Any]:
    """The `status` merge patch: validated by the API model, camelCase, only the fields the trainer set."""
    unknown = set(fields) - TRAINER_FIELDS
    if unknown:
        raise ValueError(f"not trainer-owned status fields: {sorted(unknown)}")
    return KontextLoRAJobStatus(**fields).model_dump(mode="json", by_alias=True, exclude_unset=True)


class StatusReporter:
    """Coalescing, throttled status patches from a background thread (no-op without a sink)."""

    def __init__(self, sink: Callable[[dict[str, Any]], None] | None, interval: float = 5.0):
        self.sink = sink
        self.interval = interval
        self.fields: dict[str, Any] = {}
        self._dirty = False
        self._force = False
        self._last_sent = 0.0
        self._failures = 0
        self._closed = False
        self._condition = threading.Condition()
        self._thread = None
        if sink is not None:
            self._thread = threading.Thread(target=self._run, name="status-reporter", daemon=True)
            self._thread.start()

    def update(self, force: bool = False, **fields: Any) -> None:
        with self._condition:
            self.fields.update(fields)
            self._dirty = True
            self._force = self._force or force
            self._condition.notify()

    def _run(self) -> None:
        while True:
            with self._condition:
                while not self._closed and not (
                    self._dirty and (self._force or time.monotonic() - self._last_sent >= self.interval)
                ):
                    wait = None if not self._dirty else max(0.0, self.interval - (time.monotonic() - self._last_sent))
                    self._condition.wait(timeout=wait)
                if not self._dirty:
                    return  # closed with nothing left to send
                payload, forced = status_payload(self.fields), self._force
                self._dirty = self._force = False
                self._last_sent = time.monotonic()
            self._send(payload, forced)
            with self._condition:
                if self._closed and not self._dirty:
                    return

    def _send(self, payload: dict[str, Any], forced: bool) -> None:
        try:
            # Stage changes and checkpoints are worth a few retries; routine progress is not (the next comes soon).
            for attempt in Retrying(
                stop=stop_after_attempt(4 if forced else 1), wait=wait_exponential(0.5, max=4), reraise=True
            ):
                with attempt:
                    self.sink(payload)
            self._failures = 0
        except Exception as error:  # never let status reporting take training down
            self._failures += 1
            if self._failures in (1, 10) or self._failures % 100 == 0:
                log.warning("could not report status (%d failures so far): %s", self._failures, error)
            with self._condition:
                if not self._closed:
                    self._dirty = True  # resend the latest fields on the next round

    def close(self, timeout: float = 30.0) -> None:
        """Send what is pending (bounded by `timeout`) and stop the thread."""
        if self._thread is None:
            return
        with self._condition:
            self._force = self._force or self._dirty
            self._closed = True
            self._condition.notify()
        self._thread.join(timeout)


class KubernetesStatusSink:
    """Merge-patches `kontextlorajobs/<name>/status` with the pod's service account (or $KUBECONFIG)."""

    def __init__(self, name: str, namespace: str | None):
        from kubernetes import client, config

        configuration = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=configuration)
            api_client = client.ApiClient(configuration)
        except config.ConfigException:
            api_client = config.new_client_from_config()
        if namespace is None and SERVICE_ACCOUNT_NAMESPACE.is_file():
            namespace = SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
        if not namespace:
            raise ValueError("the job has no metadata.namespace and the pod has no service-account namespace")
        self.name = name
        self.namespace = namespace
        self.api = client.CustomObjectsApi(api_client)

    def __call__(self, payload: dict[str, Any]) -> None:
        self.api.patch_namespaced_custom_object_status(
            GROUP,
            VERSION,
            self.namespace,
            PLURAL,
            self.name,
            {"status": payload},
            _content_type="application/merge-patch+json",
            _request_timeout=10,
        )
