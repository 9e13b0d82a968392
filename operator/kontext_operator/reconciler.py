"""The operator's logic, between kopf's handlers (handlers.py) and the API (kube.py).

- `ensure`: the per-job ServiceAccount/Role/RoleBinding and the batch Job, idempotently (deterministic names;
  409 AlreadyExists adopts what this KontextLoRAJob owns), so a restart at any point never makes a second Job.
- `sync`: the operator's status keys from the in-memory view of the Job, its pods and the trainer's stage
  (kopf indexes fed by label-selected watches: no polling), written with optimistic concurrency, and an Event
  for every transition.
- `apply_spec_change`, `cleanup`, `expire`: suspend/resume and deadlines, deletion, ttlSecondsAfterFinished.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import kopf

from kontext_lora.api import InvalidJobError, KontextLoRAJob, Phase, parse_job
from kontext_lora.api.operator_config import OperatorConfig

from . import resources
from .kube import Kube, KubeError, klj_path, object_path
from .metrics import RECONCILE_ERRORS, RECONCILE_SECONDS, JobPhases, waiting
from .status import desired_status, invalid_spec, observe, status_patch, transitions, trim_job

Key = tuple[str, str]
COMPONENT = "kontext-lora-operator"
# States in which the trainer has not started: a changed spec replaces the Job instead of being refused.
REPLACEABLE_PHASES = (None, Phase.Pending, Phase.Suspended)
# How long deletion waits for the trainer pod to stop before letting the garbage collector finish alone.
DELETE_WAIT_SECONDS = 120
SYNC_RETRY_DELAYS = (0.5, 1, 2, 5, 10, 30)

logger = logging.getLogger("kontext_operator")


@dataclass(frozen=True)
class Problem:
    """Why the operator could not (yet) create what a job needs; shown in status while the job is Pending."""

    reason: str
    message: str


def trim_klj(body: Mapping[str, Any]) -> dict[str, Any]:
    """What the operator keeps of a KontextLoRAJob in memory: no managedFields or annotations."""
    metadata = body.get("metadata", {})
    return {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": {
            key: metadata[key]
            for key in (
                "name",
                "namespace",
                "uid",
                "generation",
                "labels",
                "resourceVersion",
                "deletionTimestamp",
                "creationTimestamp",
            )
            if key in metadata
        },
        "spec": dict(body.get("spec") or {}),
        "status": dict(body.get("status") or {}),
    }


def involved(body: Mapping[str, Any]) -> dict[str, Any]:
    metadata = body["metadata"]
    return {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "name": metadata["name"],
        "namespace": metadata["namespace"],
        "uid": metadata.get("uid"),
    }


def _parse_time(value: str | None) -> datetime | None:
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None
    except ValueError:
        return None


class Reconciler:
    def __init__(self, config: OperatorConfig, kube: Kube, phases: JobPhases):
        self.config = config
        self.kube = kube
        self.phases = phases
        self.kljs: Mapping[Key, Iterable[dict]] = {}
        self.jobs: Mapping[Key, Iterable[dict]] = {}
        self.pods: Mapping[Key, Iterable[dict]] = {}
        self.problems: dict[Key, Problem] = {}
        self._locks: dict[Key, asyncio.Lock] = {}
        self._warned: dict[Key, int | None] = {}
        self._retries: dict[Key, int] = {}
        # Per job: (resourceVersion the index had, the object our status patch returned), see `_sync`.
        self._written: dict[Key, tuple[str | None, dict]] = {}

    def bind(self, kljs: Mapping, jobs: Mapping, pods: Mapping) -> None:
        """The kopf indexes (live views, filled by the watches before any handler runs)."""
        self.kljs, self.jobs, self.pods = kljs, jobs, pods

    # ---- reading ----------------------------------------------------------------------------------------

    def validate(self, body: Mapping[str, Any]) -> KontextLoRAJob:
        """The job as the API model reads it, plus what only this cluster's operator config can tell."""
        document = {key: body[key] for key in ("apiVersion", "kind", "metadata", "spec") if key in body}
        name = (body.get("metadata") or {}).get("name", "<unnamed>")
        job = parse_job(document, source=name)
        if job.spec.resources.gpu not in self.config.gpu_classes:
            configured = ", ".join(sorted(self.config.gpu_classes)) or "none"
            raise InvalidJobError(
                name,
                [
                    f"spec.resources.gpu: GPU class {job.spec.resources.gpu.value!r} is not configured in this "
                    f"cluster's operator (configured: {configured})"
                ],
            )
        return job

    def klj(self, key: Key) -> dict | None:
        found = list(self.kljs.get(key, ()))
        return found[0] if found else None

    def owned_jobs(self, key: Key, uid: str | None) -> list[dict]:
        return [job for job in self.jobs.get(key, ()) if uid in job.get("owners", ())]

    def live_job(self, key: Key, uid: str | None) -> dict | None:
        return next((job for job in self.owned_jobs(key, uid) if not job.get("deleting")), None)

    # ---- status -----------------------------------------------------------------------------------------

    def _lock(self, key: Key) -> asyncio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        return lock

    async def sync(self, namespace: str, name: str) -> None:
        """Bring the operator's status keys up to date. Never raises: a failed sync is retried with a backoff
        (the watch event that would trigger it again may never come)."""
        key = (namespace, name)
        began = time.perf_counter()
        try:
            async with self._lock(key):
                await self._sync(key)
        except Exception as error:
            RECONCILE_ERRORS.labels("sync").inc()
            attempt = self._retries.get(key, 0)
            self._retries[key] = attempt + 1
            delay = SYNC_RETRY_DELAYS[min(attempt, len(SYNC_RETRY_DELAYS) - 1)]
            logger.warning("status of %s/%s not updated (%s); retrying in %ss", namespace, name, error, delay)
            asyncio.get_running_loop().call_later(delay, lambda: asyncio.ensure_future(self.sync(namespace, name)))
        else:
            self._retries.pop(key, None)
        finally:
            RECONCILE_SECONDS.labels("sync").observe(time.perf_counter() - began)

    async def _sync(self, key: Key) -> None:
        body = self.klj(key)
        if body is None:
            self.forget(key)
            return
        written = self._written.pop(key, None)
        if written and written[0] == body["metadata"].get("resourceVersion"):
            # Our last status write has not come back through the watch yet: start from what it returned.
            body = written[1]
            self._written[key] = written
        metadata = body["metadata"]
        if metadata.get("deletionTimestamp"):
            return
        status = body.get("status") or {}
        try:
            job = self.validate(body)
        except InvalidJobError as error:
            observation = invalid_spec(error.errors, status)
        else:
            batch = self.live_job(key, metadata.get("uid"))
            pods = [p for p in self.pods.get(key, ()) if batch and p.get("jobUid") == batch["uid"]]
            observation = observe(
                batch,
                pods,
                status,
                suspend=job.spec.suspend,
                active_deadline_seconds=job.spec.run_policy.active_deadline_seconds,
            )
            problem = self.problems.get(key)
            if problem and not observation.job_exists and observation.phase == Phase.Pending:
                observation = replace(observation, reason=problem.reason, message=problem.message)
        desired = desired_status(
            status, observation, job_name=resources.child_name(key[1]), generation=metadata.get("generation")
        )
        self.phases.set(key, desired["phase"])
        patch = status_patch(status, desired)
        if not patch:
            return
        try:
            written = await self.kube.merge_patch(
                klj_path(key[0], key[1], "status"),
                {"metadata": {"resourceVersion": metadata.get("resourceVersion")}, "status": patch},
            )
            self._written[key] = (metadata.get("resourceVersion"), trim_klj(written))
        except KubeError as error:
            if error.conflict or error.not_found:
                # A newer version is on its way through the watch (its event syncs again), or the job is gone.
                return
            raise
        for transition in transitions(status, desired):
            await self.event(body, transition.type, transition.reason, transition.message)

    async def report_problem(self, key: Key, reason: str, message: str) -> None:
        """Show why the job's objects could not be made (while it is Pending) until a later attempt succeeds."""
        self.problems[key] = Problem(reason, message)
        await self.sync(*key)

    def forget(self, key: Key) -> None:
        self.phases.forget(key)
        self.problems.pop(key, None)
        self._warned.pop(key, None)
        self._retries.pop(key, None)
        self._written.pop(key, None)
        lock = self._locks.get(key)
        if lock is not None and not lock.locked():
            del self._locks[key]

    async def event(self, body: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        try:
            await self.kube.post_event(involved(body), type_, reason, message, COMPONENT)
        except KubeError as error:
            if error.status == 403 and "being terminated" in error.message:
                # The namespace is being deleted (and the job with it): nothing can be written there any more.
                logger.debug("event %s on %s dropped: its namespace is being deleted", reason, body["metadata"]["name"])
                return
            logger.warning("could not post event %s on %s: %s", reason, body["metadata"]["name"], error)

    # ---- creating -----------------------------------------------------------------------------------------

    async def ensure(self, body: Mapping[str, Any]) -> dict:
        """Everything the job needs, created once. Raises InvalidJobError, or kopf errors to retry."""
        job = self.validate(body)
        namespace, name, uid = job.metadata.namespace, job.metadata.name, job.metadata.uid
        key = (namespace, name)
        desired = resources.batch_job(job, self.config)
        owned = self.owned_jobs(key, uid)
        current = next((j for j in owned if not j.get("deleting")), None) or (owned[0] if owned else None)
        try:
            if current is None:
                # The pod needs its ServiceAccount to exist, the RoleBinding its Role (escalation check); the binding
                # is only used once the trainer reports progress, so it is made alongside the Job.
                await asyncio.gather(
                    self._create_or_adopt(key, resources.service_account(job), uid),
                    self._create_or_adopt(key, resources.role(job), uid),
                )
                _, (batch, created) = await asyncio.gather(
                    self._create_or_adopt(key, resources.role_binding(job), uid),
                    self._create_or_adopt(key, desired, uid),
                )
                current = trim_job(batch)
                if created:  # not when an earlier run (before a restart) made it and this one adopted it
                    await self.event(
                        body, "Normal", "JobCreated", f"created batch Job {desired['metadata']['name']} for the trainer"
                    )
        except KubeError as error:
            await self.report_problem(key, "CreateFailed", f"could not create the trainer's objects: {error}")
            raise kopf.TemporaryError(str(error), delay=5) from None
        if current.get("deleting"):
            raise waiting(f"waiting for the replaced Job {current['name']} to be deleted", 1)
        if current.get("specHash") != desired["metadata"]["annotations"][resources.SPEC_HASH_ANNOTATION]:
            await self._spec_drift(body, job, current)
        self.problems.pop(key, None)
        return current

    async def _create_or_adopt(self, key: Key, manifest: dict, uid: str | None) -> tuple[dict, bool]:
        """(the object, whether this call created it); 409 AlreadyExists adopts what this job owns."""
        kind, name = manifest["kind"], manifest["metadata"]["name"]
        path = object_path(kind, key[0])
        try:
            return await self.kube.create(path, manifest), True
        except KubeError as error:
            if not error.conflict:
                raise
        existing = await self.kube.get(object_path(kind, key[0], name))
        if existing is None:  # deleted between our create and get: try again shortly
            raise waiting(f"{kind} {name} was deleted while being adopted", 1)
        owners = [ref.get("uid") for ref in existing.get("metadata", {}).get("ownerReferences") or []]
        if uid not in owners:
            message = (
                f"a {kind} named {name} already exists in {key[0]} and does not belong to this KontextLoRAJob; "
                "delete it or rename the job"
            )
            await self.report_problem(key, "NameTaken", message)
            raise kopf.TemporaryError(message, delay=10)
        return existing, False

    async def _spec_drift(self, body: Mapping[str, Any], job: KontextLoRAJob, current: dict) -> None:
        """The spec changed after the Job was made: replace a Job that has not started, refuse the rest."""
        key = (job.metadata.namespace, job.metadata.name)
        phase = (body.get("status") or {}).get("phase")
        if phase in REPLACEABLE_PHASES:
            self.problems[key] = Problem(
                "Recreating", f"the spec changed before training started: replacing Job {current['name']}"
            )
            await self.kube.delete(
                object_path("Job", key[0], current["name"]), propagation="Foreground", uid=current["uid"]
            )
            await self.event(body, "Normal", "SpecChanged", f"replacing Job {current['name']} with the changed spec")
            raise waiting(f"waiting for the replaced Job {current['name']} to be deleted", 1)
        generation = job.metadata.generation
        if self._warned.get(key) != generation:
            self._warned[key] = generation
            await self.event(
                body,
                "Warning",
                "SpecChangeNotApplied",
                f"the job is {phase}: only spec.suspend and spec.runPolicy apply to it; the trainer keeps the spec "
                "it started with (install the kontext-lora ValidatingAdmissionPolicy to refuse such changes)",
            )

    # ---- changing -----------------------------------------------------------------------------------------

    async def apply_spec_change(self, body: Mapping[str, Any], old: Mapping | None, new: Mapping | None) -> None:
        """Suspend/resume and run-policy changes go to the live Job; the rest replaces a not-yet-started Job."""
        job = self.validate(body)
        key = (job.metadata.namespace, job.metadata.name)
        current = self.live_job(key, job.metadata.uid)
        if current is None:
            await self.ensure(body)
            return
        old, new = dict(old or {}), dict(new or {})
        old_policy, new_policy = dict(old.get("runPolicy") or {}), dict(new.get("runPolicy") or {})
        patch: dict[str, Any] = {}
        if bool(old.get("suspend")) != bool(new.get("suspend")):
            patch["suspend"] = job.spec.suspend
        if old_policy.get("backoffLimit") != new_policy.get("backoffLimit"):
            patch["backoffLimit"] = job.spec.run_policy.backoff_limit
        if old_policy.get("activeDeadlineSeconds") != new_policy.get("activeDeadlineSeconds"):
            patch["activeDeadlineSeconds"] = job.spec.run_policy.active_deadline_seconds
        if patch:
            await self.kube.merge_patch(object_path("Job", key[0], current["name"]), {"spec": patch})
            if "suspend" in patch:
                verb = "suspending" if job.spec.suspend else "resuming (from the last checkpoint)"
                await self.event(body, "Normal", "Suspend" if job.spec.suspend else "Resume", f"{verb} the trainer")
        await self.ensure(body)

    async def job_gone(self, key: Key) -> None:
        """A Job of ours was deleted: make it again unless the job finished or is being deleted."""
        body = self.klj(key)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return
        if (body.get("status") or {}).get("phase") in (Phase.Succeeded, Phase.Failed):
            return
        if self.live_job(key, body["metadata"].get("uid")) is not None:
            return
        try:
            await self.ensure(body)
        except InvalidJobError:
            return
        except kopf.TemporaryError as error:  # called from a watch event, which kopf does not retry: we do
            delay = float(error.delay or 5)
            asyncio.get_running_loop().call_later(delay, lambda: asyncio.ensure_future(self.job_gone(key)))

    # ---- deleting -----------------------------------------------------------------------------------------

    async def cleanup(self, body: Mapping[str, Any], runtime: float) -> None:
        """Finalizer: stop the trainer and remove the Job (the GC takes the rest); storage is never touched."""
        metadata = body["metadata"]
        key = (metadata["namespace"], metadata["name"])
        owned = self.owned_jobs(key, metadata.get("uid"))
        for job in owned:
            if not job.get("deleting"):
                await self.kube.delete(
                    object_path("Job", key[0], job["name"]), propagation="Foreground", uid=job["uid"]
                )
        if owned and runtime < DELETE_WAIT_SECONDS:
            raise waiting("waiting for the trainer pod to stop", 1)
        output = ((body.get("spec") or {}).get("output") or {}).get("uri", "storage")
        await self.event(
            body,
            "Normal",
            "Deleted",
            f"removed the trainer's cluster objects; LoRAs and checkpoints in {output} are kept",
        )
        self.forget(key)

    async def expire(self, body: Mapping[str, Any], stopped: Any) -> None:
        """ttlSecondsAfterFinished: delete the finished KontextLoRAJob itself (never its outputs) when due."""
        spec, status, metadata = body.get("spec") or {}, body.get("status") or {}, body["metadata"]
        ttl = (spec.get("runPolicy") or {}).get("ttlSecondsAfterFinished")
        finished = _parse_time(status.get("completionTime"))
        if ttl is None or finished is None:
            return
        delay = (finished - datetime.now(UTC)).total_seconds() + ttl
        if delay > 0:
            await stopped.wait(delay)
            if stopped:
                return
        await self.event(
            body,
            "Normal",
            "Expired",
            f"deleting the KontextLoRAJob {ttl}s after it finished (runPolicy.ttlSecondsAfterFinished); "
            f"outputs in {(spec.get('output') or {}).get('uri')} are kept",
        )
        await self.kube.delete(klj_path(metadata["namespace"], metadata["name"]), uid=metadata.get("uid"))
