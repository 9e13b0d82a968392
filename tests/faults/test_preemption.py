"""Preemption: one real training job, its trainer killed four times at seeded-random steps, once in each way pods die —
SIGKILL of the process by the node (OOM kill, node loss), `kubectl delete pod` (graceful and forced) and an eviction
through the API (the way preemption and node drains remove pods). Each time the Job starts a new pod, the trainer
resumes from the newest complete checkpoint in S3 and loses at most `saveEvery` steps — none at all when it was
stopped gracefully (SIGTERM with the pod's 120 s grace period: it saves a checkpoint at the step reached, reports it
in the status and exits 143). The job finishes with the final LoRA and exactly `keep` complete checkpoints, nothing
half-written, and `status.restarts` counting the failures that spend backoffLimit (evictions carry the
DisruptionTarget condition and do not). A forced deletion gives the trainer 1 s of SIGTERM, as a kubelet does: it
may or may not save.

Each failed pod is replaced after the Job controller's back-off (10 s, doubling with every failed pod of the Job, the
eviction's too): a fifth kill would wait 160 s for its pod, so each way of dying is tried once (2.7 min, not 6)."""

from __future__ import annotations

import itertools
import json
import random
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import Cluster
from tests.infra.klj import Kljs
from tests.infra.node_agent import NodeAgent
from tests.infra.operator_process import OperatorProcess
from tests.trainer.helpers import job_document, run_cli, trainer_env, write_job

from .support import (
    FaultStore,
    StepWatcher,
    checkpoints,
    keys,
    record,
    resumed_from,
    scan_for,
    seed,
    wait_until,
)

pytestmark = [pytest.mark.cluster, pytest.mark.s3, pytest.mark.e2e, pytest.mark.slow]

STEPS, SAVE_EVERY, KEEP = 32, 4, 2
KILLS = ("sigkill", "delete", "force-delete", "evict")
COUNTED = {"sigkill", "delete", "force-delete"}  # failures that spend backoffLimit (evict: DisruptionTarget -> Ignore)
GRACEFUL = {"delete", "evict"}  # SIGTERM with the pod's terminationGracePeriodSeconds: a checkpoint, no step lost


class ConcurrentTrainers(threading.Thread):
    """The most trainer processes of one namespace the node agent ever ran at once (must stay 1)."""

    def __init__(self, agent: NodeAgent, namespace: str):
        super().__init__(daemon=True)
        self.agent, self.namespace = agent, namespace
        self.most = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.05):
            running = [p for p in list(self.agent.pods.values()) if p.namespace == self.namespace and p.process]
            self.most = max(self.most, len(running))


def test_a_kill_of_each_kind_at_random_steps_loses_at_most_save_every(
    crd: Cluster,
    kljs: Kljs,
    operator: OperatorProcess,
    agent: NodeAgent,
    store: FaultStore,
) -> None:
    fault_seed = seed(8)
    rng = random.Random(fault_seed)
    kinds = list(KILLS)
    rng.shuffle(kinds)
    # One kill point in each quarter of steps 2..26 (the last kill leaves steps to train after it).
    bounds = [2 + (STEPS - 8) * i // len(kinds) for i in range(len(kinds) + 1)]
    targets = [rng.randrange(low, high) for low, high in itertools.pairwise(bounds)]
    print(f"kill plan: {list(zip(kinds, targets, strict=True))}")

    name, prefix = "preempted", "preempted/"
    client = store.client()
    store.upload_pairs()
    store.create_secret(kljs)
    job = store.job(
        name,
        steps=STEPS,
        save_every=SAVE_EVERY,
        keep=KEEP,
        backoff_limit=10,
    )
    watcher = StepWatcher(int(agent.env_overrides["KONTEXT_LORA_METRICS_PORT"]))
    watcher.start()
    concurrency = ConcurrentTrainers(agent, kljs.namespace)
    concurrency.start()
    kljs.apply(job)

    kills: list[dict] = []
    pods_seen: list[str] = []
    died_at = 0.0

    def new_running_pod() -> str | None:
        for pod in reversed(kljs.pods(name)):
            metadata = pod["metadata"]
            if pod["status"].get("phase") == "Running" and not metadata.get("deletionTimestamp"):
                return metadata["name"] if metadata["name"] not in pods_seen else None
        return None

    for kind, target in zip(kinds, targets, strict=True):
        pod = wait_until(new_running_pod, 600, "a new trainer pod")
        pods_seen.append(pod)
        agent.wait_process(kljs.namespace, pod, timeout=60)
        started = time.monotonic()
        watcher.wait_step(1, timeout=600)  # the trainer logs where it resumed before its first step
        resume = resumed_from(agent, kljs.namespace, pod)
        if kills:
            kills[-1].update(resume_step=resume, restart_seconds=round(started - died_at, 1))
        kill_at = watcher.wait_step(max(target, resume + 1), timeout=600)

        if kind == "sigkill":
            agent.kill_pod(kljs.namespace, pod)
        elif kind == "delete":
            crd.kubectl("delete", "pod", pod, "-n", kljs.namespace, "--wait=false")
        elif kind == "force-delete":
            crd.kubectl("delete", "pod", pod, "-n", kljs.namespace, "--grace-period=0", "--force", "--wait=false")
        else:
            eviction = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": pod}}
            kljs.core.create_namespaced_pod_eviction(pod, kljs.namespace, eviction)
        wait_until(lambda pod=pod: agent.find(kljs.namespace, pod) is None, 60, f"{pod}'s trainer to die")
        died_at = time.monotonic()
        last_seen = watcher.step or 0
        watcher.reset()
        at_kill = checkpoints(client, store.bucket, prefix)
        # The last step the metrics endpoint showed, or later: a checkpoint's files (even partial) mean its step
        # was done (a graceful deletion's SIGTERM lands a moment after the kill was asked for).
        kill_step = max(last_seen, kill_at, *at_kill.files)
        saved = f"stopped by SIGTERM after step {kill_step}/{STEPS}: checkpoint" in agent.pod_log(kljs.namespace, pod)
        kills.append(
            {
                "kind": kind,
                "target_step": target,
                "kill_step": kill_step,
                "newest_complete_at_kill": at_kill.newest_complete,
                "partial_at_kill": at_kill.partial,
                "saved_on_sigterm": saved,
            }
        )
        if kind in GRACEFUL:
            # The trainer saved the step it reached and reported it before exiting (the next pod is >= 10 s away).
            assert saved and at_kill.newest_complete == kill_step, (kind, kill_step, at_kill, last_seen)
            reported = kljs.status(name)
            assert reported["step"] == kill_step, reported
            assert f"/checkpoints/step-{kill_step:06d}/" in reported["lastCheckpoint"], reported
        print(f"{kind} of {pod} at step {kill_step}: complete {at_kill.complete}, partial {at_kill.partial}")

    # The last pod resumes once more and finishes.
    last = wait_until(new_running_pod, 600, "the last trainer pod")
    agent.wait_process(kljs.namespace, last, timeout=600)
    started = time.monotonic()
    watcher.wait_step(1, timeout=600)
    kills[-1].update(resume_step=resumed_from(agent, kljs.namespace, last), restart_seconds=round(started - died_at, 1))
    status = kljs.wait_phase(name, "Succeeded", timeout=600)
    watcher.stopped.set()
    concurrency.stopped.set()

    for kill in kills:
        kill["lost_steps"] = kill["kill_step"] - kill["resume_step"]
    print(json.dumps(kills, indent=1))
    for kill in kills:
        assert kill["resume_step"] == kill["newest_complete_at_kill"], f"resumed elsewhere than the newest: {kill}"
        assert 0 <= kill["lost_steps"] <= SAVE_EVERY, f"lost more than saveEvery: {kill}"
        if kill["kind"] in GRACEFUL:
            assert kill["lost_steps"] == 0, f"a graceful stop lost steps: {kill}"

    # Finished, with exactly `keep` complete checkpoints, the LoRA, and nothing half-written.
    final = checkpoints(client, store.bucket, prefix)
    assert final.complete == [STEPS - SAVE_EVERY, STEPS] and not final.partial, final
    objects = keys(client, store.bucket, prefix)
    assert f"{prefix}{name}.safetensors" in objects
    assert status["step"] == STEPS and sorted(c["step"] for c in status["checkpoints"]) == final.complete

    counted = sum(kind in COUNTED for kind in kinds)
    [batch] = kljs.jobs(name)
    assert batch["status"].get("failed", 0) == counted, batch["status"]
    assert status["restarts"] == counted, status
    assert len({*pods_seen, last}) == len(kinds) + 1
    restarting = [e for e in kljs.events(name) if e["reason"] == "Restarting"]
    assert sum(e.get("count") or 1 for e in restarting) == counted, [(e["type"], e["message"][:90]) for e in restarting]
    assert all(e["type"] == "Warning" for e in restarting)
    assert concurrency.most == 1, "podReplacementPolicy: Failed keeps a second trainer off the same checkpoints"

    logs = {pod: agent.pod_log(kljs.namespace, pod) for pod in [*pods_seen, last]}
    assert not scan_for(store.secrets, logs)
    record(
        "preemption",
        seed=fault_seed,
        kills=kills,
        steps=STEPS,
        save_every=SAVE_EVERY,
        keep=KEEP,
        lost_steps_total=sum(k["lost_steps"] for k in kills),
        lost_steps_max=max(k["lost_steps"] for k in kills),
        lost_steps_graceful=[k["lost_steps"] for k in kills if k["kind"] in GRACEFUL],
        restarts=status["restarts"],
        counted_failures=counted,
        checkpoints_kept=final.complete,
        partial_checkpoints_left=len(final.partial),
    )


def test_a_restart_that_finds_more_than_keep_checkpoints_rotates_them(
    tiny_model: Path, pairs_dir: Path, tmp_path: Path
) -> None:
    """A trainer killed between publishing a checkpoint and rotating the oldest out leaves keep + 1 complete
    checkpoints (the preemption test sees it happen). The next run must not carry that on to the end: with nothing
    left to train after the final checkpoint, it would never rotate again."""
    output = tmp_path / "out"

    def run(keep: int):
        document = job_document(
            "rotate",
            str(tiny_model),
            f"file://{pairs_dir}",
            f"file://{output}/",
            training={"steps": 6},
            checkpoints={"saveEvery": 2, "keep": keep},
        )
        document["spec"]["dataset"]["heldOutPairs"] = 0
        job = write_job(tmp_path / f"keep-{keep}.yaml", document)
        env = trainer_env(KONTEXT_LORA_PREVIEW_STEPS="0")
        return run_cli(["train", str(job), "--work-dir", str(tmp_path / "work")], env, tmp_path / f"keep-{keep}.log")

    def complete() -> list[int]:
        return sorted(int(p.parent.name.removeprefix("step-")) for p in output.glob("checkpoints/step-*/COMPLETE"))

    first = run(keep=3)  # what a kill between saving step 6 and rotating leaves when keep is 2
    assert first.code == 0, first.output[-3000:]
    assert complete() == [2, 4, 6]
    second = run(keep=2)
    assert second.code == 0, second.output[-3000:]
    assert "rotating out checkpoint" in second.output and "(step 6)" in second.output, second.output[-3000:]
    assert complete() == [4, 6] and not list(output.glob("checkpoints/step-000002"))
    record("keep-after-kill-between-save-and-rotate", checkpoints_before=[2, 4, 6], checkpoints_after=complete())
