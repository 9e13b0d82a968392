"""kopf registrations: kopf watches only the KontextLoRAJobs; everything else is the Reconciler's (reconciler.py).

- `klj_event`: every watch event of a KontextLoRAJob (the initial listing included) is handed to the reconciler,
  which reconciles the job in its own task; the handler returns at once, so kopf's per-object worker is brief.
- `on_delete`: kopf's finalizer (`kontext-lora.io/cleanup`) holds a deleted job until its trainer pod is gone.
- The batch Jobs and trainer pods are watched by watches.py (label-selected, trimmed), not by kopf.

kopf's change detection is not used (`NoChangeDetection`): the reconciler compares the spec with the live Job
instead, so kopf writes no `last-handled-configuration` annotation and no handler-progress annotations for
creates and updates: its only write to a new job is the finalizer. Importing this module registers the handlers
with kopf's default registry.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import kopf

from kontext_lora.api import GROUP, PLURAL, VERSION
from kontext_lora.api.operator_config import OperatorConfig, load_operator_config

from . import metrics
from .kube import Kube
from .peering import PeeringGate, PeeringIdentity
from .reconciler import Reconciler
from .resources import CHILD_SELECTOR
from .status import trim_job, trim_pod
from .watches import ChildWatches

CR = (GROUP, VERSION, PLURAL)
ANNOTATION_PREFIX = GROUP
FINALIZER = f"{GROUP}/cleanup"

logger = logging.getLogger("kontext_operator")


class NoChangeDetection(kopf.DiffBaseStorage):
    """kopf's diff-base, switched off: every object's essence is the same empty one, so kopf sees no changes (its
    causes are only the deletion ones) and never stores a last-handled configuration on the object."""

    def build(self, *, body: kopf.Body, extra_fields: Iterable[Any] | None = None) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return kopf.BodyEssence()

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


def configure_settings(settings: kopf.OperatorSettings) -> None:
    """kopf settings: our own annotation names and finalizer, no change detection, cluster-wide peering."""
    # The delete handler's progress (it waits for the trainer pod to stop) lives in annotations: the CRD prunes
    # unknown status fields, and `status` belongs to the API model.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=ANNOTATION_PREFIX)
    settings.persistence.diffbase_storage = NoChangeDetection()
    settings.persistence.finalizer = FINALIZER
    # One ClusterKopfPeering for every replica, whatever namespaces they serve.
    settings.peering.clusterwide = True
    settings.peering.stealth = True
    settings.posting.reporting_component = "kontext-lora-operator"
    settings.watching.server_timeout = 600
    settings.execution.default_backoff = 10  # retry delay after an unexpected error in a handler
    settings.networking.request_timeout = 60
    # Retries of a failed API request, the KontextLoRAJob watch's included. kopf's default grows to 21 s, so after an
    # apiserver outage the watch came back up to 21 s after the apiserver did (tests/faults/test_apiserver_outage.py);
    # capped at 5 s it resumes within seconds. After the last retry kopf starts the watch over, with these again.
    settings.networking.error_backoffs = [1, 1, 2, 3, 5, 5, 5, 5, 5, 5, 5, 5]


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    configure_settings(settings)
    config: OperatorConfig = memo.get("config") or load_operator_config()
    kube = Kube.from_environment()
    reconciler = Reconciler(config, kube, metrics.register())
    # `namespaces`: None serves all (one cluster-wide watch per kind); patterns are resolved as kopf reports jobs.
    namespaces: list[str] | None = memo.get("namespaces") or None
    children = ChildWatches(
        kube,
        namespaces,
        reconciler.child_changed,
        label_selector=CHILD_SELECTOR,
        job_trim=trim_child(trim_job),
        pod_trim=trim_child(trim_pod),
    )
    peering: PeeringIdentity | None = memo.get("peering")
    gate = PeeringGate(peering, reconciler.gate_changed)
    reconciler.children, reconciler.gate = children, gate
    children.start()
    gate.start(kube)
    memo.reconciler = reconciler
    logger.info(
        "kontext-lora operator: trainer image %s, GPU classes %s",
        config.trainer.image,
        ", ".join(sorted(config.gpu_classes)),
    )


def trim_child(trim: Any) -> Any:
    """A Job or pod without the `kontext-lora.io/job` label is not the operator's (the selector should not let it
    through, a relabelled object could): skipped."""

    def trimmed(body: dict[str, Any]) -> dict[str, Any] | None:
        item = trim(body)
        return item if item.get("job") and item.get("uid") else None

    return trimmed


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    reconciler: Reconciler | None = memo.get("reconciler")
    if reconciler is not None:
        if reconciler.children is not None:
            reconciler.children.stop()
        if reconciler.gate is not None:
            reconciler.gate.stop()
        reconciler.stop()
        reconciler.kube.close()


@kopf.on.probe(id="jobs")
def probe_jobs(memo: kopf.Memo, **_: Any) -> dict[str, int]:
    """/healthz shows the jobs this replica knows, by phase."""
    return metrics.JOB_PHASES.counts()


@kopf.on.event(*CR)
async def klj_event(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    memo.reconciler.klj_event(event.get("type"), body)


@kopf.on.delete(*CR, id="delete")
@metrics.measured("delete")
async def on_delete(body: kopf.Body, runtime: Any, memo: kopf.Memo, **_: Any) -> None:
    await memo.reconciler.cleanup(body, runtime.total_seconds())
