"""The operator's permissions, as data: the single source of truth for the Helm chart's ClusterRole and the tests.

No wildcards, no Secrets: trainer pods read the storage credentials themselves through `secretKeyRef`, so the
operator never needs to see them. The per-job Role the operator creates for each trainer pod grants `get` on
its own KontextLoRAJob and `get`/`patch` on its status, each limited by `resourceNames`; Kubernetes' RBAC
escalation prevention only lets the operator create that Role because it holds those verbs itself (below).

Every rule says why it is there, so a reviewer can check it without reading the handlers.
"""

from __future__ import annotations

from typing import TypedDict

from kontext_lora.api import GROUP, PLURAL


class PolicyRule(TypedDict, total=False):
    apiGroups: list[str]
    resources: list[str]
    verbs: list[str]
    resourceNames: list[str]


OPERATOR_RULES: list[PolicyRule] = [
    # Watch the jobs; patch metadata (kopf's finalizer and progress annotations); delete after ttlSecondsAfterFinished.
    {"apiGroups": [GROUP], "resources": [PLURAL], "verbs": ["get", "list", "watch", "patch", "delete"]},
    # Write the operator's status keys. `get` + `patch` are also what the per-job Role grants (escalation check).
    {"apiGroups": [GROUP], "resources": [f"{PLURAL}/status"], "verbs": ["get", "patch"]},
    # The batch/v1 Job that runs the trainer: create, follow, suspend/resume and retune deadlines, delete.
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "list", "watch", "create", "patch", "delete"]},
    # Follow the trainer pods (scheduling failures, termination messages); never modified by the operator.
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
    # The per-job identity of the trainer pod, so its status patches are limited to its own job; and the headless
    # Service that gives a multi-node job's pods their rendezvous hostnames.
    {"apiGroups": [""], "resources": ["serviceaccounts", "services"], "verbs": ["get", "create", "delete"]},
    {
        "apiGroups": ["rbac.authorization.k8s.io"],
        "resources": ["roles", "rolebindings"],
        "verbs": ["get", "create", "delete"],
    },
    # Kubernetes Events on the KontextLoRAJob (kubectl describe).
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "patch"]},
    # kopf: discover the CRD (and notice it being installed later), and namespaces matching --namespace patterns.
    {
        "apiGroups": ["apiextensions.k8s.io"],
        "resources": ["customresourcedefinitions"],
        "verbs": ["get", "list", "watch"],
    },
    {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get", "list", "watch"]},
    # kopf peering (cluster-wide ClusterKopfPeering object): replicas see each other, only the highest priority acts.
    {"apiGroups": ["kopf.dev"], "resources": ["clusterkopfpeerings"], "verbs": ["get", "list", "watch", "patch"]},
]


def trainer_rules(job_name: str) -> list[PolicyRule]:
    """What one trainer pod may do: read its own KontextLoRAJob and patch its status. Nothing else."""
    return [
        {"apiGroups": [GROUP], "resources": [PLURAL], "verbs": ["get"], "resourceNames": [job_name]},
        {
            "apiGroups": [GROUP],
            "resources": [f"{PLURAL}/status"],
            "verbs": ["get", "patch"],
            "resourceNames": [job_name],
        },
    ]


def cluster_role(name: str = "kontext-lora-operator", labels: dict[str, str] | None = None) -> dict:
    """The operator's ClusterRole manifest (the chart renders the same rules)."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": name, "labels": dict(labels or {})},
        "rules": [dict(rule) for rule in OPERATOR_RULES],
    }
