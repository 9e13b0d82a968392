"""Secrets and privilege: storage credentials and the Hugging Face token reach the pods (preparation and trainer) only
by Secret reference and appear nowhere else — not in the operator's log, the pods' logs and termination messages, the
job's status, Events, or the Job and pod specs — for a job that succeeds (its model from the stand-in hub, gated, with
the token) and jobs that fail on storage or on the hub refusing a token. Trainer pods run non-root without privilege
escalation, all capabilities dropped, seccomp RuntimeDefault, and are admitted by a namespace that enforces the
`restricted` Pod Security Standard. The operator's RBAC (its rule list, the chart's rendered roles and the live
ServiceAccount) has no wildcard, no Secrets, no cluster-admin."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest
from kontext_operator.rbac import OPERATOR_RULES

from tests.conftest import Cluster, Hub
from tests.infra.helm import Helm
from tests.infra.klj import PREPARE, Kljs
from tests.infra.node_agent import NodeAgent
from tests.infra.operator_process import SERVICE_ACCOUNT, SYSTEM_NAMESPACE, OperatorProcess

from .support import FaultStore, record, scan_for, use_hub_model, wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.s3, pytest.mark.slow]

OPERATOR_USER = f"system:serviceaccount:{SYSTEM_NAMESPACE}:{SERVICE_ACCOUNT}"
ADMIN_ROLES = {"cluster-admin", "admin", "edit"}
CREDENTIAL_ENV = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HF_TOKEN"}


def test_credentials_only_by_reference_never_in_logs_status_or_events_and_pods_are_restricted(
    crd: Cluster,
    kljs: Kljs,
    start_operator: Callable[..., OperatorProcess],
    agent: NodeAgent,
    store: FaultStore,
    hub: Hub,
) -> None:
    # The chart-wide default token Secret (hub.tokenSecret) for jobs that name none.
    operator = start_operator(config={"hub": {"endpoint": hub.server.endpoint, "tokenSecret": {"name": "hf-token"}}})
    namespace = kljs.namespace
    for label in ("enforce", "warn", "audit"):
        crd.kubectl("label", "namespace", namespace, f"pod-security.kubernetes.io/{label}=restricted", "--overwrite")
    # The namespace really enforces: a pod that may escalate is refused at admission.
    risky = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "risky"},
        "spec": {"containers": [{"name": "c", "image": "busybox", "securityContext": {"privileged": True}}]},
    }
    refused = crd.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(risky), check=False)
    assert refused.returncode != 0 and "violates PodSecurity" in refused.stderr, refused.stderr

    agent.env_overrides["KONTEXT_LORA_METRICS_PORT"] = "0"  # parallel pods share this host's network here
    agent.env_overrides["KONTEXT_LORA_S3_RETRY_SECONDS"] = "5"
    store.upload_pairs()
    wrong_secret = "kl-fault-wrong-" + uuid.uuid4().hex
    store.create_secret(kljs)
    kljs.create_s3_secret(store.minio.access_key, wrong_secret, name="wrong-credentials")
    for secret, token in (("hf-token", hub.granted_token), ("hf-refused", hub.refused_token)):
        crd.kubectl("create", "secret", "generic", secret, "-n", namespace, f"--from-literal=HF_TOKEN={token}")
    jobs = {
        "leak-ok": store.job("leak-ok", steps=4, save_every=2, keep=1),
        "leak-wrong-key": store.job("leak-wrong-key", secret="wrong-credentials"),
        "leak-no-bucket": store.job("leak-no-bucket"),
        "leak-refused-token": store.job("leak-refused-token"),
    }
    # The model from the (stand-in) hub: with the default token Secret, and with one the hub refuses. The good job
    # also names a model cache volume, which its preparation pod fills for the training pod.
    use_hub_model(jobs["leak-ok"], hub.repo)
    jobs["leak-ok"]["spec"]["resources"]["modelCacheClaim"] = _model_cache_claim(crd, namespace)
    use_hub_model(jobs["leak-refused-token"], hub.repo, "hf-refused")
    # A storage failure after the credentials were used: the output bucket does not exist.
    jobs["leak-no-bucket"]["spec"]["output"]["uri"] = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/out/"
    for document in jobs.values():
        kljs.apply(document)
    expected = {"leak-ok": "Succeeded", "leak-wrong-key": "Failed", "leak-no-bucket": "Failed"}
    expected["leak-refused-token"] = "Failed"
    wait_until(
        lambda: all(kljs.status(n).get("phase") == phase for n, phase in expected.items()),
        420,
        f"phases {expected}",
        interval=1,
    )

    # The model cache hand-over: the training pod started from the filled volume and asked the hub nothing.
    [trainer_pod] = kljs.pods("leak-ok")
    started = datetime.fromisoformat(trainer_pod["status"]["startTime"].replace("Z", "+00:00")).timestamp()
    by_licensee = [r for r in hub.server.requests_for(hub.repo) if r.user == "licensee"]
    assert by_licensee and not [r for r in by_licensee if r.at >= started], [(r.method, r.path) for r in by_licensee]
    assert [r for r in by_licensee if r.method == "GET" and "/resolve/" in r.path], "the preparation downloaded it"

    # Pods: admitted under `restricted`, credentials by reference only. Every job had a preparation pod; only the
    # one whose inputs were fine got a trainer pod.
    pods = [p for name in jobs for role in ("train", PREPARE) for p in kljs.pods(name, role)]
    assert len(pods) == len(jobs) + 1, [p["metadata"]["name"] for p in pods]
    assert kljs.status("leak-refused-token")["reason"] == "ModelAccessDenied"
    failed_creates = crd.kubectl(
        "get", "events", "-n", namespace, "--field-selector", "reason=FailedCreate", "-o", "json"
    ).stdout
    assert not json.loads(failed_creates)["items"], failed_creates
    for pod in pods:
        spec = pod["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
        assert not any("hostPath" in v for v in spec.get("volumes") or [])
        [container] = spec["containers"]
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False and context["capabilities"] == {"drop": ["ALL"]}
        assert context.get("privileged") in (None, False) and context["readOnlyRootFilesystem"] is True
        env = {e["name"]: e for e in container["env"]}
        for name in CREDENTIAL_ENV & env.keys():
            assert "value" not in env[name] and env[name]["valueFrom"]["secretKeyRef"]["name"], env[name]
        assert not container.get("envFrom"), "no bulk import of Secrets"

    # Nothing outside the Secret holds the values.
    plain = {**store.secrets, "wrong key": wrong_secret, "hub token": hub.granted_token}
    plain["refused hub token"] = hub.refused_token
    # ... nor their base64 form (a dumped Secret object).
    secrets = plain | {f"{k} (base64)": base64.b64encode(v.encode()).decode() for k, v in plain.items()}
    texts = {
        "operator log": operator.log_path.read_text(errors="replace"),
        "kubectl get klj -o yaml": crd.kubectl("get", "klj", "-n", namespace, "-o", "yaml").stdout,
        "kubectl describe klj": crd.kubectl("describe", "klj", "-n", namespace).stdout,
        "events": crd.kubectl("get", "events", "-n", namespace, "-o", "yaml").stdout,
        "jobs and pods": crd.kubectl("get", "jobs,pods", "-n", namespace, "-o", "yaml").stdout,
    }
    for pod in pods:
        name = pod["metadata"]["name"]
        texts[f"log of {name}"] = agent.pod_log(namespace, name)
        termination = agent.find_dir(namespace, name) / "termination-log"
        texts[f"termination message of {name}"] = termination.read_text() if termination.exists() else ""
    leaks = scan_for(secrets, texts)
    assert not leaks, leaks
    # The scan can see them: the Secret object itself holds them.
    in_secret = crd.kubectl("get", "secret", "wrong-credentials", "-n", namespace, "-o", "json").stdout
    found = scan_for(secrets, {"the Secret": in_secret})
    assert found == ["the Secret: access key (base64)", "the Secret: wrong key (base64)"], found
    in_token = crd.kubectl("get", "secret", "hf-token", "-n", namespace, "-o", "json").stdout
    assert scan_for(secrets, {"the Secret": in_token}) == ["the Secret: hub token (base64)"]
    assert "access denied" in kljs.status("leak-wrong-key")["message"]

    # The trainer's identity can read its own job and patch its status, and nothing like Secrets.
    trainer_user = f"system:serviceaccount:{namespace}:leak-ok-trainer"
    for verb, resource, allowed in (
        ("get", "secrets", "no"),
        ("list", "pods", "no"),
        ("patch", "kontextlorajobs.kontext-lora.io/leak-ok", "no"),
        ("patch", "kontextlorajobs.kontext-lora.io/leak-wrong-key", "no"),
        ("get", "kontextlorajobs.kontext-lora.io/leak-ok", "yes"),
    ):
        answer = crd.kubectl("auth", "can-i", verb, resource, "-n", namespace, f"--as={trainer_user}", check=False)
        assert answer.stdout.strip() == allowed, (verb, resource, answer.stdout)
    answer = crd.kubectl(
        "auth",
        "can-i",
        "patch",
        "kontextlorajobs.kontext-lora.io/leak-ok",
        "--subresource=status",
        "-n",
        namespace,
        f"--as={trainer_user}",
        check=False,
    )
    assert answer.stdout.strip() == "yes", answer.stdout
    record(
        "secrets",
        sources_scanned=len(texts),
        secret_values=len(secrets),
        occurrences=len(leaks),
        jobs=expected,
        pod_security="restricted (enforce)",
    )


def _model_cache_claim(cluster: Cluster, namespace: str) -> str:
    """A PersistentVolumeClaim bound to a PersistentVolume made for it (the node agent gives each claim one folder)."""
    claim, volume = "model-cache", f"model-cache-{namespace}"
    manifests = [
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": volume, "labels": {"kontext-lora.io/test": namespace}},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadWriteOnce"],
                "storageClassName": "",
                "persistentVolumeReclaimPolicy": "Delete",
                "hostPath": {"path": f"/tmp/{volume}"},
                "claimRef": {"namespace": namespace, "name": claim},
            },
        },
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": claim, "namespace": namespace},
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "storageClassName": "",
                "volumeName": volume,
                "resources": {"requests": {"storage": "1Gi"}},
            },
        },
    ]
    cluster.kubectl("apply", "-f", "-", input="\n---\n".join(json.dumps(m) for m in manifests))
    wait_until(
        lambda: (
            cluster.kubectl("get", "pvc", claim, "-n", namespace, "-o", "jsonpath={.status.phase}").stdout == "Bound"
        ),
        60,
        "the claim to be bound",
    )
    return claim


def _no_wildcards(rules: list[dict], where: str) -> None:
    for rule in rules:
        for key in ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"):
            assert "*" not in (rule.get(key) or []), f"{where}: wildcard in {key}: {rule}"
        assert "secrets" not in (rule.get("resources") or []), f"{where}: Secrets access: {rule}"
        assert not {"escalate", "bind", "impersonate"} & set(rule.get("verbs") or []), f"{where}: {rule}"


def test_operator_rbac_has_no_wildcards_no_secrets_and_no_cluster_admin(crd: Cluster, tmp_path: Path) -> None:
    _no_wildcards(list(OPERATOR_RULES), "kontext_operator.rbac")
    helm = Helm(tmp_path / "helm")
    rendered = 0
    for values in ({}, {"watchNamespaces": ["team-a", "team-b"]}):
        for manifest in helm.template(values):
            kind = manifest["kind"]
            if kind in ("ClusterRole", "Role"):
                _no_wildcards(manifest.get("rules") or [], f"chart {kind} {manifest['metadata']['name']}")
                rendered += 1
            if kind in ("ClusterRoleBinding", "RoleBinding"):
                assert manifest["roleRef"]["name"] not in ADMIN_ROLES, manifest
                rendered += 1
    assert rendered >= 4

    # The live identity the operator runs under in these tests (exactly rbac.py's rules).
    denied = (("*", "*"), ("get", "secrets"), ("list", "secrets"), ("create", "pods"), ("escalate", "roles"))
    for verb, resource in denied:
        answer = crd.kubectl("auth", "can-i", verb, resource, "-A", f"--as={OPERATOR_USER}", check=False)
        assert answer.stdout.strip() == "no", (verb, resource, answer.stdout)
    bindings = json.loads(crd.kubectl("get", "clusterrolebindings", "-o", "json").stdout)["items"]
    for binding in bindings:
        subjects = binding.get("subjects") or []
        if any(s.get("kind") == "ServiceAccount" and s.get("name") == SERVICE_ACCOUNT for s in subjects):
            assert binding["roleRef"]["name"] not in ADMIN_ROLES, binding
    listing = crd.kubectl("auth", "can-i", "--list", f"--as={OPERATOR_USER}").stdout
    for line in listing.splitlines()[1:]:
        columns = line.split()
        assert columns and columns[0] not in ("*", "*.*"), line
        assert "[*]" not in line, line
    record("rbac", rules=len(OPERATOR_RULES), chart_roles_and_bindings_checked=rendered, wildcards=0, secrets=0)
