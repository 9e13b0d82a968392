"""What a KontextLoRAJob becomes in the cluster: pure functions from (job, operator config) to manifests.

Nothing here talks to the API server, so every manifest is unit-tested as data. Names are deterministic (an
operator restart at any point finds the objects it already created instead of making second ones), and every
object carries an owner reference to its KontextLoRAJob, so the garbage collector removes them with it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from kontext_lora.api import API_VERSION, KIND, KontextLoRAJob, StorageSpec
from kontext_lora.api.operator_config import OperatorConfig

from .rbac import trainer_rules

# Labels (see docs/architecture.md, "Scrape contract"): the chart's PodMonitor and the operator's watches use them.
JOB_LABEL = "kontext-lora.io/job"
NAME_LABEL = "app.kubernetes.io/name"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
TRAINER_APP = "kontext-lora-trainer"
MANAGED_BY = "kontext-lora-operator"
# Server-side label selector of the operator's Job and Pod watches: only what it created.
CHILD_SELECTOR = f"{MANAGED_BY_LABEL}={MANAGED_BY},{JOB_LABEL}"

# The part of the spec a created Job embodies (its pod template is immutable); see `template_hash`.
SPEC_HASH_ANNOTATION = "kontext-lora.io/spec-hash"
# The KontextLoRAJob's `spec.suspend` last applied to the Job ("true"/"false"). The operator changes the Job's
# `suspend` only when the job's field differs from this, i.e. when the user changed it, never because Kueue (or
# another controller) suspended or resumed the Job; and a restarted operator still sees a change it missed.
SUSPEND_ANNOTATION = "kontext-lora.io/applied-suspend"
# Kueue: a KontextLoRAJob in a queue hands these labels to its batch Job, so Kueue's built-in batch/v1 Job
# integration admits, suspends and preempts the object that actually holds the GPU (docs/operator.md).
KUEUE_LABELS = ("kueue.x-k8s.io/queue-name", "kueue.x-k8s.io/priority-class")

CONTAINER = "trainer"
TRAINER_COMMAND = ["kontext-lora", "train", "--from-env"]
WORK_DIR = "/work"
CACHE_DIR = "/cache"
HF_HOME = f"{CACHE_DIR}/huggingface"
TERMINATION_MESSAGE_PATH = "/dev/termination-log"
# The trainer image runs as this uid/gid (Dockerfile.trainer); fsGroup makes the volumes writable for it.
TRAINER_UID = 10001
# Exit codes the trainer uses for failures that a retry cannot fix (docs/architecture.md, "Exit codes").
EXIT_INVALID_INPUT = 2
EXIT_STORAGE_UNREACHABLE = 3
MAX_NAME = 63


def child_name(job_name: str, suffix: str = "trainer") -> str:
    """`<job>-<suffix>`, shortened with a hash to fit 63 characters (a Job's name is also a label value)."""
    name = f"{job_name}-{suffix}"
    if len(name) <= MAX_NAME:
        return name
    digest = hashlib.sha256(job_name.encode()).hexdigest()[:8]
    head = job_name[: MAX_NAME - len(suffix) - len(digest) - 2].rstrip("-.")
    return f"{head}-{digest}-{suffix}"


def owner_reference(job: KontextLoRAJob) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": job.metadata.name,
        "uid": job.metadata.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def child_labels(job: KontextLoRAJob) -> dict[str, str]:
    return {
        NAME_LABEL: TRAINER_APP,
        "app.kubernetes.io/instance": job.metadata.name,
        "app.kubernetes.io/component": "trainer",
        MANAGED_BY_LABEL: MANAGED_BY,
        JOB_LABEL: job.metadata.name,
    }


def _metadata(job: KontextLoRAJob, name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": job.metadata.namespace,
        "labels": labels or child_labels(job),
        "ownerReferences": [owner_reference(job)],
    }


def service_account(job: KontextLoRAJob) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _metadata(job, child_name(job.metadata.name)),
        "automountServiceAccountToken": True,
    }


def role(job: KontextLoRAJob) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _metadata(job, child_name(job.metadata.name)),
        "rules": [dict(rule) for rule in trainer_rules(job.metadata.name)],
    }


def role_binding(job: KontextLoRAJob) -> dict[str, Any]:
    name = child_name(job.metadata.name)
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _metadata(job, name),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": job.metadata.namespace}],
    }


def effective_storage(job: KontextLoRAJob, config: OperatorConfig) -> StorageSpec:
    """The job's storage with the cluster defaults of the operator config filled in.

    The endpoint default applies when the job names none; the region default when the job kept the model's
    default region (after the apiserver's defaulting, "left unset" and "set to the default" look the same).
    """
    storage = job.spec.storage
    updates: dict[str, Any] = {}
    if storage.endpoint is None and config.default_storage.endpoint:
        updates["endpoint"] = config.default_storage.endpoint
    if storage.region == StorageSpec.model_fields["region"].default:
        updates["region"] = config.default_storage.region
    return storage.model_copy(update=updates)


def job_document(job: KontextLoRAJob, config: OperatorConfig) -> dict[str, Any]:
    """`$KONTEXT_LORA_JOB`: the job as the trainer reads it (docs/architecture.md, "Operator → trainer pod")."""
    spec = job.spec.model_copy(update={"storage": effective_storage(job, config)})
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": job.metadata.name,
            "namespace": job.metadata.namespace,
            "uid": job.metadata.uid,
            "generation": job.metadata.generation,
        },
        "spec": spec.to_wire(),
    }


def trainer_env(job: KontextLoRAJob, config: OperatorConfig) -> list[dict[str, Any]]:
    storage = effective_storage(job, config)
    env: list[dict[str, Any]] = [
        {"name": "KONTEXT_LORA_JOB", "value": json.dumps(job_document(job, config), separators=(",", ":"))},
        {"name": "KONTEXT_LORA_WORK_DIR", "value": WORK_DIR},
        {"name": "KONTEXT_LORA_METRICS_PORT", "value": str(config.trainer.metrics_port)},
        {"name": "KONTEXT_LORA_REPORT_STATUS", "value": "true"},
        {"name": "KONTEXT_LORA_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "HF_HOME", "value": HF_HOME},
        # Read-only root filesystem: anything that writes under $HOME (caches of libraries) goes to /tmp.
        {"name": "HOME", "value": "/tmp"},
        {"name": "AWS_REGION", "value": storage.region},
        {"name": "AWS_DEFAULT_REGION", "value": storage.region},
    ]
    if storage.endpoint:
        env.append({"name": "AWS_ENDPOINT_URL_S3", "value": storage.endpoint})
    if storage.credentials_secret:
        for name, key in (
            ("AWS_ACCESS_KEY_ID", storage.access_key_id_key),
            ("AWS_SECRET_ACCESS_KEY", storage.secret_access_key_key),
        ):
            env.append({"name": name, "valueFrom": {"secretKeyRef": {"name": storage.credentials_secret, "key": key}}})
    return env


def template_hash(job: KontextLoRAJob) -> str:
    """Hash of what the Job's (immutable) pod template is built from: the spec without the fields the operator
    changes on a live Job in place (`suspend`, `runPolicy`)."""
    essence = job.spec.model_dump(mode="json", by_alias=True, exclude={"suspend", "run_policy"})
    return hashlib.sha256(json.dumps(essence, sort_keys=True).encode()).hexdigest()[:16]


def suspend_value(suspend: bool) -> str:
    return "true" if suspend else "false"


def pod_failure_policy() -> dict[str, Any]:
    return {
        "rules": [
            # Bad input or unreachable storage: a retry would fail the same way, so fail the Job at once.
            {
                "action": "FailJob",
                "onExitCodes": {
                    "containerName": CONTAINER,
                    "operator": "In",
                    "values": [EXIT_INVALID_INPUT, EXIT_STORAGE_UNREACHABLE],
                },
            },
            # Preemption, eviction, node drain: retry without spending the backoff budget.
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        ]
    }


def batch_job(job: KontextLoRAJob, config: OperatorConfig) -> dict[str, Any]:
    """The batch/v1 Job that runs the trainer on a GPU node of the job's class."""
    spec = job.spec
    placement = config.gpu_classes[spec.resources.gpu]
    name = child_name(job.metadata.name)
    labels = child_labels(job)
    job_labels = {**labels, **{k: v for k, v in job.metadata.labels.items() if k in KUEUE_LABELS}}
    gpus = str(spec.resources.count)
    cache_volume: dict[str, Any] = (
        {"name": "cache", "persistentVolumeClaim": {"claimName": spec.resources.model_cache_claim}}
        if spec.resources.model_cache_claim
        else {"name": "cache", "emptyDir": {}}
    )
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": config.trainer.image,
        "imagePullPolicy": config.trainer.image_pull_policy,
        "command": list(TRAINER_COMMAND),
        "env": trainer_env(job, config),
        "ports": [{"name": "metrics", "containerPort": config.trainer.metrics_port, "protocol": "TCP"}],
        "resources": {
            "requests": {"cpu": spec.resources.cpu, "memory": spec.resources.memory, placement.resource_name: gpus},
            "limits": {"memory": spec.resources.memory, placement.resource_name: gpus},
        },
        "volumeMounts": [
            {"name": "work", "mountPath": WORK_DIR},
            {"name": "cache", "mountPath": CACHE_DIR},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
        "terminationMessagePath": TERMINATION_MESSAGE_PATH,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "serviceAccountName": name,
        "automountServiceAccountToken": True,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": TRAINER_UID,
            "runAsGroup": TRAINER_UID,
            "fsGroup": TRAINER_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [{"matchExpressions": [m.to_wire() for m in placement.match_expressions]}]
                }
            }
        },
        "tolerations": [t.to_wire() for t in placement.tolerations],
        # On SIGTERM the trainer finishes its step and saves a checkpoint; this is the time it gets to upload it.
        "terminationGracePeriodSeconds": config.trainer.termination_grace_period_seconds,
        "containers": [container],
        "volumes": [
            {"name": "work", "emptyDir": {"sizeLimit": config.trainer.work_dir_size_limit}},
            cache_volume,
            {"name": "tmp", "emptyDir": {}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}},
        ],
    }
    if config.trainer.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": secret} for secret in config.trainer.image_pull_secrets]
    if config.trainer.priority_class_name:
        pod_spec["priorityClassName"] = config.trainer.priority_class_name
    run_policy = spec.run_policy
    job_spec: dict[str, Any] = {
        "backoffLimit": run_policy.backoff_limit,
        "completions": 1,
        "parallelism": 1,
        "suspend": spec.suspend,
        "podFailurePolicy": pod_failure_policy(),
        # Never two trainers at once on the same checkpoints: a replacement starts once the old pod is gone.
        "podReplacementPolicy": "Failed",
        "template": {
            "metadata": {
                "labels": {**config.trainer.labels, **labels},
                "annotations": dict(config.trainer.annotations),
            },
            "spec": pod_spec,
        },
    }
    if run_policy.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = run_policy.active_deadline_seconds
    metadata = _metadata(job, name, job_labels)
    metadata["annotations"] = {
        SPEC_HASH_ANNOTATION: template_hash(job),
        SUSPEND_ANNOTATION: suspend_value(spec.suspend),
    }
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": job_spec}
