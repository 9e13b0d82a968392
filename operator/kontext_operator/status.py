"""From what the cluster says to what the user reads: the operator's half of a KontextLoRAJob's status.

Pure functions over plain dicts (the trimmed batch Job and pods the operator watches, and the current status),
so every rule is unit-tested without a cluster. The operator owns `phase`, `reason`, `message`, `conditions`,
`restarts`, `jobName`, `startTime`, `completionTime` and `observedGeneration`; the trainer owns the progress
keys (`stage`, `step`, `loss`, ...), which are only read here (docs/architecture.md, "Status ownership").
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from kontext_lora.api import ConditionType, Phase, Stage

from .resources import (
    CONTAINER,
    EXIT_INVALID_INPUT,
    EXIT_MODEL_ACCESS_DENIED,
    EXIT_STORAGE_UNREACHABLE,
    JOB_LABEL,
    NODES_ANNOTATION,
    ROLE_LABEL,
    SPEC_HASH_ANNOTATION,
    SUSPEND_ANNOTATION,
    TRAIN_ROLE,
)
from .timestamps import parse_time

OPERATOR_KEYS = (
    "phase",
    "reason",
    "message",
    "conditions",
    "restarts",
    "jobName",
    "worldSize",
    "startTime",
    "completionTime",
    "observedGeneration",
)
RUNNING_PHASES = (Phase.Downloading, Phase.Training, Phase.Uploading)
MAX_MESSAGE = 8192
MAX_CONDITION_MESSAGE = 4096
JOB_UID_LABEL = "batch.kubernetes.io/controller-uid"
EXIT_CODE_REASONS = {
    EXIT_INVALID_INPUT: "InvalidInput",
    EXIT_STORAGE_UNREACHABLE: "StorageUnreachable",
    EXIT_MODEL_ACCESS_DENIED: "ModelAccessDenied",
}
# The only Job and pod conditions `observe` reads; the rest is not kept in memory.
JOB_CONDITIONS = ("Complete", "SuccessCriteriaMet", "Failed", "FailureTarget", "Suspended")
POD_CONDITIONS = ("PodScheduled", "DisruptionTarget")


# ---------------------------------------------------------------------------------------------------------------
# What the operator keeps of the Jobs and pods it watches (small: it must hold thousands in memory). Both carry
# `namespace` and `job` (the KontextLoRAJob's name, from the `kontext-lora.io/job` label) for the stores.


def trim_job(body: dict[str, Any]) -> dict[str, Any]:
    metadata, spec, status = body.get("metadata") or {}, body.get("spec") or {}, body.get("status") or {}
    trimmed = {
        "namespace": metadata.get("namespace"),
        "job": (metadata.get("labels") or {}).get(JOB_LABEL),
        "role": (metadata.get("labels") or {}).get(ROLE_LABEL, TRAIN_ROLE),
        "name": metadata.get("name"),
        "uid": metadata.get("uid"),
        "owners": [ref.get("uid") for ref in metadata.get("ownerReferences") or []],
        "specHash": (metadata.get("annotations") or {}).get(SPEC_HASH_ANNOTATION),
        "nodes": int((metadata.get("annotations") or {}).get(NODES_ANNOTATION) or 1),
        "appliedSuspend": (metadata.get("annotations") or {}).get(SUSPEND_ANNOTATION),
        "deleting": bool(metadata.get("deletionTimestamp")),
        "suspend": bool(spec.get("suspend")),
        "backoffLimit": spec.get("backoffLimit"),
        "activeDeadlineSeconds": spec.get("activeDeadlineSeconds"),
        "status": {
            key: status.get(key)
            for key in ("active", "failed", "succeeded", "startTime", "completionTime")
            if status.get(key) is not None
        },
    }
    conditions = [
        {k: c[k] for k in ("type", "status", "reason", "message", "lastTransitionTime") if c.get(k) is not None}
        for c in status.get("conditions") or ()
        if c.get("type") in JOB_CONDITIONS
    ]
    if conditions:
        trimmed["status"]["conditions"] = conditions
    return trimmed


def trim_pod(body: dict[str, Any]) -> dict[str, Any]:
    metadata, spec, status = body.get("metadata") or {}, body.get("spec") or {}, body.get("status") or {}
    labels = metadata.get("labels") or {}
    containers = [c for c in status.get("containerStatuses") or [] if c.get("name") == CONTAINER]
    return {
        "namespace": metadata.get("namespace"),
        "job": labels.get(JOB_LABEL),
        "name": metadata.get("name"),
        "uid": metadata.get("uid"),
        "jobUid": labels.get(JOB_UID_LABEL),
        "role": labels.get(ROLE_LABEL, TRAIN_ROLE),
        "created": metadata.get("creationTimestamp"),
        "deleting": bool(metadata.get("deletionTimestamp")),
        "nodeName": spec.get("nodeName"),
        "phase": status.get("phase"),
        "startTime": status.get("startTime"),
        "conditions": [
            {k: c.get(k) for k in ("type", "status", "reason", "message") if c.get(k) is not None}
            for c in status.get("conditions") or []
            if c.get("type") in POD_CONDITIONS
        ],
        "state": _container_state(containers[0].get("state") or {}) if containers else {},
    }


def _container_state(state: dict[str, Any]) -> dict[str, Any]:
    """The trainer container's state with only what the status reads (its termination message included)."""
    kept = {
        "waiting": ("reason", "message"),
        "running": ("startedAt",),
        "terminated": ("exitCode", "reason", "message", "finishedAt"),
    }
    return {
        name: {k: value[k] for k in keys if value.get(k) is not None}
        for name, keys in kept.items()
        if isinstance(value := state.get(name), dict)
    }


# ---------------------------------------------------------------------------------------------------------------
# Observation: phase, reason and message from the Job, its pods and the trainer's stage.


@dataclass(frozen=True)
class Observation:
    phase: Phase
    reason: str
    message: str
    restarting: str | None = None
    """Why the trainer is being restarted (a failure message), while it is."""
    restarts: int = 0
    start_time: str | None = None
    completion_time: str | None = None
    job_exists: bool = False
    prepared: bool | None = None
    """The preparation's verdict when this observation saw it end (True: done, False: failed), else None."""
    prepared_message: str = ""


def _condition(conditions: list[dict] | None, kind: str) -> dict | None:
    for condition in conditions or []:
        if condition.get("type") == kind and condition.get("status") == "True":
            return condition
    return None


def _terminated(pod: dict) -> dict:
    return (pod.get("state") or {}).get("terminated") or {}


def describe_failure(pod: dict) -> tuple[int | None, str]:
    """Exit code and a one-line account of how a trainer pod ended, with its termination message."""
    terminated = _terminated(pod)
    code = terminated.get("exitCode")
    text = (terminated.get("message") or "").strip()
    if code is None:
        for condition in pod.get("conditions") or []:
            if condition.get("type") == "DisruptionTarget" and condition.get("status") == "True":
                return None, f"pod {pod['name']} was disrupted ({condition.get('reason')}): {condition.get('message')}"
        return None, f"pod {pod['name']} failed"
    meaning = {
        EXIT_INVALID_INPUT: "invalid input",
        EXIT_STORAGE_UNREACHABLE: "storage unreachable",
        EXIT_MODEL_ACCESS_DENIED: "model access denied",
        137: "killed",
        143: "terminated",
    }.get(code, terminated.get("reason") or "error")
    head = f"the trainer exited with code {code} ({meaning})"
    return code, f"{head}: {text}" if text else head


def _by_creation(pods: list[dict]) -> list[dict]:
    return sorted(pods, key=lambda p: (p.get("created") or "", p.get("name") or ""))


def _last_failed(pods: list[dict]) -> dict | None:
    failed = [p for p in pods if p.get("phase") == "Failed"]
    if not failed:
        return None
    return max(failed, key=lambda p: (_terminated(p).get("finishedAt") or "", p.get("created") or ""))


def _running_phase(status: dict, pod: dict) -> Phase:
    """While the pod runs, the phase mirrors the trainer's stage (stale stages of an earlier pod are ignored)."""
    stage = status.get("stage")
    reported = parse_time(status.get("lastProgressTime"))
    started = parse_time(((pod.get("state") or {}).get("running") or {}).get("startedAt") or pod.get("startTime"))
    if stage and reported and started and reported < started:
        stage = None
    return {
        Stage.Preparing: Phase.Preparing,
        Stage.Downloading: Phase.Downloading,
        Stage.Training: Phase.Training,
        Stage.Uploading: Phase.Uploading,
        Stage.Done: Phase.Uploading,
    }.get(stage, Phase.Downloading)


def observe(
    job: dict | None,
    pods: list[dict],
    status: dict,
    *,
    suspend: bool,
    active_deadline_seconds: int | None = None,
    preparation: dict | None = None,
    preparation_pods: list[dict] = (),  # type: ignore[assignment]
    group_restarts: int = 0,
    group_restart: str | None = None,
) -> Observation:
    """Where the job stands, from its batch Job (None: not created yet or gone), its pods, its preparation Job and
    pods (what the phase follows while there is no batch Job: before the GPU is requested) and the current status.
    `group_restarts`: failed groups of pods the operator replaced so far; `group_restart`: why the failed Job's group
    is being replaced now (the Job's failure is then a restart, not the job's end)."""
    job_status = (job or {}).get("status") or {}
    if group_restart is not None and (
        _condition(job_status.get("conditions"), "Failed") or _condition(job_status.get("conditions"), "FailureTarget")
    ):
        return Observation(
            Phase.Pending,
            "Restarting",
            group_restart,
            group_restart,
            max(int(status.get("restarts") or 0), group_restarts),
            status.get("startTime") or job_status.get("startTime"),
            job_exists=True,
        )
    observation = _observe(
        job,
        pods,
        status,
        suspend=suspend,
        active_deadline_seconds=active_deadline_seconds,
        preparation=preparation,
        preparation_pods=preparation_pods,
    )
    if job is not None and preparation is not None and _prepared(preparation):
        # The GPU Job is made in the same reconcile that sees the preparation complete: say so here too.
        observation = replace(observation, prepared=True, prepared_message=_prepared_message(preparation, status))
    if group_restarts > observation.restarts:
        observation = replace(observation, restarts=group_restarts)
    return observation


def _prepared(job: dict) -> bool:
    conditions = (job.get("status") or {}).get("conditions")
    return bool(_condition(conditions, "Complete") or _condition(conditions, "SuccessCriteriaMet"))


def _prepared_message(job: dict, status: dict) -> str:
    pairs = status.get("datasetPairs")
    found = f"{pairs} pairs validated" if pairs is not None else "inputs checked"
    manifest = (status.get("preparation") or {}).get("manifestUri") or "written"
    return f"{found} by {job['name']}; manifest {manifest}"


def _observe(
    job: dict | None,
    pods: list[dict],
    status: dict,
    *,
    suspend: bool,
    active_deadline_seconds: int | None,
    preparation: dict | None,
    preparation_pods: list[dict],
) -> Observation:
    restarts = int(status.get("restarts") or 0)
    if job is None:
        phase = status.get("phase")
        if phase in (Phase.Succeeded, Phase.Failed):  # finished: the Job may be gone, the verdict stays
            return Observation(
                Phase(phase),
                status.get("reason") or phase,
                status.get("message") or "",
                restarts=restarts,
                start_time=status.get("startTime"),
                completion_time=status.get("completionTime"),
            )
        created = next((c for c in status.get("conditions") or [] if c.get("type") == ConditionType.Created), None)
        if created and created.get("status") == "True" and status.get("jobName"):
            return Observation(
                Phase.Pending,
                "JobMissing",
                f"Job {status['jobName']} is gone; the operator is creating it again "
                "(training resumes from the last checkpoint)",
                restarts=restarts,
                start_time=status.get("startTime"),
            )
        if preparation is not None:
            return _observe_preparation(preparation, list(preparation_pods), status, suspend=suspend)
        return Observation(Phase.Pending, "Creating", "creating the trainer Job", restarts=restarts)

    job_status = job.get("status") or {}
    conditions = job_status.get("conditions")
    failed_pods = int(job_status.get("failed") or 0)
    # The job controller sets the Job's startTime in a status write after it made the pod; the pod's watch event can
    # come first. The first pod's creation is the same moment near enough.
    start_time = (
        status.get("startTime")
        or job_status.get("startTime")
        or min((p["created"] for p in pods if p.get("created")), default=None)
    )
    last_failure = _last_failed(pods)

    if complete := (_condition(conditions, "Complete") or _condition(conditions, "SuccessCriteriaMet")):
        lora = status.get("loraUri")
        return Observation(
            Phase.Succeeded,
            "Completed",
            f"LoRA written to {lora}" if lora else "training finished and the LoRA was uploaded",
            restarts=max(restarts, failed_pods),
            start_time=start_time,
            completion_time=job_status.get("completionTime") or complete.get("lastTransitionTime"),
            job_exists=True,
        )

    if failure := (_condition(conditions, "Failed") or _condition(conditions, "FailureTarget")):
        reason, message = _failure(job, failure, last_failure, failed_pods, active_deadline_seconds)
        return Observation(
            Phase.Failed,
            reason,
            message,
            restarts=max(restarts, failed_pods - 1),
            start_time=start_time,
            completion_time=failure.get("lastTransitionTime"),
            job_exists=True,
        )

    if job.get("suspend") or _condition(conditions, "Suspended"):
        reason, message = _suspension(conditions, suspend)
        return Observation(Phase.Suspended, reason, message, restarts=max(restarts, failed_pods))

    restarts = max(restarts, failed_pods)
    restarting = None
    if failed_pods and last_failure:
        restarting = f"restart {failed_pods} of {job.get('backoffLimit')} after: {describe_failure(last_failure)[1]}"
    current = _current(pods)
    if current and current.get("phase") == "Running":
        return Observation(
            _running_phase(status, current),
            "Running",
            f"trainer pod {current['name']} is running on node {current.get('nodeName')}",
            restarts=restarts,
            start_time=start_time,
            job_exists=True,
        )
    if current:
        reason, message = _waiting(current, "trainer pod", "a GPU node")
        return Observation(Phase.Pending, reason, message, restarting, restarts, start_time, job_exists=True)
    if any(p.get("phase") == "Succeeded" for p in pods):  # the job controller has not marked the Job complete yet
        phase = status.get("phase")
        return Observation(
            Phase(phase) if phase in RUNNING_PHASES else Phase.Uploading,
            "Finishing",
            "the trainer finished; the Job is completing",
            None,
            restarts,
            start_time,
            None,
            True,
        )
    return Observation(
        Phase.Pending,
        "Restarting" if restarting else "WaitingForPod",
        restarting or "waiting for the Job controller to create the trainer pod",
        restarting,
        restarts,
        start_time,
        job_exists=True,
    )


def _observe_preparation(job: dict, pods: list[dict], status: dict, *, suspend: bool) -> Observation:
    """Before the GPU Job: the preparation Job's state. Its failure fails the job; its success lets the operator
    create the GPU Job (`prepared`); while it runs the phase is Preparing, with what the pod reports."""
    restarts = int(status.get("restarts") or 0)
    job_status = job.get("status") or {}
    conditions = job_status.get("conditions")
    failed_pods = int(job_status.get("failed") or 0)
    start_time = status.get("startTime") or job_status.get("startTime")
    last_failure = _last_failed(pods)
    report = status.get("preparation") or {}

    if _prepared(job):
        return Observation(
            Phase.Pending,
            "Creating",
            "preparation done; creating the trainer Job",
            restarts=restarts,
            start_time=start_time,
            prepared=True,
            prepared_message=_prepared_message(job, status),
        )
    if failure := (_condition(conditions, "Failed") or _condition(conditions, "FailureTarget")):
        reason, message = _failure(job, failure, last_failure, failed_pods, job.get("activeDeadlineSeconds"))
        message = f"preparation failed, no GPU was requested: {message}"
        return Observation(
            Phase.Failed,
            reason,
            message,
            restarts=restarts,
            start_time=start_time,
            completion_time=failure.get("lastTransitionTime"),
            prepared=False,
            prepared_message=message,
        )
    if job.get("suspend") or _condition(conditions, "Suspended"):
        reason, message = _suspension(conditions, suspend)
        return Observation(Phase.Suspended, reason, message, restarts=restarts)

    retried = ""
    if failed_pods and last_failure:
        retried = f" (retry {failed_pods} of {job.get('backoffLimit')} after: {describe_failure(last_failure)[1]})"
    current = _current(pods)
    if current and current.get("phase") == "Running":
        reported = parse_time(status.get("lastProgressTime"))
        started = parse_time(((current.get("state") or {}).get("running") or {}).get("startedAt"))
        task = report.get("task") if reported and started and reported >= started else None
        doing = "starting"
        if task:
            doing = task + (f" ({report['done']}/{report['total']})" if report.get("total") else "")
        return Observation(
            Phase.Preparing,
            "Preparing",
            f"preparation pod {current['name']} on node {current.get('nodeName')}: {doing}{retried}",
            restarts=restarts,
            start_time=start_time,
        )
    if current:
        reason, message = _waiting(current, "preparation pod", "a node for the preparation pod")
        return Observation(Phase.Pending, reason, message + retried, restarts=restarts, start_time=start_time)
    return Observation(
        Phase.Pending,
        "WaitingForPod",
        f"waiting for the Job controller to create the preparation pod{retried}",
        restarts=restarts,
        start_time=start_time,
    )


def _current(pods: list[dict]) -> dict | None:
    live = [p for p in _by_creation(pods) if p.get("phase") not in ("Succeeded", "Failed") and not p.get("deleting")]
    return live[-1] if live else None


def _failure(
    job: dict, failure: dict, last_failure: dict | None, failed_pods: int, active_deadline_seconds: int | None
) -> tuple[str, str]:
    """(reason, message) of a failed batch Job."""
    reason = failure.get("reason") or "Failed"
    code, account = describe_failure(last_failure) if last_failure else (None, "")
    if reason == "DeadlineExceeded":
        limit = job.get("activeDeadlineSeconds") or active_deadline_seconds
        message = f"the job ran longer than runPolicy.activeDeadlineSeconds ({limit}s) and was stopped"
    elif reason == "PodFailurePolicy":
        reason = EXIT_CODE_REASONS.get(code, reason)
        message = f"{account}; not retried (a retry cannot fix this)" if account else failure.get("message", "")
    elif reason == "BackoffLimitExceeded":
        message = f"failed {failed_pods} times (runPolicy.backoffLimit is {job.get('backoffLimit')})"
        message += f"; last failure: {account}" if account else ""
    else:
        message = account or failure.get("message") or reason
    return reason, message


def _suspension(conditions: list[dict] | None, suspend: bool) -> tuple[str, str]:
    if suspend:
        return "Suspended", "suspended (spec.suspend is true): clear it to resume from the last checkpoint"
    return "SuspendedByQueue", (
        "the batch Job was suspended by another controller (e.g. Kueue waiting for quota or preempting): "
        + ((_condition(conditions, "Suspended") or {}).get("message") or "waiting to be resumed")
    )


def _waiting(current: dict, what: str, node: str) -> tuple[str, str]:
    """(reason, message) of a pod that is not running yet."""
    scheduled = next((c for c in current.get("conditions") or [] if c.get("type") == "PodScheduled"), None)
    waiting = (current.get("state") or {}).get("waiting") or {}
    if scheduled and scheduled.get("status") == "False":
        reason = scheduled.get("reason") or "Unschedulable"
        return reason, f"waiting for {node}: {scheduled.get('message') or reason}"
    if waiting.get("reason"):
        return waiting["reason"], f"{what} {current['name']} is waiting: {waiting.get('message') or waiting['reason']}"
    if current.get("nodeName"):
        return "Starting", f"{what} {current['name']} is starting on node {current['nodeName']}"
    return "Scheduling", f"{what} {current['name']} is waiting to be scheduled"


def invalid_spec(errors: list[str], status: dict) -> Observation:
    return Observation(
        Phase.Failed,
        "InvalidSpec",
        "invalid KontextLoRAJob: " + "; ".join(errors),
        restarts=int(status.get("restarts") or 0),
        completion_time=status.get("completionTime"),
    )


# ---------------------------------------------------------------------------------------------------------------
# The operator's status keys, conditions included, and what changed.


def now_iso() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class Conditions:
    items: list[dict] = field(default_factory=list)
    now: str = ""

    def set(self, kind: ConditionType, value: bool, reason: str, message: str) -> None:
        status = "True" if value else "False"
        message = _truncate(message, MAX_CONDITION_MESSAGE)
        for condition in self.items:
            if condition.get("type") == kind:
                if condition.get("status") != status:
                    condition["lastTransitionTime"] = self.now
                condition.update(status=status, reason=reason, message=message)
                return
        self.items.append(
            {"type": str(kind), "status": status, "reason": reason, "message": message, "lastTransitionTime": self.now}
        )

    def clear(self, kind: ConditionType, reason: str, message: str) -> None:
        """Set to False only if present: conditions that never applied are not listed."""
        if any(c.get("type") == kind for c in self.items):
            self.set(kind, False, reason, message)


def desired_status(
    current: dict,
    observation: Observation,
    *,
    job_name: str,
    generation: int | None,
    world_size: int | None = None,
    now: str | None = None,
) -> dict:
    """The operator's keys of the status for an observation, keeping condition transition times that hold."""
    now = now or now_iso()
    obs = observation
    conditions = Conditions([dict(c) for c in current.get("conditions") or []], now)
    if obs.prepared is not None:
        conditions.set(
            ConditionType.Prepared, obs.prepared, "Prepared" if obs.prepared else obs.reason, obs.prepared_message
        )
    if obs.job_exists:
        conditions.set(ConditionType.Created, True, "JobCreated", f"batch Job {job_name} runs the trainer")
    elif obs.reason == "JobMissing":
        conditions.set(ConditionType.Created, False, "JobMissing", obs.message)
    running = obs.phase in RUNNING_PHASES
    conditions.set(ConditionType.Running, running, "Running" if running else obs.reason, obs.message)
    if obs.restarting and not running:
        conditions.set(ConditionType.Restarting, True, "Restarting", obs.restarting)
    else:
        conditions.clear(ConditionType.Restarting, "Running" if running else obs.reason, obs.message)
    if obs.phase == Phase.Suspended:
        conditions.set(ConditionType.Suspended, True, obs.reason, obs.message)
    else:
        conditions.clear(ConditionType.Suspended, "Resumed", "resumed")
    if obs.phase == Phase.Succeeded:
        conditions.set(ConditionType.Succeeded, True, obs.reason, obs.message)
    if obs.phase == Phase.Failed:
        conditions.set(ConditionType.Failed, True, obs.reason, obs.message)
    desired: dict[str, Any] = {
        "phase": str(obs.phase),
        "reason": obs.reason,
        "message": _truncate(obs.message, MAX_MESSAGE),
        "conditions": conditions.items,
        "restarts": obs.restarts,
        "jobName": job_name,
        "observedGeneration": generation,
    }
    if world_size is not None:
        desired["worldSize"] = world_size
    if obs.start_time:
        desired["startTime"] = obs.start_time
    if obs.completion_time and obs.phase.finished:
        desired["completionTime"] = obs.completion_time
    return desired


def status_patch(current: dict, desired: dict) -> dict:
    """The merge patch that brings the operator's keys of `current` to `desired` (empty when nothing changed)."""
    return {key: value for key, value in desired.items() if current.get(key) != value}


@dataclass(frozen=True)
class Transition:
    type: str
    reason: str
    message: str


# Pending sub-states every job passes through: shown in status, but not worth an Event each. "Restarting" has its
# own Warning when the Job counts the failure (below): as a reason it would repeat it, or name a stale count in the
# moment between a pod's failure and the Job controller counting it (and for a disruption that is never counted).
QUIET_REASONS = (
    "Creating",
    "WaitingForPod",
    "Scheduling",
    "Starting",
    "Running",
    "Finishing",
    "Recreating",
    "Restarting",
)
NOTABLE_WARNINGS = ("Unschedulable", "JobMissing", "NameTaken", "CreateFailed", "ReconcileError", "SuspendedByQueue")
# A trainer container that cannot start (a Secret or key missing, an image that cannot be pulled) waits forever,
# holding its GPU: as much a warning as a failure, though the kubelet keeps retrying.
CONTAINER_START_FAILURES = (
    "CreateContainerConfigError",
    "CreateContainerError",
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "RunContainerError",
)


def transitions(current: dict, desired: dict) -> list[Transition]:
    """Kubernetes Events for what changed: every phase change, a notable new reason within a phase, each restart."""
    events: list[Transition] = []
    old_phase, new_phase = current.get("phase"), desired.get("phase")
    reason, message = str(desired.get("reason") or new_phase), desired.get("message") or ""
    phase_changed = old_phase != new_phase
    if phase_changed or (current.get("reason") != reason and reason not in QUIET_REASONS):
        warning = new_phase == Phase.Failed or reason in NOTABLE_WARNINGS or reason in CONTAINER_START_FAILURES
        specific = new_phase in (Phase.Failed, Phase.Pending, Phase.Suspended) and reason not in QUIET_REASONS
        event_reason = reason if specific else str(new_phase)
        headline = f"{old_phase or 'New'} -> {new_phase}" if phase_changed else str(new_phase)
        events.append(Transition("Warning" if warning else "Normal", event_reason, f"{headline}: {message}"))
    if _condition(desired.get("conditions"), ConditionType.Prepared) and not _condition(
        current.get("conditions"), ConditionType.Prepared
    ):
        noticed = [w for w in (current.get("preparation") or {}).get("warnings") or [] if w]
        if noticed:  # e.g. stray files ignored: worth a look, not a failure
            events.append(Transition("Warning", "PreparationWarnings", "; ".join(noticed)))
    old_restarts, new_restarts = int(current.get("restarts") or 0), int(desired.get("restarts") or 0)
    if new_restarts > old_restarts and new_phase != Phase.Failed:
        restarting = next((c for c in desired.get("conditions", []) if c.get("type") == ConditionType.Restarting), {})
        events.append(
            Transition("Warning", "Restarting", restarting.get("message") or f"trainer restarted ({new_restarts})")
        )
    return events
