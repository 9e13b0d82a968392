"""Operator crashes: the operator is SIGKILLed ten times at seeded-random moments while it reconciles 20 jobs —
in the middle of bursts of creates, while trainer pods end (some fail and are retried) — and restarted each time,
with a second, peered replica standing by the whole time. Checked continuously and at the end: never two batch Jobs
for one KontextLoRAJob, no job left without a status, only one replica ever acts, and every job finishes.

The pods run on KWOK GPU nodes; the test ends each one by annotating it (`kwok.kontext-lora.io/exit-code`), so 20
jobs cost no real training.
"""

from __future__ import annotations

import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable

import pytest
import yaml

from tests.conftest import Cluster
from tests.infra.klj import PREPARE, Kljs, job_manifest
from tests.infra.kwok import EXIT_CODE_ANNOTATION
from tests.infra.operator_process import OperatorProcess
from tests.infra.processes import wait_for
from tests.infra.watch import Recorder

from .support import record, seed

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

JOBS, KILLS = 20, 10
GPU_CLASSES = ("L40S-48GB", "RTX4090-48GB")  # 8 + 4 KWOK GPUs for 20 jobs: some wait for a GPU, as in real life


class Invariants(threading.Thread):
    """Lists the namespace's batch Jobs and KontextLoRAJobs three times a second and remembers every violation:
    two live Jobs of one role (preparation, GPU) owned by one KontextLoRAJob, and how long each job went without a
    status phase."""

    def __init__(self, kljs: Kljs):
        super().__init__(daemon=True)
        self.kljs = kljs
        self.violations: list[str] = []
        self.first_phase: dict[str, float] = {}
        self.created: dict[str, float] = {}
        self.most_jobs_per_owner = 0
        self.stopped = threading.Event()

    def check(self) -> None:
        owners: dict[tuple[str, str], list[str]] = defaultdict(list)
        for role in ("train", PREPARE):
            for job in self.kljs.jobs(role=role):
                if job["metadata"].get("deletionTimestamp"):
                    continue
                for reference in job["metadata"].get("ownerReferences") or []:
                    owners[(reference["uid"], role)].append(job["metadata"]["name"])
        for uid, names in owners.items():
            self.most_jobs_per_owner = max(self.most_jobs_per_owner, len(names))
            if len(names) > 1:
                self.violations.append(f"owner {uid} has Jobs {names}")
        items = self.kljs.custom.list_namespaced_custom_object(
            "kontext-lora.io", "v1alpha1", self.kljs.namespace, "kontextlorajobs"
        )["items"]
        now = time.monotonic()
        for item in items:
            name = item["metadata"]["name"]
            self.created.setdefault(name, now)
            if (item.get("status") or {}).get("phase"):
                self.first_phase.setdefault(name, now)

    def run(self) -> None:
        while not self.stopped.wait(0.3):
            try:
                self.check()
            except Exception as error:  # an apiserver hiccup is not a violation; the next round checks again
                print(f"invariant check skipped: {error}")

    def seconds_without_status(self) -> dict[str, float]:
        now = time.monotonic()
        return {name: self.first_phase.get(name, now) - created for name, created in self.created.items()}


def standby_paused(log: str) -> bool:
    """Paused in favour of a higher priority: kopf's KontextLoRAJob watch-stream blocked, and the operator's own
    peering gate (which guards the writes its Job and pod watches trigger) closed. kopf's pause is best-effort
    until then: a listing already in flight is still handled (seen here: a standby started just before the active
    created two Jobs from such a listing; the active adopted them, so there was still one Job per job)."""
    after = log.split("Pausing operations in favour of", 1)
    return (
        len(after) == 2
        and "Pausing the watch-stream for kontextlorajobs.v1alpha1.kontext-lora.io" in after[1]
        and "pausing the Job and pod watches' writes" in log
    )


def end_pod(cluster: Cluster, namespace: str, pod: str, code: int) -> None:
    cluster.kubectl("annotate", "pod", pod, "-n", namespace, f"{EXIT_CODE_ANNOTATION}={code}", "--overwrite")


def running_pods(kljs: Kljs) -> list[dict]:
    # Trainer pods (KWOK ends the preparation pods by itself, tests/infra/kwok-stages).
    selector = "kontext-lora.io/job,kontext-lora.io/role!=prepare"
    pods = kljs.core.list_namespaced_pod(kljs.namespace, label_selector=selector).items
    return [
        kljs.api.sanitize_for_serialization(p)
        for p in pods
        if p.status.phase == "Running"
        and not p.metadata.deletion_timestamp
        and EXIT_CODE_ANNOTATION not in (p.metadata.annotations or {})
    ]


def test_operator_killed_ten_times_while_reconciling_twenty_jobs(
    crd: Cluster, kljs: Kljs, start_operator: Callable[..., OperatorProcess]
) -> None:
    fault_seed = seed(20)
    rng = random.Random(fault_seed)
    peering = f"crash-{kljs.namespace}"
    peering_object = {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": peering}}
    crd.kubectl("apply", "-f", "-", input=yaml.safe_dump(peering_object))
    api = crd.api_client()
    recorder = Recorder(api, kljs.namespace, "jobs").start()
    invariants = Invariants(kljs)
    try:
        standby = start_operator(standalone=False, peering=peering, priority=1)
        active = start_operator(standalone=False, peering=peering, priority=100)
        wait_for(lambda: standby_paused(standby.log_path.read_text()), what="the standby to pause")
        paused_at = len(standby.log_path.read_text())
        invariants.start()

        names = [f"crash-{i:02d}" for i in range(JOBS)]
        crashes: dict[str, int] = defaultdict(int)  # pods ended with exit code 1 (retried by the Job), per job
        kill_moments: list[dict] = []
        per_round = JOBS // KILLS
        for round_ in range(KILLS):
            burst = names[round_ * per_round : (round_ + 1) * per_round]
            documents = [
                job_manifest(n, resources={"gpu": rng.choice(GPU_CLASSES), "cpu": "1", "memory": "1Gi"}) for n in burst
            ]
            kljs.plane.kubectl("apply", "-n", kljs.namespace, "-f", "-", input=yaml.safe_dump_all(documents))
            delay = rng.uniform(0, 1.2)  # a random point while the operator reconciles the burst
            time.sleep(delay)
            active.kill()
            # While it is down, trainer pods end: most succeed, some crash (the Job retries them).
            ended = []
            candidates = running_pods(kljs)
            for pod in rng.sample(candidates, k=min(2, len(candidates))):
                job = pod["metadata"]["labels"]["kontext-lora.io/job"]
                code = 1 if rng.random() < 0.3 and crashes[job] == 0 else 0
                crashes[job] += code
                end_pod(crd, kljs.namespace, pod["metadata"]["name"], code)
                ended.append((job, code))
            down = rng.uniform(0, 0.5)
            time.sleep(down)
            active.priority = 100 + round_ + 1  # outranks its own dead predecessor's peering record
            active.start()
            kill_moments.append({"after_apply_s": round(delay, 2), "down_s": round(down, 2), "pods_ended": ended})
        restarted = time.monotonic()

        # Every job has a status soon after the last restart...
        wait_for(lambda: len(invariants.first_phase) == JOBS, timeout=60, what="a status phase on every job")
        status_after_restart = max(0.0, max(invariants.first_phase.values()) - restarted)

        # ... and every job finishes once its pods do.
        def all_succeeded() -> bool:
            for pod in running_pods(kljs):
                end_pod(crd, kljs.namespace, pod["metadata"]["name"], 0)
            return all(kljs.status(n).get("phase") == "Succeeded" for n in names)

        wait_for(all_succeeded, timeout=300, interval=1, what="all 20 jobs to succeed")
        finished = time.monotonic() - restarted
        invariants.stopped.set()
        invariants.join()
        invariants.check()
    finally:
        recorder.stop()
        invariants.stopped.set()
        crd.kubectl("delete", "clusterkopfpeering", peering, "--wait=false", check=False)

    assert not invariants.violations, invariants.violations
    for name in names:
        for job in (f"{name}-prepare", f"{name}-trainer"):
            created = recorder.added(job)
            assert len(created) == 1, f"{job} was created {len(created)} times"
        status = kljs.status(name)
        assert status["restarts"] == crashes[name], (name, status, crashes[name])
        job_created = [e for e in kljs.events(name) if e["reason"] == "JobCreated"]
        assert len(job_created) <= 1, f"{name}: {len(job_created)} JobCreated events"
    without_status = invariants.seconds_without_status()
    assert max(without_status.values()) < 30, without_status

    # Only the active replica ever acted: no Event of the standby, which stayed paused.
    instances = {e.get("reportingInstance") for n in names for e in kljs.events(n)}
    assert not {i for i in instances if i and i.startswith(f"{standby.name}-")}, instances
    after_pause = standby.log_path.read_text()[paused_at:]
    assert "Resuming operations after the pause" not in after_pause, "the standby took over while the active lived"
    assert "resuming the Job and pod watches' writes" not in after_pause, "the standby's peering gate opened"
    verbs = ('"POST /', '"PATCH /', '"PUT /', '"DELETE /')
    writes = [
        line
        for line in after_pause.splitlines()
        if any(verb in line for verb in verbs) and "clusterkopfpeerings" not in line
    ]
    assert not writes, f"the paused standby wrote to the API: {writes[:5]}"
    assert active.starts == KILLS + 1

    record(
        "operator-crashes",
        seed=fault_seed,
        jobs=JOBS,
        kills=KILLS,
        kill_moments=kill_moments,
        jobs_per_owner_max=invariants.most_jobs_per_owner,
        job_creations_per_job=1,
        crashed_pods=sum(crashes.values()),
        max_seconds_without_status=round(max(without_status.values()), 1),
        status_on_all_jobs_after_last_restart_s=round(status_after_restart, 1),
        all_succeeded_after_last_restart_s=round(finished, 1),
        standby_events=0,
    )
