"""The operator's own Prometheus metrics, served on `metricsPort` of the operator config (8080 by default).

- `kontext_operator_jobs{phase}`: KontextLoRAJobs by phase, every phase present (0 when none is in it).
- `kontext_operator_reconcile_seconds{handler}`: how long each handler took.
- `kontext_operator_reconcile_errors_total{handler}`: handler runs that failed (retried ones included).
"""

from __future__ import annotations

import functools
import threading
import time
from collections import Counter as Tally
from collections.abc import Awaitable, Callable, Iterator
from typing import ParamSpec, TypeVar

import kopf
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from kontext_lora.api import Phase

P = ParamSpec("P")
R = TypeVar("R")

RECONCILE_SECONDS = Histogram(
    "kontext_operator_reconcile_seconds",
    "Time spent in one operator handler run.",
    ["handler"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
RECONCILE_ERRORS = Counter(
    "kontext_operator_reconcile_errors_total", "Operator handler runs that raised an error.", ["handler"]
)


class JobPhases(Collector):
    """Phases of the KontextLoRAJobs the operator knows, counted at scrape time (thread-safe snapshot)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._phases: dict[tuple[str, str], str] = {}

    def set(self, key: tuple[str, str], phase: str) -> None:
        with self._lock:
            self._phases[key] = phase

    def forget(self, key: tuple[str, str]) -> None:
        with self._lock:
            self._phases.pop(key, None)

    def counts(self) -> dict[str, int]:
        with self._lock:
            tally = Tally(self._phases.values())
        return {phase.value: tally.get(phase.value, 0) for phase in Phase}

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("kontext_operator_jobs", "KontextLoRAJobs by phase.", labels=["phase"])
        for phase, count in self.counts().items():
            family.add_metric([phase], count)
        yield family


JOB_PHASES = JobPhases()
_registered = False


def register(registry: CollectorRegistry = REGISTRY) -> JobPhases:
    global _registered
    if not _registered:
        registry.register(JOB_PHASES)
        _registered = True
    return JOB_PHASES


def serve(port: int, address: str = "0.0.0.0") -> None:
    register()
    start_http_server(port, addr=address)


def measured(handler: str) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]:
    """Time a handler and count its errors (a kopf.TemporaryError that asks for a plain wait is not an error)."""

    def decorate(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        @functools.wraps(fn)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            began = time.perf_counter()
            try:
                return await fn(*args, **kwargs)
            except kopf.TemporaryError as error:
                if not getattr(error, "waiting", False):
                    RECONCILE_ERRORS.labels(handler).inc()
                raise
            except BaseException:
                RECONCILE_ERRORS.labels(handler).inc()
                raise
            finally:
                RECONCILE_SECONDS.labels(handler).observe(time.perf_counter() - began)

        return wrapper

    return decorate


def waiting(message: str, delay: float) -> kopf.TemporaryError:
    """A retry that is part of normal operation (waiting for an old object to go), not counted as an error."""
    error = kopf.TemporaryError(message, delay=delay)
    error.waiting = True  # type: ignore[attr-defined]
    return error
