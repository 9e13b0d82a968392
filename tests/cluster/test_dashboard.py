"""The Grafana dashboard's PromQL, evaluated by a real Prometheus against real processes.

Debian's `prometheus` scrapes, every second, a real training run (`kontext-lora train job.yaml --metrics-port N`
with the tiny FLUX.1-Kontext model on CPU) and a real operator (`kontext-lora operator` under its least-privilege
ServiceAccount, reconciling KontextLoRAJobs on the test control plane). Each panel's queries are sent as Grafana
sends them — dashboard variables and `$__rate_interval` substituted — to `/api/v1/query_range` over the run, and
each must return series with finite values. The variables' own queries must list the run.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from kontext_lora.api import Phase
from tests.conftest import Cluster
from tests.infra.helm import CHART
from tests.infra.operator_process import OperatorIdentity, OperatorProcess
from tests.infra.processes import free_port, wait_for
from tests.infra.prometheus import PrometheusServer, Series

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
KONTEXT_LORA = REPO / ".venv" / "bin" / "kontext-lora"
DASHBOARD = json.loads((CHART / "dashboards" / "kontext-lora-training.json").read_text())
OPERATOR_METRICS = ("kontext_operator_",)
# What the issue asks the dashboard to show, by panel title.
REQUIRED_PANELS = {
    "Loss",
    "Learning rate",
    "Step",
    "ETA",
    "Step time",
    "GPU memory",
    "Checkpoints saved",
    "Jobs by phase",
}


# --- the dashboard as Grafana reads it --------------------------------------------------------------------------


def panels() -> list[dict[str, Any]]:
    flat = []
    for panel in DASHBOARD["panels"]:
        flat += panel.get("panels", []) if panel["type"] == "row" else [panel]
    return flat


def variable(name: str) -> dict[str, Any]:
    return next(v for v in DASHBOARD["templating"]["list"] if v["name"] == name)


def grafana_expr(expr: str, values: dict[str, str], scrape_seconds: float, step_seconds: float) -> str:
    """The query Grafana sends: variables replaced, `$__rate_interval` computed as Grafana does
    (max(4 x scrape interval, $__interval + scrape interval))."""
    rate_interval = max(4 * scrape_seconds, step_seconds + scrape_seconds)
    macros = {"__rate_interval": f"{math.ceil(rate_interval)}s", "__interval": f"{math.ceil(step_seconds)}s"}
    every = {**values, **macros}

    def replace(match: re.Match[str]) -> str:
        name = match[1] or match[2]
        assert name in every, f"unknown dashboard variable ${name} in {expr}"
        return every[name]

    out = re.sub(r"\$\{(\w+)\}|\$(\w+)", replace, expr)
    assert "$" not in out, out
    return out


def test_dashboard_is_well_formed() -> None:
    nested = [p for row in DASHBOARD["panels"] if row["type"] == "row" for p in row.get("panels", [])]
    ids = [p["id"] for p in DASHBOARD["panels"] + nested]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert {p["title"] for p in panels()} >= REQUIRED_PANELS
    for panel in panels():
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        assert panel.get("description"), f"{panel['title']}: say what the panel shows"
    assert {v["name"] for v in DASHBOARD["templating"]["list"]} == {"datasource", "namespace", "job", "smoothing"}
    assert DASHBOARD["uid"] and len(DASHBOARD["uid"]) <= 40
    loss = next(p for p in panels() if p["title"] == "Loss")
    exprs = [t["expr"] for t in loss["targets"]]
    assert any(e.startswith("max by (job_namespace, job_name) (kontext_train_loss{") for e in exprs), "raw"
    assert any("avg_over_time(kontext_train_loss{" in e for e in exprs), "smoothed over the window"
    assert any("kontext_train_loss_ema{" in e for e in exprs), "the trainer's moving average, as in status"


# --- real processes, scraped -----------------------------------------------------------------------------------


@dataclass
class Run:
    start: float
    end: float
    values: dict[str, str]


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    server = PrometheusServer(tmp_path_factory.mktemp("prometheus"), scrape_interval="1s").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def operator_run(crd: Cluster, prometheus: PrometheusServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    """A real operator watching a namespace with three KontextLoRAJobs (one suspended), scraped by Prometheus."""
    namespace = f"dash-{uuid.uuid4().hex[:6]}"
    crd.kubectl("create", "namespace", namespace)
    identity = OperatorIdentity.install(crd.plane)
    operator = OperatorProcess(tmp_path_factory.mktemp("operator"), identity.kubeconfig, [namespace])
    start = time.time()
    operator.start()
    try:
        prometheus.add_target("operator", f"127.0.0.1:{operator.metrics_port}")
        prometheus.wait_targets_up("operator")
        for index, suspend in enumerate((False, False, True)):
            job = {
                "apiVersion": "kontext-lora.io/v1alpha1",
                "kind": "KontextLoRAJob",
                "metadata": {"name": f"dash-{index}"},
                "spec": {
                    "dataset": {"uri": "s3://loras-data/dash/", "triggerWord": "XM,", "defaultCaption": "edit"},
                    "training": {"steps": 100},
                    "checkpoints": {"saveEvery": 50},
                    "output": {"uri": "s3://loras-out/dash/"},
                    "suspend": suspend,
                },
            }
            crd.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(job))
        wait_for(
            lambda: sum(operator.metric_value("kontext_operator_jobs", phase=p.value) or 0 for p in Phase) == 3,
            timeout=60,
            what=f"the operator counting 3 jobs:\n{operator.log_tail()}",
        )
        time.sleep(3 * prometheus.scrape_seconds)  # a few scrapes of the final counts
        yield Run(start, time.time(), {"namespace": namespace})
    finally:
        operator.stop()
        crd.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def _trainer_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def training_run(prometheus: PrometheusServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    """A real training run of the tiny model on CPU with its metrics endpoint scraped every second."""
    from kontext_trainer.data.synthetic import write_example_pairs
    from kontext_trainer.demo import ensure_tiny_model

    root = tmp_path_factory.mktemp("training")
    model = ensure_tiny_model()  # `kontext-lora tiny-model`, built once into ~/.cache/kontext-lora/models
    data = write_example_pairs(root / "pairs", count=6)
    name = "dash-lora"
    job = {
        "apiVersion": "kontext-lora.io/v1alpha1",
        "kind": "KontextLoRAJob",
        "metadata": {"name": name, "namespace": "local"},
        "spec": {
            "model": {"base": f"file://{model}", "dtype": "fp32"},
            "dataset": {
                "uri": f"file://{data}",
                "triggerWord": "XM,",
                "defaultCaption": "remove the coloured shape",
                "resolution": 512,
                "heldOutPairs": 1,
            },
            "lora": {"rank": 8},
            "training": {"steps": 40, "learningRate": 1.0e-3, "warmupSteps": 5, "gradientCheckpointing": False},
            "checkpoints": {"saveEvery": 10, "keep": 2},
            "output": {"uri": f"file://{root / 'out'}"},
        },
    }
    job_file = root / "job.yaml"
    job_file.write_text(yaml.safe_dump(job))
    port = free_port()
    log = (root / "train.log").open("w")
    start = time.time()
    process = subprocess.Popen(
        [KONTEXT_LORA, "train", str(job_file), "--metrics-port", str(port), "--work-dir", str(root / "work")],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=_trainer_env(),
    )
    try:
        prometheus.add_target("trainer", f"127.0.0.1:{port}")
        prometheus.wait_targets_up("trainer", timeout=120)
        code = process.wait(timeout=600)
        assert code == 0, f"training failed ({code}):\n{(root / 'train.log').read_text()[-4000:]}"
        yield Run(start, time.time(), {"job": name})
    finally:
        if process.poll() is None:
            process.kill()
        log.close()


def _evaluate(prometheus: PrometheusServer, run: Run, panel: dict[str, Any], values: dict[str, str]) -> list[str]:
    """Every target of a panel over the run, as a Grafana time-series panel asks for it; returns a summary."""
    step = 1.0
    summary = []
    for target in panel["targets"]:
        expr = grafana_expr(target["expr"], values, prometheus.scrape_seconds, step)
        series: list[Series] = prometheus.query_range(expr, run.start, run.end + 2, step)
        assert series, f"panel {panel['title']!r} ({target['refId']}) returned no data: {expr}"
        finite = [s for s in series if s.finite]
        assert finite, f"panel {panel['title']!r} ({target['refId']}) returned only NaN/Inf: {expr}"
        for s in finite:
            labels = {k: v for k, v in s.metric.items() if k in ("job_name", "phase")}
            summary.append(
                f"{panel['title']} [{target['refId']}] {labels}: {len(s.finite)} points, last {s.finite[-1]:.6g}"
            )
    return summary


def _operator_panel(panel: dict[str, Any]) -> bool:
    return all(any(m in t["expr"] for m in OPERATOR_METRICS) for t in panel["targets"])


def test_training_panels_return_data(prometheus: PrometheusServer, training_run: Run) -> None:
    smoothing = variable("smoothing")["options"][0]["value"]  # the shortest window the dashboard offers
    values = {"namespace": ".*", "job": training_run.values["job"], "smoothing": smoothing}
    summary = []
    for panel in panels():
        if not _operator_panel(panel):
            summary += _evaluate(prometheus, training_run, panel, values)
    print("\n" + "\n".join(summary))
    assert {line.split(" [")[0] for line in summary} >= REQUIRED_PANELS - {"Jobs by phase"}


def test_variable_queries_list_the_training_run(prometheus: PrometheusServer, training_run: Run) -> None:
    for name, label in (("namespace", "job_namespace"), ("job", "job_name")):
        query = variable(name)["query"]["query"]
        match = re.fullmatch(r"label_values\((?:(.+), )?(\w+)\)", query)
        assert match and match[2] == label, query
        selector = grafana_expr(match[1], {"namespace": ".*"}, prometheus.scrape_seconds, 1.0)
        listed = prometheus.label_values(label, selector)
        assert listed, f"${name} would list nothing ({query})"
        if name == "job":
            assert training_run.values["job"] in listed


def test_loss_and_progress_panels_show_the_run_as_it_happened(prometheus: PrometheusServer, training_run: Run) -> None:
    selector = f'job_name="{training_run.values["job"]}"'
    steps = prometheus.query_range(f"kontext_train_step{{{selector}}}", training_run.start, training_run.end, 1)
    assert steps and max(steps[0].finite) == 40, "the step gauge did not reach the run's 40 steps"
    total = prometheus.query(f"max_over_time(kontext_train_total_steps{{{selector}}}[10m])", at=training_run.end)
    assert total and total[0].values[0][1] == 40
    saved = prometheus.query(
        f"max_over_time(kontext_train_checkpoints_saved_total{{{selector}}}[10m])", at=training_run.end
    )
    assert saved and saved[0].values[0][1] >= 3, "checkpoints every 10 of 40 steps"


def test_jobs_by_phase_panel_counts_the_operators_jobs(prometheus: PrometheusServer, operator_run: Run) -> None:
    panel = next(p for p in panels() if p["title"] == "Jobs by phase")
    summary = _evaluate(prometheus, operator_run, panel, {"namespace": ".*", "job": ".*", "smoothing": "1m"})
    print("\n" + "\n".join(summary))
    expr = grafana_expr(panel["targets"][0]["expr"], {}, prometheus.scrape_seconds, 1.0)
    last = prometheus.query(expr, at=operator_run.end)
    by_phase = {s.metric["phase"]: s.values[0][1] for s in last}
    assert set(by_phase) == {p.value for p in Phase}, "every phase is a series, zeros included"
    assert sum(by_phase.values()) == 3 and by_phase["Suspended"] == 1, by_phase
