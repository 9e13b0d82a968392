"""The chart's PrometheusRule, rendered by the real helm and unit-tested by Debian's real `promtool`.

`promtool check rules` parses every expression; `promtool test rules` replays synthetic series and asserts which
alerts fire, with which labels and annotations, and that healthy runs stay silent.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.infra.binaries import binary
from tests.infra.helm import Helm, find

RELEASE, NAMESPACE = "kl", "kontext-lora"
RUN = 'job_name="jewellery", job_namespace="team-a"'
OTHER = 'job_name="healthy", job_namespace="team-a"'


@pytest.fixture(scope="module")
def rules_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rules")
    values = {"metrics": {"prometheusRule": {"enabled": True, "additionalLabels": {"team": "imaging"}}}}
    rule = find(Helm(root / "helm").template(values, RELEASE, NAMESPACE), "PrometheusRule")
    path = root / "kontext-lora.rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False))
    return path


def promtool(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(binary("promtool", system_fallback=True)), *map(str, args)], capture_output=True, text=True, timeout=120
    )


def test_rules_parse(rules_file: Path) -> None:
    result = promtool("check", "rules", rules_file)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 5 rules found" in result.stdout, result.stdout


def _diverged(job: str) -> dict[str, str]:
    return {
        "summary": f"LoRA training team-a/{job} reports a non-finite loss",
        "description": "The run diverged: lower spec.training.learningRate or use bf16; "
        "resume from the last good checkpoint.",
    }


def _alert(time: str, name: str, *expected: dict[str, Any]) -> dict[str, Any]:
    return {"eval_time": time, "alertname": name, "exp_alerts": list(expected)}


def test_alerts_fire_on_the_failures_they_name_and_only_then(rules_file: Path, tmp_path: Path) -> None:
    run_labels = {"job_name": "jewellery", "job_namespace": "team-a", "team": "imaging"}
    tests = {
        "rule_files": [str(rules_file)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "name": "a run stuck at step 120 of 1000 stalls; one still stepping does not",
                "interval": "1m",
                "input_series": [
                    {"series": f"kontext_train_step{{{RUN}}}", "values": "0+10x12 120x30"},
                    {"series": f"kontext_train_total_steps{{{RUN}}}", "values": "1000x42"},
                    {"series": f"kontext_train_step{{{OTHER}}}", "values": "0+10x42"},
                    {"series": f"kontext_train_total_steps{{{OTHER}}}", "values": "1000x42"},
                ],
                "alert_rule_test": [
                    _alert("20m", "KontextLoRATrainingStalled"),
                    _alert(
                        "35m",
                        "KontextLoRATrainingStalled",
                        {
                            "exp_labels": {**run_labels, "severity": "warning"},
                            "exp_annotations": {
                                "summary": "LoRA training team-a/jewellery has made no step for 15m",
                                "description": "Check the trainer pod's log and "
                                "`kubectl describe klj jewellery -n team-a`.",
                            },
                        },
                    ),
                ],
            },
            {
                "name": "a finished run (step == total) is not stalled",
                "interval": "1m",
                "input_series": [
                    {"series": f"kontext_train_step{{{RUN}}}", "values": "1000x40"},
                    {"series": f"kontext_train_total_steps{{{RUN}}}", "values": "1000x40"},
                ],
                "alert_rule_test": [_alert("35m", "KontextLoRATrainingStalled")],
            },
            {
                "name": "NaN and Inf losses are critical, finite ones are fine",
                "interval": "1m",
                "input_series": [
                    {"series": f"kontext_train_loss{{{RUN}}}", "values": "0.5 0.4 NaN NaN NaN NaN"},
                    {"series": f"kontext_train_loss{{{OTHER}}}", "values": "0.5 0.4 0.3 0.3 0.2 0.2"},
                    {"series": 'kontext_train_loss{job_name="inf", job_namespace="team-a"}', "values": "1 Inf Inf Inf"},
                ],
                "alert_rule_test": [
                    _alert("1m", "KontextLoRALossNotFinite"),
                    _alert(
                        "4m",
                        "KontextLoRALossNotFinite",
                        {
                            "exp_labels": {**run_labels, "severity": "critical"},
                            "exp_annotations": _diverged("jewellery"),
                        },
                        {
                            "exp_labels": {
                                "job_name": "inf",
                                "job_namespace": "team-a",
                                "team": "imaging",
                                "severity": "critical",
                            },
                            "exp_annotations": _diverged("inf"),
                        },
                    ),
                ],
            },
            {
                "name": "failed jobs and a missing operator",
                "interval": "1m",
                "input_series": [
                    {"series": 'kontext_operator_jobs{phase="Failed"}', "values": "0 0 2 2"},
                    {"series": 'kontext_operator_jobs{phase="Training"}', "values": "3 3 1 1"},
                    {
                        "series": f'up{{job="{RELEASE}-kontext-lora-metrics", namespace="{NAMESPACE}"}}',
                        "values": "1x5 0x15",
                    },
                    {"series": 'kontext_operator_reconcile_errors_total{handler="create"}', "values": "0+10x30"},
                    {"series": 'kontext_operator_reconcile_errors_total{handler="delete"}', "values": "0x30"},
                ],
                "alert_rule_test": [
                    _alert("1m", "KontextLoRAJobsFailed"),
                    _alert(
                        "3m",
                        "KontextLoRAJobsFailed",
                        {
                            "exp_labels": {"severity": "warning", "team": "imaging"},
                            "exp_annotations": {
                                "summary": "2 KontextLoRAJob(s) failed",
                                "description": "`kubectl get klj -A` shows them; status.message says why.",
                            },
                        },
                    ),
                    _alert("10m", "KontextLoRAOperatorDown"),
                    _alert(
                        "17m",
                        "KontextLoRAOperatorDown",
                        {
                            "exp_labels": {"severity": "critical", "team": "imaging"},
                            "exp_annotations": {
                                "summary": f"The kontext-lora operator in {NAMESPACE} is not scraped as up",
                                "description": "No operator reconciles KontextLoRAJobs: "
                                f"kubectl -n {NAMESPACE} get pods",
                            },
                        },
                    ),
                    _alert(
                        "25m",
                        "KontextLoRAOperatorReconcileErrors",
                        {
                            "exp_labels": {"handler": "create", "severity": "warning", "team": "imaging"},
                            "exp_annotations": {
                                "summary": "The kontext-lora operator's create handler keeps failing",
                                "description": "See the operator's log: "
                                f"kubectl -n {NAMESPACE} logs deploy/{RELEASE}-kontext-lora",
                            },
                        },
                    ),
                ],
            },
        ],
    }
    test_file = tmp_path / "alerts.test.yaml"
    test_file.write_text(yaml.safe_dump(tests, sort_keys=False, width=200))
    result = promtool("test", "rules", test_file)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout, result.stdout
