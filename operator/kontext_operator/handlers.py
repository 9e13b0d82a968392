"""kopf registrations: thin handlers that hand over to the Reconciler (reconciler.py).

Watches: KontextLoRAJobs, and only the batch Jobs and pods the operator made (server-side label selector), each
kept in a kopf index (trimmed) so status is derived from memory. Every watch event of the three kinds re-derives
the job's status; nothing polls. Importing this module registers the handlers with kopf's default registry.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import kopf

from kontext_lora.api import GROUP, PLURAL, VERSION, InvalidJobError, Phase
from kontext_lora.api.operator_config import OperatorConfig, load_operator_config

from . import metrics
from .kube import Kube
from .reconciler import Reconciler, trim_klj
from .resources import CHILD_SELECTOR, JOB_LABEL, MANAGED_BY, MANAGED_BY_LABEL
from .status import trim_job, trim_pod

CR = (GROUP, VERSION, PLURAL)
JOBS = ("batch", "v1", "jobs")
PODS = ("v1", "pods")
CHILD_LABELS: Mapping[str, Any] = {MANAGED_BY_LABEL: MANAGED_BY, JOB_LABEL: kopf.PRESENT}
ANNOTATION_PREFIX = GROUP
FINALIZER = f"{GROUP}/cleanup"

logger = logging.getLogger("kontext_operator")


def configure_settings(settings: kopf.OperatorSettings) -> None:
    """kopf settings: our own annotation names and finalizer, label-selected watches, cluster-wide peering."""
    # Handler progress and the last-handled spec live in annotations: the CRD prunes unknown status fields,
    # and `status` belongs to the API model.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=ANNOTATION_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=ANNOTATION_PREFIX, key="last-handled-configuration"
    )
    settings.persistence.finalizer = FINALIZER
    # One ClusterKopfPeering for every replica, whatever namespaces they serve.
    settings.peering.clusterwide = True
    settings.peering.stealth = True
    settings.posting.reporting_component = "kontext-lora-operator"
    settings.watching.label_selectors[JOBS] = CHILD_SELECTOR
    settings.watching.label_selectors[PODS] = CHILD_SELECTOR
    settings.watching.server_timeout = 600
    settings.execution.default_backoff = 10  # retry delay after an unexpected error in a handler
    settings.networking.request_timeout = 60


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **kwargs: Any) -> None:
    configure_settings(settings)
    config: OperatorConfig = memo.get("config") or load_operator_config()
    reconciler = Reconciler(config, Kube.from_environment(), metrics.register())
    reconciler.bind(kwargs["klj_index"], kwargs["job_index"], kwargs["pod_index"])
    memo.reconciler = reconciler
    logger.info(
        "kontext-lora operator: trainer image %s, GPU classes %s",
        config.trainer.image,
        ", ".join(sorted(config.gpu_classes)),
    )


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    reconciler: Reconciler | None = memo.get("reconciler")
    if reconciler is not None:
        reconciler.kube.close()


@kopf.on.probe(id="jobs")
def probe_jobs(memo: kopf.Memo, **_: Any) -> dict[str, int]:
    """/healthz shows the jobs this replica knows, by phase."""
    return metrics.JOB_PHASES.counts()


# ---- indexes: the in-memory view of the cluster -------------------------------------------------------------


@kopf.index(*CR)
def klj_index(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict:
    return {(namespace, name): trim_klj(body)}


@kopf.index(*JOBS, labels=CHILD_LABELS)
def job_index(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict:
    return {(namespace, labels[JOB_LABEL]): trim_job(body)}


@kopf.index(*PODS, labels=CHILD_LABELS)
def pod_index(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict:
    return {(namespace, labels[JOB_LABEL]): trim_pod(body)}


# ---- status: every event of a job, its batch Job or its pods re-derives the status ---------------------------


@kopf.on.event(*CR)
async def klj_event(namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    await memo.reconciler.sync(namespace, name)


@kopf.on.event(*JOBS, labels=CHILD_LABELS)
async def job_event(event: kopf.RawEvent, namespace: str, labels: kopf.Labels, memo: kopf.Memo, **_: Any) -> None:
    key = (namespace, labels[JOB_LABEL])
    if event.get("type") == "DELETED":
        await metrics.measured("job_gone")(memo.reconciler.job_gone)(key)
    await memo.reconciler.sync(*key)


@kopf.on.event(*PODS, labels=CHILD_LABELS)
async def pod_event(namespace: str, labels: kopf.Labels, memo: kopf.Memo, **_: Any) -> None:
    await memo.reconciler.sync(namespace, labels[JOB_LABEL])


# ---- lifecycle ---------------------------------------------------------------------------------------------


def _finished(body: kopf.Body) -> bool:
    return (body.get("status") or {}).get("phase") in (Phase.Succeeded, Phase.Failed)


async def _reconcile(body: kopf.Body, namespace: str, name: str, reconciler: Reconciler) -> None:
    try:
        if not _finished(body):
            await reconciler.ensure(body)
    except InvalidJobError as error:
        await reconciler.sync(namespace, name)
        raise kopf.PermanentError(str(error)) from None
    except (kopf.TemporaryError, kopf.PermanentError):
        raise
    except Exception as error:  # a bug or an unexpected answer: say so in status, and let kopf retry
        await reconciler.report_problem((namespace, name), "ReconcileError", f"{type(error).__name__}: {error}")
        raise
    await reconciler.sync(namespace, name)


@kopf.on.create(*CR, id="create")
@metrics.measured("create")
async def on_create(body: kopf.Body, namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    await _reconcile(body, namespace, name, memo.reconciler)


@kopf.on.resume(*CR, id="resume")
@metrics.measured("resume")
async def on_resume(body: kopf.Body, namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    await _reconcile(body, namespace, name, memo.reconciler)


@kopf.on.update(*CR, field="spec", id="spec")
@metrics.measured("update")
async def on_spec_change(
    body: kopf.Body, old: Any, new: Any, namespace: str, name: str, memo: kopf.Memo, **_: Any
) -> None:
    reconciler: Reconciler = memo.reconciler
    try:
        if not _finished(body):
            await reconciler.apply_spec_change(body, old, new)
    except InvalidJobError as error:
        await reconciler.sync(namespace, name)
        raise kopf.PermanentError(str(error)) from None
    await reconciler.sync(namespace, name)


@kopf.on.delete(*CR, id="delete")
@metrics.measured("delete")
async def on_delete(body: kopf.Body, runtime: Any, memo: kopf.Memo, **_: Any) -> None:
    await memo.reconciler.cleanup(body, runtime.total_seconds())


def _expiring(body: kopf.Body, **_: Any) -> bool:
    ttl = ((body.get("spec") or {}).get("runPolicy") or {}).get("ttlSecondsAfterFinished")
    return ttl is not None and _finished(body) and bool((body.get("status") or {}).get("completionTime"))


@kopf.daemon(*CR, id="ttl", when=_expiring, cancellation_timeout=5)
async def expire_after_ttl(body: kopf.Body, stopped: Any, memo: kopf.Memo, **_: Any) -> None:
    await metrics.measured("ttl")(memo.reconciler.expire)(body, stopped)
