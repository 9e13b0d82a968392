"""The Kubernetes API server goes away for 35 s while a job trains, then comes back.

A control-plane upgrade, an etcd hiccup or a load balancer in front of the apiserver does this to real clusters. The
trainer does not need the apiserver to train: only its status reports fail (logged, retried, never fatal), and it
keeps training through the outage. Once the apiserver is back, status catches up within seconds (the next report
carries every field), the operator's watches (kopf's of the KontextLoRAJobs, its own of Jobs and pods) resume —
shown by a spec change after the outage reaching the live Job and by the job's end being noticed —, no Job is made
twice, and the job succeeds without a restart. Everything is real: kube-apiserver is the process the session fixture
started (stopped with SIGTERM, SIGKILL after 2 s, started again with the same flags), the operator, node agent,
trainer and MinIO; etcd, the controller manager, the scheduler and KWOK keep running and reconnect by themselves.
The shared control plane is restored before the test ends, whatever happens, and the test waits until the controller
manager and the scheduler act on new objects again (their informers re-list after a backoff the outage grew).
"""

from __future__ import annotations

import time

import pytest

from tests.conftest import Cluster
from tests.infra.klj import PREPARE, Kljs
from tests.infra.node_agent import NodeAgent
from tests.infra.operator_process import OperatorProcess
from tests.infra.watch import Recorder

from .support import FaultStore, StepWatcher, log_records, record, wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.s3, pytest.mark.slow]

OUTAGE_SECONDS = 35
# Long enough to train through the outage at up to ~9 steps/s (this machine: 3-7, by its load); the steps left after the
# return overlap the controller manager's re-list back-off, which the job's end waits for anyway.
STEPS, SAVE_EVERY = 400, 100


def test_training_rides_out_an_apiserver_outage_and_status_catches_up(
    crd: Cluster, kljs: Kljs, operator: OperatorProcess, agent: NodeAgent, store: FaultStore
) -> None:
    plane = crd.plane
    store.create_secret(kljs)
    store.upload_pairs()
    name = "outage"
    recorder = Recorder(crd.api_client(), kljs.namespace, "jobs", label_selector=f"kontext-lora.io/job={name}").start()
    watcher = StepWatcher(int(agent.env_overrides["KONTEXT_LORA_METRICS_PORT"]))
    watcher.start()
    kljs.apply(store.job(name, steps=STEPS, save_every=SAVE_EVERY, keep=2))
    try:
        kljs.wait_status(name, lambda s: s.get("phase") == "Training" and (s.get("step") or 0) >= 3, 300, "training")
        before = watcher.wait_step(3, 60)

        # ---- the outage: SIGTERM (kube-apiserver cuts its watches at once), SIGKILL if it has not exited 2 s later,
        # then gone for OUTAGE_SECONDS ----
        stop_seconds = plane.stop_apiserver(grace=2)
        down_at = time.monotonic()
        steps_during: list[tuple[float, int | None]] = [(0.0, watcher.step)]
        while time.monotonic() - down_at < OUTAGE_SECONDS:
            time.sleep(2)
            steps_during.append((round(time.monotonic() - down_at, 1), watcher.step))
        ready_seconds = plane.start_apiserver()
        up_at = time.monotonic()
        at_return = watcher.step or 0
        assert at_return < STEPS, f"the job ended during the outage (step {at_return}): give it more steps"

        # ---- the return ----
        # Status catches up: the trainer's next report carries the step it reached (reports are every 5 s).
        kljs.wait_status(name, lambda s: (s.get("step") or 0) >= at_return, 30, f"status step >= {at_return}")
        caught_up = time.monotonic() - up_at
        # kopf's watch of the jobs is back: a spec change now reaches the live Job (runPolicy applies in place).
        kljs.patch_spec(name, {"runPolicy": {"backoffLimit": 5}})
        wait_until(lambda: kljs.jobs(name)[0]["spec"]["backoffLimit"] == 5, 60, "the new backoffLimit on the Job")
        spec_applied = time.monotonic() - up_at
        # The operator's own Job and pod watches are back: it sees the job end.
        status = kljs.wait_phase(name, "Succeeded", timeout=600)
        finished = time.monotonic() - up_at
    finally:
        if not plane.apiserver.running:
            plane.start_apiserver()  # later tests share this control plane
        # ... and expect its controllers to act at once: wait out their informers' re-list backoff.
        controllers_seconds = plane.wait_controllers_caught_up()
        watcher.stopped.set()
        recorder.stop()

    # The trainer trained through the outage, never restarted, and its failed reports were only warnings.
    progress = [step for _, step in steps_during if step is not None]
    assert progress and progress[-1] > before + 5, f"no training during the outage: {steps_during}"
    pods = kljs.pods(name)
    assert len(pods) == 1 and status["restarts"] == 0, [p["metadata"]["name"] for p in pods]
    trainer = pods[0]["metadata"]["name"]
    warnings = [r for r in log_records(agent, kljs.namespace, trainer) if "could not report status" in r["message"]]
    errors = [r for r in log_records(agent, kljs.namespace, trainer) if r.get("level") in ("error", "critical")]
    assert warnings and not errors, errors
    assert status["step"] == STEPS and status["loraUri"].endswith(f"{name}.safetensors")
    # Exactly one preparation Job and one GPU Job, each created once.
    assert len(kljs.jobs(name)) == 1 and len(kljs.jobs(name, role=PREPARE)) == 1
    assert len(recorder.uids(f"{name}-trainer")) == 1 and len(recorder.uids(f"{name}-prepare")) == 1
    operator_log = operator.log_path.read_text(errors="replace")
    reconnects = operator_log.count("reconnecting in")
    assert reconnects >= 2, "the operator's Job and pod watches reconnected"
    assert operator.running
    record(
        "apiserver-outage",
        outage_s=OUTAGE_SECONDS,
        apiserver_sigterm_to_exit_s=round(stop_seconds, 1),
        apiserver_ready_after_start_s=round(ready_seconds, 1),
        trainer_step_before=before,
        trainer_step_at_return=at_return,
        trainer_steps_during_outage=steps_during,
        status_caught_up_after_s=round(caught_up, 1),
        spec_change_applied_after_s=round(spec_applied, 1),
        succeeded_after_return_s=round(finished, 1),
        controllers_acting_again_at_end_s=round(controllers_seconds, 1),
        status_report_warnings=len(warnings),
        operator_watch_reconnect_lines=reconnects,
        jobs_created={"preparation": 1, "trainer": 1},
        restarts=status["restarts"],
    )
