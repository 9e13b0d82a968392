"""The operator's logic: one coalescing, level-triggered reconcile loop per KontextLoRAJob.

What sets it off: every watch event of the KontextLoRAJob (kopf, handlers.py) asks for a full reconcile; an event of
its batch Job or pods (watches.py) that changed something the status reads asks for a status sync (the Job's
deletion for a full reconcile); timers ask again after a failure, and at `ttlSecondsAfterFinished`. Requests for a
job that arrive while its reconcile runs are merged into one more run, from the newest state. Each run:

- `ensure`: the per-job ServiceAccount/Role/RoleBinding, then the CPU-only preparation Job, and once that Job
  completed the GPU batch Job — idempotently (deterministic names; 409 AlreadyExists adopts what this
  KontextLoRAJob owns), so a restart at any point never makes a second one of either; then the spec brought to the
  live Job, level-triggered (no stored diff): `spec.suspend` when it differs from the value last applied (an
  annotation on the Job, so Kueue's own suspending is left alone), `runPolicy` when it differs, and a pod template
  that changed before training replaces both Jobs (the preparation validated the old spec). Skipped while the
  job's generation was already brought to a live GPU Job. A failed preparation leaves no GPU Job to create.
- `sync`: the operator's status keys from the in-memory Job, pods and the trainer's stage, written with optimistic
  concurrency only when one of them changed, and an Event for every transition.
- `cleanup` (kopf's delete handler, behind the finalizer) and `expire` (TTL).

Writes outside kopf's handlers ask the peering gate (peering.py) first: only the replica that kopf lets act writes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from kontext_lora.api import InvalidJobError, KontextLoRAJob, Phase, parse_job
from kontext_lora.api.memory import admission_problem
from kontext_lora.api.operator_config import OperatorConfig

from . import resources
from .kube import Kube, KubeError, Priority, klj_path, object_path
from .metrics import RECONCILE_ERRORS, RECONCILE_SECONDS, JobPhases, waiting
from .peering import PeeringGate
from .status import desired_status, invalid_spec, observe, status_patch, transitions, trim_job
from .timestamps import parse_time
from .watches import ChildWatches

Key = tuple[str, str]
COMPONENT = "kontext-lora-operator"
# States in which the trainer has not started: a changed spec replaces the Job instead of being refused.
REPLACEABLE_PHASES = (None, Phase.Pending, Phase.Preparing, Phase.Suspended)
FINISHED_PHASES = (Phase.Succeeded, Phase.Failed)
# How long deletion waits for the trainer pod to stop before letting the garbage collector finish alone.
DELETE_WAIT_SECONDS = 120
# Delays of the retries after an unexpected failure (a status write, an API error while creating).
RETRY_DELAYS = (0.5, 1, 2, 5, 10, 30)
# Jobs reconciled at once. More wait in a queue as keys only (a job in flight holds its parsed spec and manifests),
# so a burst of a thousand new jobs costs a thousand queue entries, not a thousand half-done reconciles.
WORKERS = 32

logger = logging.getLogger("kontext_operator")


@dataclass(frozen=True)
class Problem:
    """Why the operator could not (yet) create what a job needs; shown in status while the job is Pending."""

    reason: str
    message: str


class Retry(Exception):
    """Reconcile this job again after `delay` seconds; `error`: count it in kontext_operator_reconcile_errors."""

    def __init__(self, message: str, delay: float, error: bool = True):
        super().__init__(message)
        self.delay, self.error = delay, error


@dataclass(frozen=True)
class Essentials:
    """What a status sync needs from the parsed spec of one generation (parsing on every sync would be wasted)."""

    uid: str | None
    generation: int | None
    suspend: bool = False
    active_deadline_seconds: int | None = None
    errors: tuple[str, ...] = ()
    world_size: int | None = None
    backoff_limit: int = 0


def trim_klj(body: Mapping[str, Any]) -> dict[str, Any]:
    """What the operator keeps of a KontextLoRAJob in memory: no managedFields, of the annotations only its own
    count of group restarts."""
    metadata = body.get("metadata", {})
    kept = {k: v for k, v in (metadata.get("annotations") or {}).items() if k == resources.GROUP_RESTARTS_ANNOTATION}
    trimmed = {
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
    if kept:
        trimmed["metadata"]["annotations"] = kept
    return trimmed


def involved(body: Mapping[str, Any]) -> dict[str, Any]:
    metadata = body["metadata"]
    return {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "name": metadata["name"],
        "namespace": metadata["namespace"],
        "uid": metadata.get("uid"),
    }


def group_restarts(body: Mapping[str, Any]) -> int:
    """Failed groups of pods the operator has replaced (an annotation on the KontextLoRAJob)."""
    value = ((body.get("metadata") or {}).get("annotations") or {}).get(resources.GROUP_RESTARTS_ANNOTATION)
    try:
        return max(int(value or 0), 0)
    except ValueError:
        return 0


def finished(body: Mapping[str, Any]) -> bool:
    return (body.get("status") or {}).get("phase") in FINISHED_PHASES


def _completed(job: Mapping[str, Any]) -> bool:
    """Whether a (trimmed) batch Job completed successfully."""
    conditions = (job.get("status") or {}).get("conditions") or ()
    return any(c.get("type") in ("Complete", "SuccessCriteriaMet") and c.get("status") == "True" for c in conditions)


class Reconciler:
    def __init__(
        self,
        config: OperatorConfig,
        kube: Kube,
        phases: JobPhases,
        children: ChildWatches | None = None,
        gate: PeeringGate | None = None,
    ):
        self.config = config
        self.kube = kube
        self.phases = phases
        self.children = children
        self.gate = gate
        self.kljs: dict[Key, dict] = {}
        self.problems: dict[Key, Problem] = {}
        self._warned: dict[Key, int | None] = {}
        self._attempts: dict[Key, int] = {}
        # Per job: (resourceVersion the store had, the object our status patch returned), see `_sync`.
        self._written: dict[Key, tuple[str | None, dict]] = {}
        self._essentials: dict[Key, Essentials] = {}
        self._ensured: dict[Key, tuple[str | None, int | None]] = {}
        self._rbac_known: set[Key] = set()  # jobs whose Role and RoleBinding this process made or saw
        # The work queue (as client-go's): a job is queued once however often it is asked for, and a job asked for
        # while a worker has it is queued again when that worker is done, so one job never runs twice at once.
        self._dirty: dict[Key, bool] = {}  # job -> whether the next run must be a full reconcile
        self._queue: asyncio.Queue[Key] | None = None
        self._queued: set[Key] = set()
        self._processing: set[Key] = set()
        self._workers: list[asyncio.Task] = []
        self._retry_timers: dict[Key, asyncio.TimerHandle] = {}
        self._ttl_timers: dict[Key, tuple[float, asyncio.TimerHandle]] = {}
        self._tasks: set[asyncio.Task] = set()
        # Each pause of this replica starts an epoch; a job last seen in an earlier one is read again before
        # anything is created for it (kopf may have missed its deletion while paused).
        self._epoch = 0
        self._seen: dict[Key, int] = {}
        # Arrival order of each job: its API requests wait in that order (kube.PrioritySlots), earliest job first.
        self._order: dict[Key, int] = {}

    @property
    def active(self) -> bool:
        return self.gate is None or self.gate.active

    # ---- inputs -----------------------------------------------------------------------------------------------

    def klj_event(self, kind: str | None, body: Mapping[str, Any]) -> None:
        """A watch event of a KontextLoRAJob (kopf): remember it and reconcile it."""
        metadata = body.get("metadata") or {}
        key = (metadata.get("namespace", ""), metadata.get("name", ""))
        if kind == "DELETED":
            self.kljs.pop(key, None)
            self.forget(key)
            return
        self.kljs[key] = trim_klj(body)
        self._seen[key] = self._epoch
        if key not in self._order:
            self._order[key] = self.kube.slots.next_order()
        if self.children is not None:
            self.children.serve(key[0])
        self.request(key, full=True)

    def child_changed(self, key: Key, child: str, kind: str) -> None:
        """Something the status reads changed in the job's batch Job or pods."""
        if key not in self.kljs:
            return
        gone = child == "job" and kind == "DELETED"
        if gone:
            self._ensured.pop(key, None)
        # A Job's change can be the preparation completing, after which the GPU Job is made: a full reconcile (cheap
        # while a live GPU Job is already up to date: a sync).
        self.request(key, full=child == "job")

    def gate_changed(self, active: bool) -> None:
        if active:
            for key in list(self.kljs):
                self.request(key, full=True)
        else:
            self._epoch += 1
            for timers in (self._retry_timers, self._ttl_timers):
                for value in timers.values():
                    (value[1] if isinstance(value, tuple) else value).cancel()
                timers.clear()

    def request(self, key: Key, full: bool = False) -> None:
        """Reconcile (`full`) or sync the job soon; merged with a request already waiting."""
        self._dirty[key] = self._dirty.get(key, False) or full
        if key not in self._queued and key not in self._processing:
            self._enqueue(key)

    def _enqueue(self, key: Key) -> None:
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._workers = [
                asyncio.get_running_loop().create_task(self._work(), name=f"reconcile worker {n}")
                for n in range(WORKERS)
            ]
        self._queued.add(key)
        self._queue.put_nowait(key)

    def stop(self) -> None:
        for worker in self._workers:
            worker.cancel()

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _work(self) -> None:
        assert self._queue is not None
        while True:
            key = await self._queue.get()
            self._queued.discard(key)
            if key not in self._dirty:
                continue
            full = self._dirty.pop(key)
            self._processing.add(key)
            try:
                await self._step(key, full)
            except Exception:  # a bug: say so and try again later rather than lose the job
                logger.exception("reconciling %s/%s failed", *key)
                self._retry_later(key)
            finally:
                self._processing.discard(key)
                if key in self._dirty:  # asked for again while this worker had it
                    self._enqueue(key)

    async def _step(self, key: Key, full: bool) -> None:
        body = self.kljs.get(key)
        if body is None:
            self.forget(key)
            return
        if not self.active or body["metadata"].get("deletionTimestamp"):
            return  # a standby never writes; a deletion is kopf's delete handler's (behind the finalizer)
        if self.children is not None:
            await self.children.ready(key[0])
        body = self.kljs.get(key)
        if body is None:
            return
        if full and not finished(body):
            uid, generation = body["metadata"].get("uid"), body["metadata"].get("generation")
            live = self.live_job(key, uid)
            stale = live is None or self._ensured.get(key) != (uid, generation) or key in self.problems
            # A failed group of pods is replaced by the reconcile even when the generation was already brought to it.
            if stale or self.group_restart(body, live, self.essentials(key, body).backoff_limit):
                if live is None and self._had_job(body):
                    await self.sync(*key)  # say JobMissing before making it again
                if not await self._confirm(key):
                    return
                await self._reconcile(key, self.kljs[key])
        await self.sync(*key)
        self._schedule_ttl(key)

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
        if (memory := admission_problem(job.spec)) is not None:  # the measured peak exceeds the GPU class
            raise InvalidJobError(name, [memory])
        return job

    def essentials(self, key: Key, body: Mapping[str, Any]) -> Essentials:
        metadata = body["metadata"]
        cached = self._essentials.get(key)
        if cached is not None and (cached.uid, cached.generation) == (metadata.get("uid"), metadata.get("generation")):
            return cached
        try:
            job = self.validate(body)
        except InvalidJobError as error:
            found = Essentials(metadata.get("uid"), metadata.get("generation"), errors=tuple(error.errors))
        else:
            found = Essentials(
                metadata.get("uid"),
                metadata.get("generation"),
                job.spec.suspend,
                job.spec.run_policy.active_deadline_seconds,
                world_size=job.spec.resources.world_size,
                backoff_limit=job.spec.run_policy.backoff_limit,
            )
        self._essentials[key] = found
        return found

    def klj(self, key: Key) -> dict | None:
        return self.kljs.get(key)

    def owned_jobs(self, key: Key, uid: str | None) -> list[dict]:
        jobs: Iterable[dict] = self.children.jobs.get(key) if self.children is not None else ()
        return [job for job in jobs if uid in job.get("owners", ())]

    def live_job(self, key: Key, uid: str | None, role: str = resources.TRAIN_ROLE) -> dict | None:
        """The job's batch Job of `role` (the GPU Job by default) that is not being deleted."""
        return next(
            (job for job in self.owned_jobs(key, uid) if job.get("role") == role and not job.get("deleting")), None
        )

    def pods(self, key: Key, job_uid: str) -> list[dict]:
        pods: Iterable[dict] = self.children.pods.get(key) if self.children is not None else ()
        return [pod for pod in pods if pod.get("jobUid") == job_uid]

    @staticmethod
    def _had_job(body: Mapping[str, Any]) -> bool:
        status = body.get("status") or {}
        return bool(status.get("jobName")) and any(
            c.get("type") == "Created" and c.get("status") == "True" for c in status.get("conditions") or ()
        )

    async def _confirm(self, key: Key) -> bool:
        """Whether the job still exists as remembered; read again when it was last seen before a pause."""
        if self._seen.get(key) == self._epoch:
            return True
        remembered = self.kljs.get(key)
        fresh = await self.kube.get(klj_path(*key))
        if fresh is None or remembered is None or fresh["metadata"].get("uid") != remembered["metadata"].get("uid"):
            self.kljs.pop(key, None)
            self.forget(key)
            return False
        self.kljs[key] = trim_klj(fresh)
        self._seen[key] = self._epoch
        return True

    # ---- status -----------------------------------------------------------------------------------------

    async def sync(self, namespace: str, name: str) -> None:
        """Bring the operator's status keys up to date. Never raises: a failed sync is retried with a backoff
        (the watch event that would trigger it again may never come)."""
        key = (namespace, name)
        began = time.perf_counter()
        try:
            await self._sync(key)
        except Exception as error:
            RECONCILE_ERRORS.labels("sync").inc()
            logger.warning("status of %s/%s not updated (%s)", namespace, name, error)
            self._retry_later(key, full=False)
        finally:
            RECONCILE_SECONDS.labels("sync").observe(time.perf_counter() - began)

    async def _sync(self, key: Key) -> None:
        body = self.kljs.get(key)
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
        essentials = self.essentials(key, body)
        if essentials.errors:
            observation = invalid_spec(list(essentials.errors), status)
        else:
            batch = self.live_job(key, metadata.get("uid"))
            preparation = self.live_job(key, metadata.get("uid"), resources.PREPARE_ROLE)
            observation = observe(
                batch,
                self.pods(key, batch["uid"]) if batch else [],
                status,
                suspend=essentials.suspend,
                active_deadline_seconds=essentials.active_deadline_seconds,
                preparation=preparation,
                preparation_pods=self.pods(key, preparation["uid"]) if preparation and not batch else [],
                group_restarts=group_restarts(body),
                group_restart=self.group_restart(body, batch, essentials.backoff_limit),
            )
            problem = self.problems.get(key)
            if problem and not observation.job_exists and observation.phase == Phase.Pending:
                observation = replace(observation, reason=problem.reason, message=problem.message)
        desired = desired_status(
            status,
            observation,
            job_name=resources.child_name(key[1]),
            generation=metadata.get("generation"),
            world_size=essentials.world_size,
        )
        self.phases.set(key, desired["phase"])
        patch = status_patch(status, desired)
        if not patch or not self.active:
            return
        try:
            written_body = await self.kube.merge_patch(
                klj_path(key[0], key[1], "status"),
                {"metadata": {"resourceVersion": metadata.get("resourceVersion")}, "status": patch},
                priority=Priority.STATUS,
                order=self._order.get(key),
            )
            self._written[key] = (metadata.get("resourceVersion"), trim_klj(written_body))
        except KubeError as error:
            if error.conflict or error.not_found:
                # A newer version is on its way through the watch (its event syncs again), or the job is gone.
                return
            raise
        for transition in transitions(status, desired):
            await self.event(body, transition.type, transition.reason, transition.message)

    def forget(self, key: Key) -> None:
        self.phases.forget(key)
        for store in (self.problems, self._warned, self._attempts, self._written, self._essentials, self._ensured):
            store.pop(key, None)
        self._rbac_known.discard(key)
        self._seen.pop(key, None)
        self._order.pop(key, None)
        if (timer := self._retry_timers.pop(key, None)) is not None:
            timer.cancel()
        if (ttl := self._ttl_timers.pop(key, None)) is not None:
            ttl[1].cancel()

    def _retry_later(self, key: Key, delay: float | None = None, full: bool = True) -> None:
        """Reconcile the job again later: after `delay`, else after the next of RETRY_DELAYS."""
        if delay is None:
            attempt = self._attempts.get(key, 0)
            self._attempts[key] = attempt + 1
            delay = RETRY_DELAYS[min(attempt, len(RETRY_DELAYS) - 1)]
        if (timer := self._retry_timers.pop(key, None)) is not None:
            timer.cancel()
        if key in self.kljs:
            self._retry_timers[key] = asyncio.get_running_loop().call_later(delay, self._retry_due, key, full)

    def _retry_due(self, key: Key, full: bool) -> None:
        self._retry_timers.pop(key, None)
        self.request(key, full=full)

    async def event(self, body: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        target = involved(body)
        order = self._order.get((target["namespace"], target["name"]))
        try:
            await self.kube.post_event(target, type_, reason, message, COMPONENT, order=order)
        except KubeError as error:
            if error.status == 403 and "being terminated" in error.message:
                # The namespace is being deleted (and the job with it): nothing can be written there any more.
                logger.debug("event %s on %s dropped: its namespace is being deleted", reason, body["metadata"]["name"])
                return
            logger.warning("could not post event %s on %s: %s", reason, body["metadata"]["name"], error)

    # ---- creating and changing ------------------------------------------------------------------------------

    async def _reconcile(self, key: Key, body: Mapping[str, Any]) -> None:
        """`ensure`, timed and counted (as `create` while the job has no Job yet, else `update`), retried."""
        handler = "update" if self.owned_jobs(key, body["metadata"].get("uid")) else "create"
        began = time.perf_counter()
        try:
            await self.ensure(body)
        except InvalidJobError:
            self._ensured.pop(key, None)  # the status says why (InvalidSpec); a new generation is looked at again
        except Retry as retry:
            if retry.error:
                RECONCILE_ERRORS.labels(handler).inc()
            logger.info("%s/%s: %s; again in %ss", *key, retry, retry.delay)
            self._ensured.pop(key, None)
            self._retry_later(key, retry.delay)
        except Exception as error:  # a bug or an unexpected answer: say so in status, and try again
            RECONCILE_ERRORS.labels(handler).inc()
            logger.warning("%s/%s: %s: %s", *key, type(error).__name__, error)
            self.problems[key] = Problem("ReconcileError", f"{type(error).__name__}: {error}")
            self._ensured.pop(key, None)
            self._retry_later(key)
        else:
            self._attempts.pop(key, None)
            self._ensured[key] = (body["metadata"].get("uid"), body["metadata"].get("generation"))
        finally:
            RECONCILE_SECONDS.labels(handler).observe(time.perf_counter() - began)

    async def ensure(self, body: Mapping[str, Any]) -> dict:
        """Everything the job needs, created once, and its spec brought to the live Job.

        Raises InvalidJobError, or Retry."""
        job = self.validate(body)
        namespace, name, uid = job.metadata.namespace, job.metadata.name, job.metadata.uid
        key = (namespace, name)
        desired = resources.batch_job(job, self.config)
        owned = self.owned_jobs(key, uid)
        if deleting := next((j for j in owned if j.get("deleting")), None):
            raise Retry(f"waiting for the replaced Job {deleting['name']} to be deleted", 1, error=False)
        trainer = next((j for j in owned if j.get("role") == resources.TRAIN_ROLE), None)
        preparation = next((j for j in owned if j.get("role") == resources.PREPARE_ROLE), None)
        if trainer is None:
            if not self.config.preparation.enabled:
                return await self._create_first(body, key, job, desired, uid)
            if preparation is None:
                return await self._create_first(body, key, job, resources.preparation_job(job, self.config), uid)
            await self._ensure_rbac(key, job, uid)
            if preparation.get("specHash") != desired["metadata"]["annotations"][resources.SPEC_HASH_ANNOTATION]:
                await self._spec_drift(body, job, preparation, owned)
            if not _completed(preparation):
                # Preparing (or failed: the status says so): only a suspension applies to a preparation Job.
                await self._apply_to_job(body, job, preparation, run_policy=False)
                self.problems.pop(key, None)
                return preparation
            # Prepared: the GPU Job, now (its first status goes out with it).
            return await self._create_job(body, key, desired, uid)
        await self._ensure_rbac(key, job, uid)
        if why := self.group_restart(body, trainer, job.spec.run_policy.backoff_limit):
            await self._restart_group(body, key, trainer, why)
        if trainer.get("specHash") != desired["metadata"]["annotations"][resources.SPEC_HASH_ANNOTATION]:
            await self._spec_drift(body, job, trainer, owned)
        await self._apply_to_job(body, job, trainer)
        self.problems.pop(key, None)
        return trainer

    async def _create_first(
        self, body: Mapping[str, Any], key: Key, job: KontextLoRAJob, manifest: dict, uid: str | None
    ) -> dict:
        """The job's first batch Job (the preparation Job, or the GPU Job without preparation) and its RBAC."""
        # The pod needs its ServiceAccount when the job controller makes it, so that goes first. The Role and
        # RoleBinding (the Role first: RBAC's escalation check resolves it) are only used once the pod reports
        # progress, which it retries, so they are made alongside the Job at a lower priority: in a burst of new
        # jobs, every Job is created before the next job's Role.
        try:
            await self._create_or_adopt(key, resources.service_account(job), uid)
        except KubeError as error:
            raise self._create_failed(key, error) from None
        made, rbac = await asyncio.gather(
            self._create_job(body, key, manifest, uid),
            self._ensure_role_and_binding(key, job, uid),
            return_exceptions=True,
        )
        for outcome in (made, rbac):
            if isinstance(outcome, BaseException):
                raise outcome
        assert isinstance(made, dict)
        return made

    async def _ensure_rbac(self, key: Key, job: KontextLoRAJob, uid: str | None) -> None:
        if key in self._rbac_known:
            return
        # An operator killed between the first Job and its RoleBinding left none.
        binding = resources.role_binding(job)["metadata"]["name"]
        path = object_path("RoleBinding", key[0], binding)
        if await self.kube.get(path, priority=Priority.CHANGE, order=self._order.get(key)) is None:
            await self._ensure_role_and_binding(key, job, uid)
        else:
            self._rbac_known.add(key)

    # ---- a group of pods (nodes > 1): one Job, failed and replaced as a whole -------------------------------

    def group_restart(self, body: Mapping[str, Any], trainer: dict | None, backoff_limit: int) -> str | None:
        """Why the failed GPU Job of a multi-node job is being replaced with a new group, or None (not a group, not
        failed, no restart left, or failed for good: its deadline passed)."""
        if trainer is None or trainer.get("nodes", 1) <= 1 or trainer.get("deleting"):
            return None
        conditions = (trainer.get("status") or {}).get("conditions") or []
        failed = next(
            (c for c in conditions if c.get("type") in ("Failed", "FailureTarget") and c.get("status") == "True"), None
        )
        if failed is None or failed.get("reason") == "DeadlineExceeded":
            return None
        done = group_restarts(body)
        if done >= backoff_limit:
            return None
        return (
            f"restart {done + 1} of {backoff_limit}: {failed.get('message') or failed.get('reason')}; replacing all "
            f"{trainer['nodes']} pods, which resume from the last checkpoint"
        )

    async def _restart_group(self, body: Mapping[str, Any], key: Key, trainer: dict, why: str) -> None:
        """Count the restart on the KontextLoRAJob, then delete the failed Job in the foreground: its replacement
        is made only once every pod of the old group is gone (never two groups at once, no stale rendezvous)."""
        count = group_restarts(body) + 1
        await self.kube.merge_patch(
            klj_path(*key),
            {"metadata": {"annotations": {resources.GROUP_RESTARTS_ANNOTATION: str(count)}}},
            order=self._order.get(key),
        )
        path = object_path("Job", key[0], trainer["name"])
        await self.kube.delete(path, propagation="Foreground", uid=trainer["uid"])
        await self.event(body, "Warning", "GroupRestart", why)
        raise Retry(f"replacing the failed group of {trainer['name']}", 1, error=False)

    async def _create_job(self, body: Mapping[str, Any], key: Key, desired: dict, uid: str | None) -> dict:
        """The batch Job (or the one an earlier run made), trimmed; the job's first status goes out with it. A
        multi-node GPU Job gets its headless Service first (the pods' hostnames resolve through it)."""
        if desired["spec"].get("completionMode") == "Indexed":
            try:
                await self._create_or_adopt(key, resources.rendezvous_service(self.validate(body)), uid)
            except KubeError as error:
                raise self._create_failed(key, error) from None
        try:
            batch, created = await self._create_or_adopt(key, desired, uid)
        except KubeError as error:
            raise self._create_failed(key, error) from None
        current = trim_job(batch)
        if self.children is not None:
            self.children.jobs.put(current)  # before its watch event: the next sync already sees it
        self.problems.pop(key, None)
        if created and current.get("role") == resources.PREPARE_ROLE:
            await self.event(
                body,
                "Normal",
                "PreparationCreated",
                f"created the preparation Job {desired['metadata']['name']} (CPU only: storage, model access and "
                "every pair are checked before a GPU is requested)",
            )
        elif created:  # not when an earlier run (before a restart) made it and this one adopted it
            await self.event(
                body, "Normal", "JobCreated", f"created batch Job {desired['metadata']['name']} for the trainer"
            )
        # Not after the RBAC objects: on a fast node the pod may already run by then, and Pending would be skipped.
        await self.sync(*key)
        return current

    async def _ensure_role_and_binding(self, key: Key, job: KontextLoRAJob, uid: str | None) -> None:
        """The trainer's Role and RoleBinding; a failure is retried by the job's next reconcile (Retry)."""
        try:
            await self._create_or_adopt(key, resources.role(job), uid, Priority.CHANGE)
            await self._create_or_adopt(key, resources.role_binding(job), uid, Priority.CHANGE)
        except KubeError as error:
            raise self._create_failed(key, error) from None
        self._rbac_known.add(key)

    def _create_failed(self, key: Key, error: KubeError) -> Retry:
        """Shown in status while the job has no Job; the job is reconciled again in 5 s."""
        self.problems[key] = Problem("CreateFailed", f"could not create the trainer's objects: {error}")
        return Retry(str(error), 5)

    async def _create_or_adopt(
        self, key: Key, manifest: dict, uid: str | None, priority: Priority = Priority.CREATE
    ) -> tuple[dict, bool]:
        """(the object, whether this call created it); 409 AlreadyExists adopts what this job owns."""
        kind, name = manifest["kind"], manifest["metadata"]["name"]
        path = object_path(kind, key[0])
        order = self._order.get(key)
        try:
            return await self.kube.create(path, manifest, priority=priority, order=order), True
        except KubeError as error:
            if not error.conflict:
                raise
        existing = await self.kube.get(object_path(kind, key[0], name), priority=priority, order=order)
        if existing is None:  # deleted between our create and get: try again shortly
            raise Retry(f"{kind} {name} was deleted while being adopted", 1, error=False)
        owners = [ref.get("uid") for ref in existing.get("metadata", {}).get("ownerReferences") or []]
        if uid not in owners:
            message = (
                f"a {kind} named {name} already exists in {key[0]} and does not belong to this KontextLoRAJob; "
                "delete it or rename the job"
            )
            self.problems[key] = Problem("NameTaken", message)
            raise Retry(message, 10)
        return existing, False

    async def _spec_drift(self, body: Mapping[str, Any], job: KontextLoRAJob, current: dict, owned: list[dict]) -> None:
        """The spec changed after the Job was made: replace the Jobs of a job that has not started training (the
        preparation too: it validated the old spec), refuse the rest."""
        key = (job.metadata.namespace, job.metadata.name)
        phase = (body.get("status") or {}).get("phase")
        if phase in REPLACEABLE_PHASES:
            names = ", ".join(j["name"] for j in owned)
            self.problems[key] = Problem("Recreating", f"the spec changed before training started: replacing {names}")
            for stale in owned:
                await self.kube.delete(
                    object_path("Job", key[0], stale["name"]), propagation="Foreground", uid=stale["uid"]
                )
            await self.event(body, "Normal", "SpecChanged", f"replacing {names} with the changed spec")
            raise Retry(f"waiting for the replaced {names} to be deleted", 1, error=False)
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

    async def _apply_to_job(
        self, body: Mapping[str, Any], job: KontextLoRAJob, current: dict, run_policy: bool = True
    ) -> None:
        """`spec.suspend` (when changed since last applied) and `runPolicy` (when different; not to a preparation
        Job, whose limits are the operator config's) to the live Job."""
        spec: dict[str, Any] = {}
        annotations: dict[str, str] = {}
        wanted = resources.suspend_value(job.spec.suspend)
        applied = current.get("appliedSuspend")
        if applied is None:
            # A Job made before the annotation existed: record the job's value and leave the Job's as it is (it
            # may be Kueue's); later changes of spec.suspend are applied.
            annotations[resources.SUSPEND_ANNOTATION] = wanted
        elif applied != wanted:
            spec["suspend"] = job.spec.suspend
            annotations[resources.SUSPEND_ANNOTATION] = wanted
        policy = job.spec.run_policy
        if run_policy and current.get("backoffLimit") != policy.backoff_limit:
            spec["backoffLimit"] = policy.backoff_limit
        if run_policy and current.get("activeDeadlineSeconds") != policy.active_deadline_seconds:
            spec["activeDeadlineSeconds"] = policy.active_deadline_seconds
        if not spec and not annotations:
            return
        patch: dict[str, Any] = {"spec": spec} if spec else {}
        if annotations:
            patch["metadata"] = {"annotations": annotations}
        key = (job.metadata.namespace, job.metadata.name)
        path = object_path("Job", key[0], current["name"])
        patched = await self.kube.merge_patch(path, patch, order=self._order.get(key))
        if self.children is not None:
            self.children.jobs.put(trim_job(patched))
        if "suspend" in spec:
            verb = "suspending" if job.spec.suspend else "resuming (from the last checkpoint)"
            await self.event(body, "Normal", "Suspend" if job.spec.suspend else "Resume", f"{verb} the trainer")

    # ---- deleting -----------------------------------------------------------------------------------------

    async def cleanup(self, body: Mapping[str, Any], runtime: float) -> None:
        """Finalizer: stop the trainer and remove the Job (the GC takes the rest); storage is never touched."""
        metadata = body["metadata"]
        key = (metadata["namespace"], metadata["name"])
        if self.children is not None:
            await self.children.ready(key[0])
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

    def _schedule_ttl(self, key: Key) -> None:
        """A finished job with runPolicy.ttlSecondsAfterFinished is deleted that long after its completionTime."""
        body = self.kljs.get(key)
        if body is None:
            return
        ttl = ((body.get("spec") or {}).get("runPolicy") or {}).get("ttlSecondsAfterFinished")
        completed = parse_time((body.get("status") or {}).get("completionTime"))
        scheduled = self._ttl_timers.get(key)
        if ttl is None or completed is None or not finished(body):
            if scheduled is not None:
                scheduled[1].cancel()
                del self._ttl_timers[key]
            return
        due = completed.timestamp() + ttl
        if scheduled is not None and scheduled[0] == due:
            return
        if scheduled is not None:
            scheduled[1].cancel()
        delay = max(0.0, due - time.time())
        uid = body["metadata"].get("uid")
        handle = asyncio.get_running_loop().call_later(delay, lambda: self._spawn(self.expire(key, uid)))
        self._ttl_timers[key] = (due, handle)

    async def expire(self, key: Key, uid: str | None) -> None:
        """ttlSecondsAfterFinished: delete the finished KontextLoRAJob itself (never its outputs)."""
        self._ttl_timers.pop(key, None)
        body = self.kljs.get(key)
        if body is None or body["metadata"].get("uid") != uid or not finished(body) or not self.active:
            return
        began = time.perf_counter()
        spec, metadata = body.get("spec") or {}, body["metadata"]
        ttl = (spec.get("runPolicy") or {}).get("ttlSecondsAfterFinished")
        try:
            await self.event(
                body,
                "Normal",
                "Expired",
                f"deleting the KontextLoRAJob {ttl}s after it finished (runPolicy.ttlSecondsAfterFinished); "
                f"outputs in {(spec.get('output') or {}).get('uri')} are kept",
            )
            await self.kube.delete(klj_path(metadata["namespace"], metadata["name"]), uid=uid)
        except KubeError as error:
            RECONCILE_ERRORS.labels("ttl").inc()
            logger.warning("could not delete the expired %s/%s (%s); again in 10s", *key, error)
            loop = asyncio.get_running_loop()
            self._ttl_timers[key] = (0.0, loop.call_later(10, lambda: self._spawn(self.expire(key, uid))))
        finally:
            RECONCILE_SECONDS.labels("ttl").observe(time.perf_counter() - began)
