"""Status derivation: the phase, reason, message and conditions users read, from the Job, its pods and the trainer."""

from __future__ import annotations

from kontext_operator.status import (
    desired_status,
    invalid_spec,
    observe,
    status_patch,
    transitions,
    trim_job,
    trim_pod,
)

from kontext_lora.api import Phase

T0 = "2026-01-01T10:00:00Z"
T1 = "2026-01-01T10:05:00Z"


def job(conditions=(), suspend=False, **status) -> dict:
    body = {
        "metadata": {"name": "j-trainer", "uid": "job-uid", "ownerReferences": [{"uid": "cr-uid"}]},
        "spec": {"suspend": suspend, "backoffLimit": 3, "activeDeadlineSeconds": 600},
        "status": {"conditions": [{"type": t, "status": "True", **extra} for t, extra in conditions], **status},
    }
    return trim_job(body)


def pod(name="j-trainer-abc", phase="Running", created=T0, state=None, conditions=(), node="gpu-1") -> dict:
    body = {
        "metadata": {
            "name": name,
            "uid": name,
            "creationTimestamp": created,
            "labels": {"batch.kubernetes.io/controller-uid": "job-uid"},
        },
        "spec": {"nodeName": node},
        "status": {
            "phase": phase,
            "startTime": created,
            "conditions": list(conditions),
            "containerStatuses": [{"name": "trainer", "state": state or {"running": {"startedAt": created}}}],
        },
    }
    return trim_pod(body)


def terminated(code: int, message: str = "", finished: str = T1) -> dict:
    return {"terminated": {"exitCode": code, "message": message, "reason": "Error", "finishedAt": finished}}


def test_no_job_yet_is_pending() -> None:
    obs = observe(None, [], {}, suspend=False)
    assert obs.phase == Phase.Pending and obs.reason == "Creating"


def test_job_deleted_after_it_existed_is_reported() -> None:
    status = {"phase": "Training", "jobName": "j-trainer", "conditions": [{"type": "Created", "status": "True"}]}
    obs = observe(None, [], status, suspend=False)
    assert obs.phase == Phase.Pending and obs.reason == "JobMissing" and "j-trainer" in obs.message


def test_finished_verdict_survives_the_job_being_gone() -> None:
    status = {"phase": "Succeeded", "reason": "Completed", "message": "done", "completionTime": T1}
    obs = observe(None, [], status, suspend=False)
    assert obs.phase == Phase.Succeeded and obs.completion_time == T1


def test_unschedulable_pod_shows_the_schedulers_reason() -> None:
    message = "0/7 nodes are available: 4 Insufficient nvidia.com/gpu, 3 node(s) didn't match affinity."
    scheduled = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}
    waiting_pod = pod(phase="Pending", node=None, conditions=[scheduled], state={"waiting": {}})
    obs = observe(job(active=1), [waiting_pod], {}, suspend=False)
    assert obs.phase == Phase.Pending and obs.reason == "Unschedulable"
    assert message in obs.message
    status = desired_status({}, obs, job_name="j-trainer", generation=1, now=T0)
    running = next(c for c in status["conditions"] if c["type"] == "Running")
    assert running["status"] == "False" and running["reason"] == "Unschedulable" and message in running["message"]
    events = transitions({}, status)
    assert events[0].type == "Warning" and events[0].reason == "Unschedulable"


def test_container_config_error_is_shown() -> None:
    waiting = {"waiting": {"reason": "CreateContainerConfigError", "message": 'secret "s3" not found'}}
    obs = observe(job(active=1), [pod(phase="Pending", state=waiting)], {}, suspend=False)
    assert obs.reason == "CreateContainerConfigError" and 'secret "s3" not found' in obs.message
    [event] = transitions({}, desired_status({}, obs, job_name="j-trainer", generation=1, now=T0))
    assert event.type == "Warning" and event.reason == "CreateContainerConfigError", event


def test_running_pod_mirrors_the_trainers_stage() -> None:
    status = {"stage": "Training", "lastProgressTime": T1}
    obs = observe(job(active=1), [pod()], status, suspend=False)
    assert obs.phase == Phase.Training and obs.reason == "Running"
    assert observe(job(active=1), [pod()], {}, suspend=False).phase == Phase.Downloading
    done = {"stage": "Done", "lastProgressTime": T1}
    assert observe(job(active=1), [pod()], done, suspend=False).phase == Phase.Uploading


def test_stage_of_an_earlier_pod_is_not_trusted() -> None:
    status = {"stage": "Training", "lastProgressTime": T0}
    restarted = pod(name="second", created=T1)
    assert observe(job(active=1), [restarted], status, suspend=False).phase == Phase.Downloading


def test_complete_job_succeeds_with_the_lora_uri() -> None:
    obs = observe(job([("Complete", {})], completionTime=T1), [], {"loraUri": "s3://out/x.safetensors"}, suspend=False)
    assert obs.phase == Phase.Succeeded and obs.completion_time == T1 and "s3://out/x.safetensors" in obs.message
    status = desired_status({}, obs, job_name="j", generation=2, now=T1)
    assert status["completionTime"] == T1 and status["observedGeneration"] == 2
    assert {"type": "Succeeded", "status": "True"}.items() <= status["conditions"][-1].items()


def test_invalid_input_exit_code_fails_at_once_with_the_termination_message() -> None:
    failed = pod(phase="Failed", state=terminated(2, "dataset: target_images/3.png has no control image"))
    obs = observe(job([("Failed", {"reason": "PodFailurePolicy"})], failed=1), [failed], {}, suspend=False)
    assert obs.phase == Phase.Failed and obs.reason == "InvalidInput"
    assert "exited with code 2" in obs.message and "has no control image" in obs.message
    assert obs.restarts == 0


def test_storage_unreachable_exit_code() -> None:
    failed = pod(phase="Failed", state=terminated(3, "cannot reach http://minio:9000 (bucket out)"))
    obs = observe(job([("FailureTarget", {"reason": "PodFailurePolicy"})], failed=1), [failed], {}, suspend=False)
    assert obs.reason == "StorageUnreachable" and "minio:9000" in obs.message


def test_deadline_exceeded() -> None:
    obs = observe(job([("Failed", {"reason": "DeadlineExceeded"})]), [], {}, suspend=False)
    assert obs.phase == Phase.Failed and obs.reason == "DeadlineExceeded" and "600s" in obs.message


def test_backoff_limit_exceeded_counts_restarts() -> None:
    pods = [
        pod(name=f"p{i}", phase="Failed", state=terminated(1, f"crash {i}", f"2026-01-01T10:0{i}:00Z"))
        for i in range(4)
    ]
    obs = observe(job([("Failed", {"reason": "BackoffLimitExceeded"})], failed=4), pods, {}, suspend=False)
    assert obs.phase == Phase.Failed and obs.reason == "BackoffLimitExceeded"
    assert obs.restarts == 3 and "crash 3" in obs.message and "backoffLimit is 3" in obs.message


def test_restart_after_a_crash_is_reported() -> None:
    crashed = pod(name="first", phase="Failed", state=terminated(137))
    second = pod(name="second", phase="Pending", created=T1, node=None, state={"waiting": {}})
    obs = observe(job(active=1, failed=1), [crashed, second], {}, suspend=False)
    assert obs.phase == Phase.Pending and obs.restarts == 1 and "code 137 (killed)" in obs.restarting
    previous = desired_status({}, observe(job(active=1), [pod()], {}, suspend=False), job_name="j", generation=1)
    status = desired_status(previous, obs, job_name="j", generation=1)
    restarting = next(c for c in status["conditions"] if c["type"] == "Restarting")
    assert restarting["status"] == "True"
    assert [e.reason for e in transitions(previous, status)] == ["Pending", "Restarting"]
    running_again = observe(job(active=1, failed=1), [crashed, pod(name="second", created=T1)], {}, suspend=False)
    after = desired_status(status, running_again, job_name="j", generation=1)
    assert next(c for c in after["conditions"] if c["type"] == "Restarting")["status"] == "False"
    assert after["restarts"] == 1


def test_one_restarting_warning_per_counted_restart() -> None:
    """A second crash: the pod fails a moment before the Job controller counts it (the status says Restarting with
    the old count), then the count arrives. One Warning 'Restarting' for the restart, not one per step."""
    first = pod(name="first", phase="Failed", state=terminated(137))
    second = pod(name="second", phase="Failed", created=T1, state=terminated(137))
    running = desired_status(
        {},
        observe(job(active=1, failed=1), [first, pod(name="second", created=T1)], {}, suspend=False),
        job_name="j",
        generation=1,
    )
    failed = desired_status(
        running, observe(job(failed=1), [first, second], running, suspend=False), job_name="j", generation=1
    )
    counted = desired_status(
        failed, observe(job(failed=2), [first, second], failed, suspend=False), job_name="j", generation=1
    )
    assert failed["reason"] == counted["reason"] == "Restarting" and counted["restarts"] == 2
    events = transitions(running, failed) + transitions(failed, counted)
    restarting = [e for e in events if e.reason == "Restarting"]
    assert len(restarting) == 1 and restarting[0].type == "Warning", events
    assert "restart 2 of 3" in restarting[0].message and "code 137 (killed)" in restarting[0].message


def test_suspended_by_the_user_and_by_a_queue() -> None:
    suspended = job([("Suspended", {"message": "Job suspended"})], suspend=True)
    mine = observe(suspended, [], {}, suspend=True)
    assert mine.phase == Phase.Suspended and mine.reason == "Suspended"
    queued = observe(suspended, [], {}, suspend=False)
    assert queued.phase == Phase.Suspended and queued.reason == "SuspendedByQueue"
    status = desired_status({}, mine, job_name="j", generation=1)
    assert next(c for c in status["conditions"] if c["type"] == "Suspended")["status"] == "True"
    resumed = desired_status(status, observe(job(active=1), [pod()], {}, suspend=False), job_name="j", generation=2)
    assert next(c for c in resumed["conditions"] if c["type"] == "Suspended")["status"] == "False"


def test_invalid_spec_names_the_fields() -> None:
    obs = invalid_spec(["spec.resources.gpu: GPU class 'X' is not configured"], {})
    status = desired_status({}, obs, job_name="j", generation=1)
    assert status["phase"] == "Failed" and status["reason"] == "InvalidSpec"
    assert "spec.resources.gpu" in status["message"]
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "InvalidSpec" and "spec.resources.gpu" in failed["message"]
    [event] = transitions({}, status)
    assert event.type == "Warning" and event.reason == "InvalidSpec" and "spec.resources.gpu" in event.message


def test_transition_times_hold_while_the_condition_holds_and_patch_is_minimal() -> None:
    obs = observe(job(active=1), [pod()], {"stage": "Training", "lastProgressTime": T1}, suspend=False)
    first = desired_status({}, obs, job_name="j", generation=1, now=T0)
    again = desired_status(first, obs, job_name="j", generation=1, now=T1)
    assert again == first and status_patch(first, again) == {}
    assert transitions(first, again) == []


def test_quiet_pending_substates_make_no_events() -> None:
    creating = desired_status({}, observe(None, [], {}, suspend=False), job_name="j", generation=1)
    waiting = desired_status(creating, observe(job(), [], creating, suspend=False), job_name="j", generation=1)
    assert waiting["reason"] == "WaitingForPod" and transitions(creating, waiting) == []


def prep(conditions=(), **status) -> dict:
    trimmed = job(conditions, **status)
    trimmed.update(name="j-prepare", role="prepare", backoffLimit=2)
    return trimmed


def test_preparation_is_the_phase_before_the_gpu_job_with_what_the_pod_reports() -> None:
    pending = observe(None, [], {}, suspend=False, preparation=prep())
    assert pending.phase == Phase.Pending and pending.reason == "WaitingForPod" and "preparation pod" in pending.message
    unschedulable = pod(
        phase="Pending",
        node=None,
        state={"waiting": {}},
        conditions=[{"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/7 nodes"}],
    )
    obs = observe(None, [], {}, suspend=False, preparation=prep(), preparation_pods=[unschedulable])
    assert (obs.phase, obs.reason) == (Phase.Pending, "Unschedulable")
    assert obs.message == "waiting for a node for the preparation pod: 0/7 nodes"

    running = pod(name="j-prepare-x", node="cpu-0")
    status = {"lastProgressTime": T1, "preparation": {"task": "downloading pairs", "done": 12, "total": 40}}
    obs = observe(None, [], status, suspend=False, preparation=prep(), preparation_pods=[running])
    assert (obs.phase, obs.reason) == (Phase.Preparing, "Preparing")
    assert obs.message == "preparation pod j-prepare-x on node cpu-0: downloading pairs (12/40)"
    stale = {**status, "lastProgressTime": "2025-12-31T00:00:00Z"}  # an earlier pod's report
    assert observe(None, [], stale, suspend=False, preparation=prep(), preparation_pods=[running]).message.endswith(
        ": starting"
    )

    done = observe(None, [], {"datasetPairs": 40}, suspend=False, preparation=prep([("Complete", {})]))
    assert (done.phase, done.reason, done.prepared) == (Phase.Pending, "Creating", True)
    conditions = desired_status({}, done, job_name="j-trainer", generation=1)["conditions"]
    prepared = next(c for c in conditions if c["type"] == "Prepared")
    assert prepared["status"] == "True" and "40 pairs validated" in prepared["message"]
    assert not any(c["type"] == "Created" for c in conditions), "no GPU Job yet"


def test_a_failed_preparation_fails_the_job_with_its_own_reason_and_the_hubs_message() -> None:
    hub_says = "model x is gated: ... The hub said: Access to model x is restricted and you are not in the authorized"
    failed = pod(name="j-prepare-x", phase="Failed", node="cpu-0", state=terminated(4, hub_says))
    preparation = prep([("Failed", {"reason": "PodFailurePolicy", "lastTransitionTime": T1})], failed=1)
    obs = observe(None, [], {}, suspend=False, preparation=preparation, preparation_pods=[failed])
    assert (obs.phase, obs.reason, obs.prepared) == (Phase.Failed, "ModelAccessDenied", False)
    assert obs.message.startswith("preparation failed, no GPU was requested: the trainer exited with code 4")
    assert "not in the authorized" in obs.message and obs.completion_time == T1
    desired = desired_status({}, obs, job_name="j-trainer", generation=1)
    assert next(c for c in desired["conditions"] if c["type"] == "Prepared")["status"] == "False"
    events = transitions({}, desired)
    assert events[0].type == "Warning" and events[0].reason == "ModelAccessDenied"


def test_warnings_of_a_preparation_become_one_warning_event_when_it_is_done() -> None:
    done = observe(None, [], {}, suspend=False, preparation=prep([("Complete", {})]))
    current = {"phase": "Preparing", "preparation": {"warnings": ["ignored file that is neither ...: notes.md"]}}
    desired = desired_status(current, done, job_name="j-trainer", generation=1)
    events = transitions(current, desired)
    assert [(e.type, e.reason) for e in events if e.reason == "PreparationWarnings"] == [
        ("Warning", "PreparationWarnings")
    ]
    assert "notes.md" in next(e.message for e in events if e.reason == "PreparationWarnings")
    again = transitions({**current, **desired}, desired)
    assert not [e for e in again if e.reason == "PreparationWarnings"], "once"


def test_a_failed_group_being_replaced_is_restarting_not_failed() -> None:
    failed_group = job([("Failed", {"reason": "PodFailurePolicy", "message": "pod j-trainer-1 failed"})], failed=1)
    why = "restart 1 of 3: pod j-trainer-1 failed; replacing all 2 pods, which resume from the last checkpoint"
    obs = observe(failed_group, [], {"restarts": 0}, suspend=False, group_restarts=1, group_restart=why)
    assert (obs.phase, obs.reason, obs.restarts) == (Phase.Pending, "Restarting", 1)
    assert obs.message == why and obs.completion_time is None
    # Without a restart left (group_restart None) the same Job is the job's failure, the restarts kept.
    final = observe(failed_group, [], {"restarts": 3}, suspend=False, group_restarts=3)
    assert final.phase == Phase.Failed and final.restarts == 3


def test_world_size_is_written_by_the_operator() -> None:
    obs = observe(None, [], {}, suspend=False)
    desired = desired_status({}, obs, job_name="j-trainer", generation=1, world_size=4)
    assert desired["worldSize"] == 4
    assert "worldSize" not in desired_status({}, obs, job_name="j-trainer", generation=1)
