"""The Helm chart with the real `helm` binary and the real apiserver.

`helm lint` and `helm template` with several value sets; the values schema refusing what the operator would;
the rendered operator config validated by the operator's own model; a server-side dry-run apply of everything
the chart can render (Prometheus operator CRDs included); `helm install` bringing the operator Deployment up on a
KWOK node in a namespace that enforces the `restricted` Pod Security Standard, a KontextLoRAJob accepted
afterwards; and `kubectl auth can-i` as the operator's ServiceAccount: what it needs, nothing beyond.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kontext_operator.admission import POLICY_NAME
from kontext_operator.rbac import OPERATOR_RULES

from kontext_lora.api import DEFAULT_GPU_CLASSES, GROUP, PLURAL
from kontext_lora.api.operator_config import OperatorConfig
from kontext_lora.chart import CLUSTER_SCOPED_RESOURCES
from tests.conftest import Cluster
from tests.infra.helm import CHART, Helm, HelmError, find, monitoring_crds
from tests.infra.processes import ServerProcess, free_port

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_JOB = REPO / "examples" / "object-remover.yaml"
KONTEXT_LORA = REPO / ".venv" / "bin" / "kontext-lora"
CRD_NAME = f"{PLURAL}.{GROUP}"
DASHBOARD = CHART / "dashboards" / "kontext-lora-training.json"


def _everything(namespaces: list[str]) -> dict[str, Any]:
    """Values that turn on every optional part the chart has (except peering, which is cluster-wide only)."""
    return {
        "watchNamespaces": namespaces,
        "storage": {"endpoint": "http://minio.storage.svc:9000", "region": "eu-central-1"},
        "trainer": {"image": {"digest": "sha256:" + "ab" * 32}, "imagePullSecrets": ["registry"]},
        "operator": {"podDisruptionBudget": {"enabled": True}, "logLevel": "debug", "extraArgs": ["--log-format=json"]},
        "metrics": {
            "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
            "podMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
            "prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        },
        "dashboards": {"annotations": {"grafana_folder": "Training"}},
        "commonLabels": {"team": "imaging"},
    }


@pytest.fixture(scope="module")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    return Helm(tmp_path_factory.mktemp("helm"))


def _operator_config(manifests: list[dict[str, Any]], release: str = "kl") -> OperatorConfig:
    config_map = find(manifests, "ConfigMap", f"{release}-kontext-lora-config")
    return OperatorConfig.model_validate(yaml.safe_load(config_map["data"]["config.yaml"]))


# --- helm lint / helm template ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values",
    [
        None,
        _everything(["team-a", "team-b"]),
        {"operator": {"replicas": 2, "peering": {"enabled": True}}, "crds": {"install": False}},
        {"serviceAccount": {"create": False, "name": "existing"}, "rbac": {"create": False}},
    ],
    ids=["defaults", "everything", "peering", "bring-your-own-sa"],
)
def test_helm_lint_strict_passes(helm: Helm, values: dict[str, Any] | None) -> None:
    result = helm.lint(values)
    assert "0 chart(s) failed" in result.stdout, result.stdout
    assert "[ERROR]" not in result.stdout and "[WARNING]" not in result.stdout, result.stdout


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"gpuClasses": {"H100-80GB": {"matchExpressions": []}}}, "H100-80GB"),
        ({"storage": {"endpoint": "minio:9000"}}, "/storage/endpoint"),
        ({"trainer": {"metricsPort": 70000}}, "/trainer/metricsPort"),
        ({"operator": {"logLevel": "loud"}}, "/operator/logLevel"),
        ({"operator": {"replicaCount": 2}}, "replicaCount"),
        ({"gpuClasses": {"L40S-48GB": {"matchExpressions": [{"key": "a", "operator": "Like"}]}}}, "Like"),
        ({"operator": {"replicas": 2}}, "needs operator.peering.enabled"),
        ({"operator": {"peering": {"enabled": True}}, "watchNamespaces": ["a"]}, "needs watchNamespaces empty"),
    ],
    ids=["unknown-gpu-class", "endpoint", "port", "log-level", "typo", "affinity-operator", "ha", "ns-peering"],
)
def test_values_the_operator_would_refuse_are_refused_at_install_time(
    helm: Helm, values: dict[str, Any], message: str
) -> None:
    result = helm.template_text(values, check=False)
    assert result.returncode != 0, f"rendered despite {values}"
    assert message in result.stderr, result.stderr


def test_default_render(helm: Helm) -> None:
    manifests = helm.template()
    kinds = sorted(m["kind"] for m in manifests)
    assert kinds == sorted(
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "ConfigMap",
            "CustomResourceDefinition",
            "Deployment",
            "Service",
            "ServiceAccount",
            "ValidatingAdmissionPolicy",
            "ValidatingAdmissionPolicyBinding",
        ]
    )
    crd = find(manifests, "CustomResourceDefinition")
    assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    committed = yaml.safe_load((REPO / "crds" / "kontextlorajob.yaml").read_text())
    assert crd["spec"] == committed["spec"], "the chart's CRD differs from crds/ (run `kontext-lora crd`)"
    assert not [m for m in helm.template({"crds": {"install": False}}) if m["kind"] == "CustomResourceDefinition"]

    deployment = find(manifests, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == "ghcr.io/kontext-lora/operator:0.1.0"
    assert container["args"][:2] == ["operator", "--config=/etc/kontext-lora/config.yaml"]
    assert {"--all-namespaces", "--standalone"} <= set(container["args"])
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}, probe
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"metrics": 8080, "health": 8081}
    assert {"requests", "limits"} <= set(container["resources"])
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    service = find(manifests, "Service")
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 8080, "targetPort": "metrics", "protocol": "TCP"}]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]


def test_operator_config_is_what_the_operator_model_accepts(helm: Helm) -> None:
    defaults = _operator_config(helm.template())
    assert defaults.gpu_classes == DEFAULT_GPU_CLASSES, "values.yaml gpuClasses drifted from kontext_lora/api/gpu.py"
    assert defaults.trainer.image == "ghcr.io/kontext-lora/trainer:0.1.0"
    assert (defaults.metrics_port, defaults.health_port, defaults.trainer.metrics_port) == (8080, 8081, 9090)
    assert defaults.default_storage.endpoint is None and defaults.watch_namespaces == []

    config = _operator_config(helm.template(_everything(["team-a"])))
    assert config.default_storage.endpoint == "http://minio.storage.svc:9000"
    assert config.default_storage.region == "eu-central-1"
    assert config.trainer.image == "ghcr.io/kontext-lora/trainer:0.1.0@sha256:" + "ab" * 32
    assert config.trainer.image_pull_secrets == ["registry"]
    assert config.watch_namespaces == ["team-a"]

    relabelled = {
        "gpuClasses": {"L40S-48GB": {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["l40s"]}]}}
    }
    config = _operator_config(helm.template(relabelled))
    assert [e.key for e in config.gpu_classes["L40S-48GB"].match_expressions] == ["gpu"]
    assert config.gpu_classes["L40S-48GB"].tolerations, "tolerations of the default stay when only labels change"


def test_config_changes_roll_the_operator(helm: Helm) -> None:
    def checksum(values: dict[str, Any] | None) -> str:
        deployment = find(helm.template(values), "Deployment")
        return deployment["spec"]["template"]["metadata"]["annotations"]["checksum/config"]

    assert checksum(None) != checksum({"storage": {"region": "eu-west-1"}})
    assert checksum(None) == checksum({"operator": {"podLabels": {"x": "y"}}})


def test_watch_namespaces_get_roles_and_the_cluster_role_keeps_only_cluster_scoped_rules(helm: Helm) -> None:
    manifests = helm.template(_everything(["team-a", "team-b"]))
    cluster_role = find(manifests, "ClusterRole")
    cluster_resources = {r for rule in cluster_role["rules"] for r in rule["resources"]}
    assert cluster_resources <= CLUSTER_SCOPED_RESOURCES
    roles = [m for m in manifests if m["kind"] == "Role"]
    bindings = [m for m in manifests if m["kind"] == "RoleBinding"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    expected = [dict(rule) for rule in OPERATOR_RULES if rule["resources"][0] not in CLUSTER_SCOPED_RESOURCES]
    assert roles[0]["rules"] == expected
    args = find(manifests, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args and "--all-namespaces" not in args
    pod_monitor = find(manifests, "PodMonitor")
    assert pod_monitor["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}


def test_cluster_role_is_exactly_the_operator_rules(helm: Helm) -> None:
    cluster_role = find(helm.template(), "ClusterRole")
    as_sets = {(tuple(r["apiGroups"]), tuple(r["resources"]), frozenset(r["verbs"])) for r in cluster_role["rules"]}
    expected = {(tuple(r["apiGroups"]), tuple(r["resources"]), frozenset(r["verbs"])) for r in OPERATOR_RULES}
    assert as_sets == expected
    for rule in cluster_role["rules"]:
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], rule
        assert "secrets" not in rule["resources"]


def test_monitors_select_what_the_operator_labels(helm: Helm) -> None:
    from kontext_operator.resources import NAME_LABEL, TRAINER_APP

    manifests = helm.template(_everything([]))
    pod_monitor = find(manifests, "PodMonitor")
    assert pod_monitor["spec"]["selector"] == {"matchLabels": {NAME_LABEL: TRAINER_APP}}
    assert pod_monitor["spec"]["namespaceSelector"] == {"any": True}
    assert pod_monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    assert pod_monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    service_monitor = find(manifests, "ServiceMonitor")
    service = find(manifests, "Service")
    assert service_monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert service_monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]


def test_dashboard_config_map_is_labelled_for_the_grafana_sidecar(helm: Helm) -> None:
    manifests = helm.template(_everything([]) | {"dashboards": {"namespace": "monitoring"}})
    config_map = find(manifests, "ConfigMap", "kl-kontext-lora-dashboards")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["namespace"] == "monitoring"
    assert json.loads(config_map["data"][DASHBOARD.name]) == json.loads(DASHBOARD.read_text())
    assert not [
        m for m in helm.template({"dashboards": {"enabled": False}}) if m["metadata"]["name"].endswith("dashboards")
    ]


# --- against the real apiserver ---------------------------------------------------------------------------------


def _create_namespace(cluster: Cluster, prefix: str, labels: dict[str, str] | None = None) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    manifest = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels or {}}}
    cluster.kubectl("apply", "-f", "-", input=json.dumps(manifest))
    return name


@pytest.fixture(scope="module")
def namespaces(cluster: Cluster) -> Iterator[list[str]]:
    """A release namespace enforcing the `restricted` Pod Security Standard, and two watched namespaces."""
    restricted = {f"pod-security.kubernetes.io/{mode}": "restricted" for mode in ("enforce", "warn")}
    created = [_create_namespace(cluster, "kl-system", restricted)]
    created += [_create_namespace(cluster, "kl-team") for _ in range(2)]
    yield created
    cluster.kubectl("delete", "namespace", *created, "--wait=false", check=False)


def test_every_rendered_manifest_passes_a_server_side_dry_run(
    cluster: Cluster, helm: Helm, namespaces: list[str]
) -> None:
    # CRDs that objects of the same apply need (a dry run creates nothing): the Prometheus operator's monitors and
    # rules, and kopf's peering (the chart's crds/ folder, which Helm installs before the templates).
    for path in [*monitoring_crds(), CHART / "crds" / "kopf-peering.yaml"]:
        cluster.kubectl("apply", "--server-side", "-f", str(path))
    for path in [*monitoring_crds(), CHART / "crds" / "kopf-peering.yaml"]:
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                cluster.plane.wait_established(document["metadata"]["name"])
    release_ns, *watched = namespaces
    for values in (_everything(watched), _everything([]), {"operator": {"replicas": 2, "peering": {"enabled": True}}}):
        text = helm.template_text(values, "dry", release_ns, "--include-crds").stdout
        result = cluster.kubectl(
            "apply", "--server-side", "--dry-run=server", "--field-manager=helm-dry-run", "--force-conflicts",
            "-f", "-", input=text, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        applied = [line for line in result.stdout.splitlines() if "(server dry run)" in line]
        assert len(applied) == len([d for d in yaml.safe_load_all(text) if d]), result.stdout


def test_rbac_scope_classification_matches_the_apiserver(cluster: Cluster) -> None:
    cluster.kubectl("apply", "--server-side", "-f", str(CHART / "crds" / "kopf-peering.yaml"))
    cluster.plane.wait_established("clusterkopfpeerings.kopf.dev")
    cluster.install_crd()
    cluster_scoped = set(cluster.kubectl("api-resources", "--namespaced=false", "-o", "name").stdout.split())
    for rule in OPERATOR_RULES:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                full = f"{resource.split('/')[0]}.{group}" if group else resource.split("/")[0]
                assert (full in cluster_scoped) == (resource.split("/")[0] in CLUSTER_SCOPED_RESOURCES), full


# Cluster-scoped objects of the chart that other tests of the session may have applied with kubectl from crds/ and
# deploy/ first, and the file each came from (restored after the release is gone, so the cluster stays as found).
SHARED_OBJECTS = {
    ("crd", CRD_NAME): REPO / "crds" / "kontextlorajob.yaml",
    ("validatingadmissionpolicy", POLICY_NAME): REPO / "deploy" / "admission-policy.yaml",
    ("validatingadmissionpolicybinding", POLICY_NAME): REPO / "deploy" / "admission-policy.yaml",
}


def _adopt(cluster: Cluster, kind: str, name: str, release: str, namespace: str) -> bool:
    """Lets Helm adopt an object applied with kubectl, the way the chart README tells users to. True if it existed."""
    existing = cluster.kubectl("get", kind, name, "-o", "json", check=False)
    if existing.returncode != 0:
        return False
    if json.loads(existing.stdout)["metadata"].get("labels", {}).get("app.kubernetes.io/managed-by") != "Helm":
        cluster.kubectl("label", kind, name, "app.kubernetes.io/managed-by=Helm", "--overwrite")
        cluster.kubectl(
            "annotate", kind, name, "--overwrite",
            f"meta.helm.sh/release-name={release}", f"meta.helm.sh/release-namespace={namespace}",
        )  # fmt: skip
    return True


@pytest.fixture(scope="module")
def release(cluster: Cluster, helm: Helm, namespaces: list[str]) -> Iterator[dict[str, str]]:
    """The chart installed cluster-wide into the restricted namespace; uninstalled at the end."""
    release_ns = namespaces[0]
    helm.kubeconfig = cluster.kubeconfig
    found = [key for key in SHARED_OBJECTS if _adopt(cluster, *key, "kl", release_ns)]
    began = time.monotonic()
    install = helm.run(
        "install", "kl", CHART, "--namespace", release_ns, "--wait", "--timeout", "3m",
        "--set", "storage.endpoint=http://minio.storage.svc:9000", timeout=240,
    )  # fmt: skip
    yield {
        "namespace": release_ns,
        "serviceaccount": "kl-kontext-lora",
        "seconds": f"{time.monotonic() - began:.1f}",
        "notes": install.stdout,
    }
    helm.run("uninstall", "kl", "--namespace", release_ns, "--wait", check=False)
    for path in sorted({SHARED_OBJECTS[key] for key in found}):
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(path))


def test_helm_install_brings_the_operator_up_on_a_kwok_node(cluster: Cluster, release: dict[str, str]) -> None:
    ns = release["namespace"]
    deployment = json.loads(cluster.kubectl("get", "deployment", "kl-kontext-lora", "-n", ns, "-o", "json").stdout)
    conditions = {c["type"]: c["status"] for c in deployment["status"]["conditions"]}
    assert conditions.get("Available") == "True", deployment["status"]
    assert deployment["status"]["readyReplicas"] == 1
    pods = json.loads(
        cluster.kubectl(
            "get", "pods", "-n", ns, "-l", "app.kubernetes.io/instance=kl,app.kubernetes.io/component=operator",
            "-o", "json",
        ).stdout
    )["items"]  # fmt: skip
    assert len(pods) == 1 and pods[0]["status"]["phase"] == "Running"
    node = json.loads(cluster.kubectl("get", "node", pods[0]["spec"]["nodeName"], "-o", "json").stdout)
    assert node["metadata"]["annotations"].get("kwok.x-k8s.io/node") == "fake", "not a KWOK node"
    assert "nvidia.com/gpu" not in node["status"]["capacity"], "the operator took a GPU node"
    assert "kontext-lora" in release["notes"] and "every namespace" in release["notes"]


def test_a_job_applied_after_install_is_accepted(
    cluster: Cluster, release: dict[str, str], namespaces: list[str]
) -> None:
    crd = json.loads(cluster.kubectl("get", "crd", CRD_NAME, "-o", "json").stdout)
    assert crd["metadata"]["annotations"]["meta.helm.sh/release-name"] == "kl"
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    team = namespaces[1]
    cluster.kubectl("apply", "-n", team, "-f", str(EXAMPLE_JOB))
    name = yaml.safe_load(EXAMPLE_JOB.read_text())["metadata"]["name"]
    stored = json.loads(cluster.kubectl("get", "klj", name, "-n", team, "-o", "json").stdout)
    assert stored["spec"]["lora"]["rank"] >= 8, "the CRD's defaults were not applied"
    refused = cluster.kubectl(
        "apply", "-n", team, "-f", "-", check=False,
        input=json.dumps({**stored, "metadata": {"name": "bad"}, "spec": {**stored["spec"], "lora": {"rank": 4096}}}),
    )  # fmt: skip
    assert refused.returncode != 0 and "spec.lora.rank" in refused.stderr, refused.stderr


def test_the_charts_admission_policy_freezes_the_spec_of_a_started_job(
    cluster: Cluster, release: dict[str, str], namespaces: list[str]
) -> None:
    team = namespaces[1]
    name = yaml.safe_load(EXAMPLE_JOB.read_text())["metadata"]["name"]
    cluster.kubectl("apply", "-n", team, "-f", str(EXAMPLE_JOB))
    status = json.dumps({"status": {"phase": "Training"}})
    cluster.kubectl("patch", "klj", name, "-n", team, "--subresource=status", "--type=merge", "-p", status)
    change = json.dumps({"spec": {"lora": {"rank": 16}}})
    deadline = time.monotonic() + 30  # the apiserver compiles a new policy within a few seconds
    while (
        result := cluster.kubectl("patch", "klj", name, "-n", team, "--type=merge", "-p", change, check=False)
    ).returncode == 0:
        assert time.monotonic() < deadline, (
            "a Training job's spec.lora changed: the chart's admission policy is not active"
        )
        cluster.kubectl(
            "patch", "klj", name, "-n", team, "--type=merge", "-p", json.dumps({"spec": {"lora": {"rank": 32}}})
        )
        time.sleep(0.5)
    assert POLICY_NAME in result.stderr and "spec.lora cannot change" in result.stderr, result.stderr
    suspend = json.dumps({"spec": {"suspend": True}})
    cluster.kubectl("patch", "klj", name, "-n", team, "--type=merge", "-p", suspend)


# --- permissions of the operator's ServiceAccount ---------------------------------------------------------------


def _http_status(url: str) -> int:
    with urllib.request.urlopen(url, timeout=2) as response:
        return response.status


def _can_i(cluster: Cluster, subject: str, *args: str) -> bool:
    result = cluster.kubectl("auth", "can-i", *args, f"--as={subject}", check=False)
    return result.stdout.strip() == "yes"


def _can_i_list(cluster: Cluster, subject: str, namespace: str) -> dict[str, set[str]]:
    """`kubectl auth can-i --list` as {resource: verbs} (resource rows only)."""
    out = cluster.kubectl("auth", "can-i", "--list", f"--as={subject}", "-n", namespace).stdout
    rows: dict[str, set[str]] = {}
    for line in out.splitlines()[1:]:
        resource, _, rest = line.partition(" ")
        verbs = rest[rest.rfind("[") + 1 : rest.rfind("]")].split()
        if resource:
            rows.setdefault(resource, set()).update(verbs)
        else:  # a non-resource URL row (discovery, health): everyone may only read those
            assert verbs == ["get"], line
    return rows


def _qualified(resource: str, group: str) -> str:
    """How kubectl names a resource: `jobs.batch`, `kontextlorajobs.kontext-lora.io/status`, `pods`."""
    base, _, sub = resource.partition("/")
    return (f"{base}.{group}" if group else base) + (f"/{sub}" if sub else "")


# What every authenticated identity may do on any cluster (system:basic-user, system:discovery...).
BASELINE = {
    "selfsubjectreviews.authentication.k8s.io",
    "selfsubjectaccessreviews.authorization.k8s.io",
    "selfsubjectrulesreviews.authorization.k8s.io",
}


def test_operator_service_account_can_do_what_it_needs(
    cluster: Cluster, release: dict[str, str], namespaces: list[str]
) -> None:
    subject = f"system:serviceaccount:{release['namespace']}:{release['serviceaccount']}"
    team = namespaces[1]
    needed = [
        ("create", "jobs.batch"),
        ("delete", "jobs.batch"),
        ("watch", "kontextlorajobs.kontext-lora.io"),
        ("patch", "kontextlorajobs.kontext-lora.io", "--subresource=status"),
        ("create", "serviceaccounts"),
        ("create", "roles.rbac.authorization.k8s.io"),
        ("create", "rolebindings.rbac.authorization.k8s.io"),
        ("create", "events"),
        ("list", "pods"),
        ("watch", "customresourcedefinitions.apiextensions.k8s.io"),
    ]
    for verb, resource, *extra in needed:
        assert _can_i(cluster, subject, verb, resource, *extra, "-n", team), f"cannot {verb} {resource}"


def test_operator_service_account_can_do_nothing_beyond_its_rules(
    cluster: Cluster, release: dict[str, str], namespaces: list[str]
) -> None:
    subject = f"system:serviceaccount:{release['namespace']}:{release['serviceaccount']}"
    team = namespaces[1]
    refused = [
        ("get", "secrets"),
        ("list", "secrets"),
        ("create", "pods"),
        ("delete", "pods"),
        ("update", "kontextlorajobs.kontext-lora.io"),
        ("create", "clusterroles.rbac.authorization.k8s.io"),
        ("create", "clusterrolebindings.rbac.authorization.k8s.io"),
        ("bind", "roles.rbac.authorization.k8s.io"),
        ("escalate", "roles.rbac.authorization.k8s.io"),
        ("delete", "customresourcedefinitions.apiextensions.k8s.io"),
        ("patch", "nodes"),
        ("create", "namespaces"),
        ("impersonate", "serviceaccounts"),
    ]
    for verb, resource in refused:
        assert not _can_i(cluster, subject, verb, resource, "-n", team), f"can {verb} {resource}"

    granted = _can_i_list(cluster, subject, team)
    expected: dict[str, set[str]] = {name: set() for name in BASELINE}
    for rule in OPERATOR_RULES:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                expected.setdefault(_qualified(resource, group), set()).update(rule["verbs"])
    for resource, verbs in granted.items():
        assert "*" not in verbs and "*" not in resource, f"wildcard: {resource} {verbs}"
        assert resource in expected, f"{subject} may {sorted(verbs)} {resource}, which no operator rule grants"
        assert verbs <= expected[resource] or resource in BASELINE, (resource, verbs, expected[resource])


def test_the_operator_runs_as_the_chart_configures_it_with_only_the_charts_permissions(
    cluster: Cluster, release: dict[str, str], namespaces: list[str], tmp_path: Path
) -> None:
    """KWOK runs no containers, so run the Deployment's command here: its args, its ConfigMap, a token of its
    ServiceAccount. A job applied then gets its trainer Job, per-job RBAC and status from that operator."""
    ns, team = release["namespace"], namespaces[2]
    deployment = json.loads(cluster.kubectl("get", "deployment", "kl-kontext-lora", "-n", ns, "-o", "json").stdout)
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    config_map = json.loads(
        cluster.kubectl("get", "configmap", "kl-kontext-lora-config", "-n", ns, "-o", "json").stdout
    )
    config = yaml.safe_load(config_map["data"]["config.yaml"])
    config |= {"metricsPort": free_port(), "healthPort": free_port()}  # this machine's ports, not the pod's
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    args = [f"--config={config_path}" if a.startswith("--config=") else a for a in container["args"]]
    token = cluster.kubectl("create", "token", release["serviceaccount"], "-n", ns, "--duration=1h").stdout.strip()
    kubeconfig = cluster.plane.write_kubeconfig("chart-operator", token=token)
    env = {"KUBECONFIG": str(kubeconfig), "POD_NAME": "kl-kontext-lora-local", "PYTHONUNBUFFERED": "1"}
    operator = ServerProcess("chart-operator", [KONTEXT_LORA, *args], tmp_path / "logs", env=env).start()
    try:
        operator.wait_ready(lambda: _http_status(f"http://127.0.0.1:{config['healthPort']}/healthz") == 200, 60)
        manifest = yaml.safe_load(EXAMPLE_JOB.read_text())
        cluster.kubectl("apply", "-n", team, "-f", "-", input=yaml.safe_dump(manifest))
        name = manifest["metadata"]["name"]
        deadline = time.monotonic() + 60
        while True:
            jobs = json.loads(
                cluster.kubectl(
                    "get", "jobs.batch", "-n", team, "-l", f"kontext-lora.io/job={name}", "-o", "json"
                ).stdout
            )["items"]
            phase = json.loads(cluster.kubectl("get", "klj", name, "-n", team, "-o", "json").stdout).get("status", {})
            if jobs and phase.get("phase"):
                break
            assert time.monotonic() < deadline, (
                f"no trainer Job/phase from the chart's operator:\n{operator.log_tail()}"
            )
            time.sleep(0.5)
        pod = jobs[0]["spec"]["template"]
        assert pod["spec"]["containers"][0]["image"] == "ghcr.io/kontext-lora/trainer:0.1.0", (
            "trainer image from values"
        )
        env_vars = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
        assert env_vars.get("AWS_ENDPOINT_URL_S3") == "http://minio.storage.svc:9000", "default endpoint from values"
        account = pod["spec"]["serviceAccountName"]
        assert cluster.kubectl("get", "serviceaccount", account, "-n", team, check=False).returncode == 0
        # The Role and RoleBinding are made beside the Job at a lower priority (the pod uses them only once it
        # reports progress), so they may land a moment after the Job and the first status.
        deadline = time.monotonic() + 30
        while not cluster.kubectl("get", "rolebinding", "-n", team, "-o", "name").stdout.strip():
            assert time.monotonic() < deadline, f"no per-job RoleBinding after 30 s:\n{operator.log_tail()}"
            time.sleep(0.5)
        # An RBAC denial reads `User "system:serviceaccount:..." cannot <verb> resource ...` (a 403 for a namespace
        # being terminated, from an earlier test's leftovers, is not one).
        denials = re.findall(r'User "[^"]+" cannot \w+ resource "[^"]+"[^\n]*', operator.log_path.read_text())
        assert not denials, denials
    finally:
        operator.stop()


def test_watched_namespaces_release_grants_namespaced_verbs_only_there(
    cluster: Cluster, helm: Helm, release: dict[str, str], namespaces: list[str]
) -> None:
    """A second release watching one namespace: its Role applies there and nowhere else."""
    _, team_a, team_b = namespaces
    ns = _create_namespace(cluster, "kl-scoped")
    try:
        helm.run(
            "install", "scoped", CHART, "--namespace", ns, "--wait", "--timeout", "3m",
            "--set", "crds.install=false", "--set", "admissionPolicy.enabled=false",
            "--set", f"watchNamespaces={{{team_a}}}", timeout=240,
        )  # fmt: skip
        subject = f"system:serviceaccount:{ns}:scoped-kontext-lora"
        assert _can_i(cluster, subject, "create", "jobs.batch", "-n", team_a)
        assert _can_i(
            cluster, subject, "patch", "kontextlorajobs.kontext-lora.io", "--subresource=status", "-n", team_a
        )
        assert not _can_i(cluster, subject, "create", "jobs.batch", "-n", team_b)
        assert not _can_i(cluster, subject, "list", "pods", "--all-namespaces")
        assert not _can_i(cluster, subject, "create", "serviceaccounts", "-n", team_b)
        assert _can_i(cluster, subject, "watch", "customresourcedefinitions.apiextensions.k8s.io")
    finally:
        helm.run("uninstall", "scoped", "--namespace", ns, "--wait", check=False)
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def test_helm_uninstall_keeps_the_crd_and_the_jobs(
    cluster: Cluster, helm: Helm, release: dict[str, str], namespaces: list[str]
) -> None:
    cluster.kubectl("apply", "-n", namespaces[1], "-f", str(EXAMPLE_JOB))
    helm.run("uninstall", "kl", "--namespace", release["namespace"], "--wait")
    assert cluster.kubectl("get", "crd", CRD_NAME, check=False).returncode == 0, "uninstall deleted the CRD"
    name = yaml.safe_load(EXAMPLE_JOB.read_text())["metadata"]["name"]
    assert cluster.kubectl("get", "klj", name, "-n", namespaces[1], check=False).returncode == 0, "jobs were lost"
    assert cluster.kubectl("get", "clusterrole", "kl-kontext-lora", check=False).returncode != 0
    with pytest.raises(HelmError):
        helm.run("status", "kl", "--namespace", release["namespace"])
