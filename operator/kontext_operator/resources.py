"""What a KontextLoRAJob becomes in the cluster: pure functions from (job, operator config) to manifests.

Nothing here talks to the API server, so every manifest is unit-tested as data. Names are deterministic (an
operator restart at any point finds the objects it already created instead of making second ones), and every
object carries an owner reference to its KontextLoRAJob, so the garbage collector removes them with it.

Two batch Jobs per KontextLoRAJob, one after the other, told apart by the `kontext-lora.io/role` label: the
CPU-only preparation Job (`<job>-prepare`: storage, model access, the pairs validated, the model cache filled; no
GPU requested, on the nodes the operator config names) and, once it completed, the GPU Job (`<job>-trainer`),
whose pod starts from the preparation's manifest. Both run the trainer image under the job's ServiceAccount.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from kontext_lora.api import API_VERSION, KIND, KontextLoRAJob, SecretKeySelector, StorageSpec
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
# Which of a job's two batch Jobs (and pods) an object is. Objects made before the preparation Job existed carry
# no role label: they are the training Job.
ROLE_LABEL = "kontext-lora.io/role"
PREPARE_ROLE, TRAIN_ROLE = "prepare", "train"
PREPARATION_APP = "kontext-lora-preparation"

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
# A world above one GPU: torchrun starts one trainer process per GPU of the pod (`--no-python`: the console script
# itself); its rendezvous settings come from the PET_* variables below, as Kubeflow Trainer's torch plugin sets them.
TORCHRUN_COMMAND = ["torchrun", "--no-python", *TRAINER_COMMAND]
# Kubeflow Trainer's `ContainerTrainerPort` (pkg/constants/constants.go), torchrun's default master port too.
RENDEZVOUS_PORT = 29500
# The index of an Indexed Job's pod, as Kubeflow Trainer's torch plugin reads it for PET_NODE_RANK.
COMPLETION_INDEX_FIELD = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
# The GPU Job's node count (a group of pods that fails and restarts as one when above 1).
NODES_ANNOTATION = "kontext-lora.io/nodes"
# On the KontextLoRAJob: times the operator replaced a failed group of pods (counted in runPolicy.backoffLimit).
GROUP_RESTARTS_ANNOTATION = "kontext-lora.io/group-restarts"
PREPARE_COMMAND = ["kontext-lora", "prepare", "--from-env"]
# A preparation pod stops at once on SIGTERM (nothing to save): Kubernetes' default grace period is plenty.
PREPARATION_GRACE_SECONDS = 30
WORK_DIR = "/work"
CACHE_DIR = "/cache"
HF_HOME = f"{CACHE_DIR}/huggingface"
TERMINATION_MESSAGE_PATH = "/dev/termination-log"
# The trainer image runs as this uid/gid (Dockerfile.trainer); fsGroup makes the volumes writable for it.
TRAINER_UID = 10001
# Exit codes the trainer uses for failures that a retry cannot fix (docs/architecture.md, "Exit codes").
EXIT_INVALID_INPUT = 2
EXIT_STORAGE_UNREACHABLE = 3
EXIT_MODEL_ACCESS_DENIED = 4
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


def child_labels(job: KontextLoRAJob, role: str | None = None) -> dict[str, str]:
    """Labels of the job's objects; with a `role`, of one of its batch Jobs and its pods."""
    preparing = role == PREPARE_ROLE
    labels = {
        NAME_LABEL: PREPARATION_APP if preparing else TRAINER_APP,
        "app.kubernetes.io/instance": job.metadata.name,
        "app.kubernetes.io/component": "preparation" if preparing else "trainer",
        MANAGED_BY_LABEL: MANAGED_BY,
        JOB_LABEL: job.metadata.name,
    }
    if role is not None:
        labels[ROLE_LABEL] = role
    return labels


def rendezvous_service_name(job_name: str) -> str:
    """The headless Service of a multi-node job: the GPU Job's name (a DNS-1035 label: a leading digit is prefixed)."""
    name = child_name(job_name)
    return name if name[0].isalpha() else child_name(f"klj-{job_name}")


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


def hub_token_secret(job: KontextLoRAJob, config: OperatorConfig) -> SecretKeySelector | None:
    """The Secret with the hub token the pods get: the job's `spec.model.tokenSecret`, else the operator's default;
    none for a model that does not come from the hub."""
    if not is_hub_model(job.spec.model.base):
        return None
    return job.spec.model.token_secret or config.hub.token_secret


def is_hub_model(base: str) -> bool:
    return not base.startswith(("s3://", "file://", "/"))


def _common_env(job: KontextLoRAJob, config: OperatorConfig) -> list[dict[str, Any]]:
    """What both pods of a job get: the job, folders, status reporting, storage and hub access."""
    storage = effective_storage(job, config)
    env: list[dict[str, Any]] = [
        {"name": "KONTEXT_LORA_JOB", "value": json.dumps(job_document(job, config), separators=(",", ":"))},
        {"name": "KONTEXT_LORA_WORK_DIR", "value": WORK_DIR},
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
    if is_hub_model(job.spec.model.base) and config.hub.endpoint:
        env.append({"name": "HF_ENDPOINT", "value": config.hub.endpoint})
    if token := hub_token_secret(job, config):
        # By reference only: the operator never reads the token, and it is in no object but the Secret.
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": token.name, "key": token.key}}})
    return env


def trainer_env(job: KontextLoRAJob, config: OperatorConfig) -> list[dict[str, Any]]:
    env = _common_env(job, config)
    env.insert(2, {"name": "KONTEXT_LORA_METRICS_PORT", "value": str(config.trainer.metrics_port)})
    if config.preparation.enabled:
        # The preparation Job ran first: start from its manifest (<output.uri>preparation.json).
        env.append({"name": "KONTEXT_LORA_PREPARED", "value": "true"})
    return env + rendezvous_env(job, config)


def rendezvous_env(job: KontextLoRAJob, config: OperatorConfig) -> list[dict[str, Any]]:
    """torchrun's settings (it reads `PET_<OPTION>` for each `--<option>`), named and filled as Kubeflow Trainer's
    torch plugin does (pkg/runtime/framework/plugins/torch/torch.go): nodes, processes per node, this pod's node rank
    from its completion index, and node rank 0's stable hostname behind the headless Service. One node: the
    rendezvous is inside the pod. Empty for a world of one (no torchrun)."""
    resources = job.spec.resources
    if resources.world_size == 1:
        return []
    multi_node = resources.nodes > 1
    master = (
        f"{child_name(job.metadata.name)}-0.{rendezvous_service_name(job.metadata.name)}" if multi_node else "127.0.0.1"
    )
    rank: dict[str, Any] = (
        {"valueFrom": {"fieldRef": {"fieldPath": COMPLETION_INDEX_FIELD}}} if multi_node else {"value": "0"}
    )
    return [
        {"name": "PET_NNODES", "value": str(resources.nodes)},
        {"name": "PET_NPROC_PER_NODE", "value": str(resources.count)},
        {"name": "PET_NODE_RANK", **rank},
        {"name": "PET_MASTER_ADDR", "value": master},
        {"name": "PET_MASTER_PORT", "value": str(RENDEZVOUS_PORT)},
        # torchrun forwards the pod's SIGTERM to its ranks; they need the grace period to save the checkpoint.
        {"name": "PET_SHUTDOWN_TIMEOUT", "value": str(max(config.trainer.termination_grace_period_seconds - 5, 5))},
    ]


def preparation_env(job: KontextLoRAJob, config: OperatorConfig) -> list[dict[str, Any]]:
    env = _common_env(job, config)
    if job.spec.resources.model_cache_claim:
        env.append({"name": "KONTEXT_LORA_FILL_MODEL_CACHE", "value": "true"})
    return env


def template_hash(job: KontextLoRAJob) -> str:
    """Hash of what the Job's (immutable) pod template is built from: the spec without the fields the operator
    changes on a live Job in place (`suspend`, `runPolicy`)."""
    essence = job.spec.model_dump(mode="json", by_alias=True, exclude={"suspend", "run_policy"})
    return hashlib.sha256(json.dumps(essence, sort_keys=True).encode()).hexdigest()[:16]


def suspend_value(suspend: bool) -> str:
    return "true" if suspend else "false"


def group_failure_policy() -> dict[str, Any]:
    """A multi-node GPU Job fails as a whole at its first failed pod (the Job controller then stops the others), so
    no pod ever rejoins a half-dead rendezvous; the operator replaces the whole group, like JobSet's failurePolicy,
    counting each replacement in runPolicy.backoffLimit (reconciler.py)."""
    return {
        "rules": [
            {"action": "FailJob", "onExitCodes": {"containerName": CONTAINER, "operator": "NotIn", "values": [0]}},
            {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        ]
    }


def pod_failure_policy() -> dict[str, Any]:
    return {
        "rules": [
            # Bad input, unreachable storage, a model the hub refuses: a retry would fail the same way, so fail the
            # Job at once.
            {
                "action": "FailJob",
                "onExitCodes": {
                    "containerName": CONTAINER,
                    "operator": "In",
                    "values": [EXIT_INVALID_INPUT, EXIT_STORAGE_UNREACHABLE, EXIT_MODEL_ACCESS_DENIED],
                },
            },
            # Preemption, eviction, node drain: retry without spending the backoff budget.
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        ]
    }


def _container(
    name: str, image_config, command: list[str], env: list[dict[str, Any]], resources: dict[str, Any]
) -> dict[str, Any]:
    return {
        "name": name,
        "image": image_config.image,
        "imagePullPolicy": image_config.image_pull_policy,
        "command": list(command),
        "env": env,
        "resources": resources,
        "volumeMounts": [
            {"name": "work", "mountPath": WORK_DIR},
            {"name": "cache", "mountPath": CACHE_DIR},
            {"name": "tmp", "mountPath": "/tmp"},
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


def _pod_spec(job: KontextLoRAJob, config: OperatorConfig, container: dict[str, Any], work_limit: str) -> dict:
    """What both pods share: the job's identity, non-root and locked down, the work, cache and tmp volumes."""
    cache_volume: dict[str, Any] = (
        {"name": "cache", "persistentVolumeClaim": {"claimName": job.spec.resources.model_cache_claim}}
        if job.spec.resources.model_cache_claim
        else {"name": "cache", "emptyDir": {}}
    )
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "serviceAccountName": child_name(job.metadata.name),
        "automountServiceAccountToken": True,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": TRAINER_UID,
            "runAsGroup": TRAINER_UID,
            "fsGroup": TRAINER_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            {"name": "work", "emptyDir": {"sizeLimit": work_limit}},
            cache_volume,
            {"name": "tmp", "emptyDir": {}},
        ],
    }
    if config.trainer.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": secret} for secret in config.trainer.image_pull_secrets]
    return pod_spec


def _job(
    job: KontextLoRAJob,
    name: str,
    labels: dict[str, str],
    pod_labels: dict[str, str],
    pod_annotations: dict[str, str],
    pod_spec: dict[str, Any],
    backoff_limit: int,
    active_deadline_seconds: int | None,
) -> dict[str, Any]:
    job_spec: dict[str, Any] = {
        "backoffLimit": backoff_limit,
        "completions": 1,
        "parallelism": 1,
        "suspend": job.spec.suspend,
        "podFailurePolicy": pod_failure_policy(),
        # Never two pods at once on the same outputs: a replacement starts once the old pod is gone.
        "podReplacementPolicy": "Failed",
        "template": {"metadata": {"labels": pod_labels, "annotations": pod_annotations}, "spec": pod_spec},
    }
    if active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = active_deadline_seconds
    metadata = _metadata(job, name, labels)
    metadata["annotations"] = {
        SPEC_HASH_ANNOTATION: template_hash(job),
        SUSPEND_ANNOTATION: suspend_value(job.spec.suspend),
    }
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": job_spec}


def batch_job(job: KontextLoRAJob, config: OperatorConfig) -> dict[str, Any]:
    """The batch/v1 Job that runs the trainer on a GPU node of the job's class."""
    spec = job.spec
    placement = config.gpu_classes[spec.resources.gpu]
    labels = child_labels(job, TRAIN_ROLE)
    job_labels = {**labels, **{k: v for k, v in job.metadata.labels.items() if k in KUEUE_LABELS}}
    gpus = str(spec.resources.count)
    container = _container(
        CONTAINER,
        config.trainer,
        TRAINER_COMMAND,
        trainer_env(job, config),
        {
            "requests": {"cpu": spec.resources.cpu, "memory": spec.resources.memory, placement.resource_name: gpus},
            "limits": {"memory": spec.resources.memory, placement.resource_name: gpus},
        },
    )
    container["ports"] = [{"name": "metrics", "containerPort": config.trainer.metrics_port, "protocol": "TCP"}]
    if spec.resources.world_size > 1:
        container["command"] = list(TORCHRUN_COMMAND)
        container["ports"].append({"name": "rendezvous", "containerPort": RENDEZVOUS_PORT, "protocol": "TCP"})
    container["volumeMounts"].append({"name": "dshm", "mountPath": "/dev/shm"})
    pod_spec = _pod_spec(job, config, container, config.trainer.work_dir_size_limit)
    pod_spec["volumes"].append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}})
    pod_spec["affinity"] = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [m.to_wire() for m in placement.match_expressions]}]
            }
        }
    }
    pod_spec["tolerations"] = [t.to_wire() for t in placement.tolerations]
    # On SIGTERM the trainer finishes its step and saves a checkpoint; this is the time it gets to upload it.
    pod_spec["terminationGracePeriodSeconds"] = config.trainer.termination_grace_period_seconds
    if config.trainer.priority_class_name:
        pod_spec["priorityClassName"] = config.trainer.priority_class_name
    nodes = spec.resources.nodes
    if nodes > 1:
        # Stable hostnames <job>-<index>.<service> for the rendezvous (PET_MASTER_ADDR names index 0's).
        pod_spec["subdomain"] = rendezvous_service_name(job.metadata.name)
    manifest = _job(
        job,
        child_name(job.metadata.name),
        job_labels,
        {**config.trainer.labels, **labels},
        dict(config.trainer.annotations),
        pod_spec,
        0 if nodes > 1 else spec.run_policy.backoff_limit,
        spec.run_policy.active_deadline_seconds,
    )
    if nodes > 1:
        manifest["spec"].update(
            completionMode="Indexed", completions=nodes, parallelism=nodes, podFailurePolicy=group_failure_policy()
        )
        manifest["metadata"]["annotations"][NODES_ANNOTATION] = str(nodes)
    return manifest


def rendezvous_service(job: KontextLoRAJob) -> dict[str, Any]:
    """The headless Service that gives a multi-node job's pods their stable DNS names (`<job>-<index>.<service>`);
    published before the pods are ready, since the rendezvous happens before any readiness could be reported."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(job, rendezvous_service_name(job.metadata.name)),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {JOB_LABEL: job.metadata.name, ROLE_LABEL: TRAIN_ROLE},
            "ports": [
                {"name": "rendezvous", "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT, "protocol": "TCP"}
            ],
        },
    }


def preparation_job(job: KontextLoRAJob, config: OperatorConfig) -> dict[str, Any]:
    """The CPU-only batch/v1 Job that prepares the job's inputs before any GPU is requested (no GPU resource, no
    GPU toleration; the operator config's node selector, tolerations and affinity). Not in the job's Kueue queue:
    the queue admits the GPU Job, which is only made once the preparation succeeded."""
    prep = config.preparation
    labels = child_labels(job, PREPARE_ROLE)
    container = _container(
        CONTAINER,
        config.trainer,
        PREPARE_COMMAND,
        preparation_env(job, config),
        {"requests": {"cpu": prep.cpu, "memory": prep.memory}, "limits": {"memory": prep.memory}},
    )
    pod_spec = _pod_spec(job, config, container, prep.work_dir_size_limit)
    if prep.node_selector:
        pod_spec["nodeSelector"] = dict(prep.node_selector)
    if prep.tolerations:
        pod_spec["tolerations"] = [t.to_wire() for t in prep.tolerations]
    if prep.affinity:
        pod_spec["affinity"] = prep.affinity
    pod_spec["terminationGracePeriodSeconds"] = PREPARATION_GRACE_SECONDS
    deadline = prep.active_deadline_seconds
    if job.spec.run_policy.active_deadline_seconds is not None:
        deadline = min(deadline, job.spec.run_policy.active_deadline_seconds)
    return _job(
        job,
        child_name(job.metadata.name, "prepare"),
        labels,
        {**prep.labels, **labels},
        dict(prep.annotations),
        pod_spec,
        prep.backoff_limit,
        deadline,
    )
