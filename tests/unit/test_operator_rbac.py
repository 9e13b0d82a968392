"""The operator's RBAC rules: least privilege, and enough for the per-job Role it grants (escalation check)."""

from __future__ import annotations

import subprocess
import sys

from kontext_operator.rbac import OPERATOR_RULES, cluster_role, trainer_rules

from kontext_lora.api import GROUP, PLURAL


def _allows(rules, group: str, resource: str, verb: str) -> bool:
    return any(group in rule["apiGroups"] and resource in rule["resources"] and verb in rule["verbs"] for rule in rules)


def test_no_wildcards_and_no_secrets() -> None:
    for rule in OPERATOR_RULES:
        for key in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[key], rule
        assert "secrets" not in rule["resources"], "the operator must not read Secrets: pods use secretKeyRef"
        assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"]), rule


def test_operator_holds_every_permission_it_grants_to_trainer_pods() -> None:
    for rule in trainer_rules("some-job"):
        assert rule["resourceNames"] == ["some-job"]
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    assert _allows(OPERATOR_RULES, group, resource, verb), (group, resource, verb)


def test_trainer_may_only_touch_its_own_job_status() -> None:
    rules = trainer_rules("j")
    assert _allows(rules, GROUP, f"{PLURAL}/status", "patch")
    assert not _allows(rules, GROUP, PLURAL, "patch"), "the trainer must not change the spec"
    assert not _allows(rules, GROUP, PLURAL, "list")


def test_cluster_role_manifest() -> None:
    role = cluster_role("x", {"app": "y"})
    assert role["kind"] == "ClusterRole" and role["metadata"] == {"name": "x", "labels": {"app": "y"}}
    assert role["rules"] == OPERATOR_RULES


def test_the_operator_never_imports_torch() -> None:
    """The operator image has no torch: importing every operator module must not pull it in."""
    code = (
        "import sys; import kontext_operator.main, kontext_operator.handlers, kontext_operator.admission; "
        "sys.exit(1 if [m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'kontext_trainer')] else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
