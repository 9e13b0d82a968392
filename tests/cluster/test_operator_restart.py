"""Restart idempotency and high availability: the operator killed with SIGKILL at any point never makes a second
Job (preparation or GPU), catches up with what happened while it was down, and of two peered replicas only one
acts."""

from __future__ import annotations

import random
import statistics
import time

import pytest
import yaml

from tests.conftest import Cluster
from tests.infra.klj import PREPARE, Kljs, job_manifest
from tests.infra.processes import wait_for
from tests.infra.watch import Recorder

pytestmark = pytest.mark.cluster


def test_sigkill_at_any_point_never_creates_a_second_job(crd: Cluster, kljs: Kljs, start_operator) -> None:
    api = crd.api_client()
    jobs = Recorder(api, kljs.namespace, "jobs").start()
    operator = start_operator()
    rng = random.Random(5)
    # Kill points spread over the first second after apply: before the operator saw the job, while it creates
    # the ServiceAccount/Role/RoleBinding and the preparation Job, after it but before status, around the
    # preparation's end (KWOK ends it 0.5 s after it started) and the GPU Job's creation, and after.
    delays = [0.0, 0.02, 0.05, 0.08, 0.12, 0.2, 0.3, 0.5, 0.8] + [rng.uniform(0, 0.6) for _ in range(3)]
    names = [f"restart-{i}" for i in range(len(delays))]
    for name, delay in zip(names, delays, strict=True):
        kljs.apply(job_manifest(name))
        time.sleep(delay)
        operator.kill()
        operator.start()
        # Eight L40S GPUs for twelve jobs: some stay Pending (Unschedulable), which is fine here.
        kljs.wait_status(
            name,
            lambda s: any(c["type"] == "Created" and c["status"] == "True" for c in s.get("conditions", [])),
            what=f"{name}'s Job after the restart",
        )

    # Kill while suspending, and while a pod finishes: the restarted operator completes both.
    kljs.patch_spec(names[0], {"suspend": True})
    operator.kill()
    kljs.end_pod(kljs.running_pod(names[1])["metadata"]["name"], 0)
    time.sleep(1)
    operator.start()
    kljs.wait_phase(names[0], "Suspended")
    kljs.wait_phase(names[1], "Succeeded")
    assert kljs.jobs(names[0])[0]["spec"]["suspend"] is True

    # Kill while a deletion waits on the finalizer: the restarted operator finishes it.
    operator.kill()
    crd.kubectl("delete", "klj", names[2], "-n", kljs.namespace, "--wait=false")
    operator.start()
    wait_for(lambda: kljs.get(names[2]) is None, what="the deletion to finish after the restart")

    time.sleep(1)
    jobs.stop()
    for name in names:
        for job in (f"{name}-prepare", f"{name}-trainer"):
            created = jobs.added(job)
            assert len(created) == 1, f"{job} was created {len(created)} times"
    live = {j["metadata"]["name"] for j in kljs.jobs()}
    assert live == {f"{name}-trainer" for name in names if name != names[2]}
    print(f"\n{len(delays)} SIGKILL restarts at {', '.join(f'{d:.2f}' for d in delays)}s after apply: one Job each")


def test_apply_to_job_created_latency(crd: Cluster, kljs: Kljs, operator) -> None:
    # Steady state: the first job after start also waits for the apiserver's watch cache of a fresh CRD.
    kljs.apply(job_manifest("warm-up", suspend=True))
    wait_for(lambda: kljs.jobs("warm-up", role=PREPARE), what="the warm-up Job")
    api = crd.api_client()
    recorded = [Recorder(api, kljs.namespace, kind).start() for kind in ("kontextlorajobs", "jobs")]
    count = 20
    documents = [job_manifest(f"lat-{i}", suspend=True) for i in range(count)]
    kljs.plane.kubectl("apply", "-n", kljs.namespace, "-f", "-", input=yaml.safe_dump_all(documents))
    wait_for(lambda: len(recorded[1].added()) == count, timeout=60, what="all Jobs", interval=0.05)
    for recorder in recorded:
        recorder.stop()
    applied = {e.name: e.at for e in recorded[0].added()}
    # A new job's first Job is its preparation Job (suspended jobs get nothing else).
    created = {e.name.removesuffix("-prepare"): e.at for e in recorded[1].added()}
    latencies = sorted(created[name] - applied[name] for name in applied)
    p50, p99 = statistics.median(latencies), latencies[-1]
    print(
        f"\napply -> Job created for {count} jobs applied at once: p50 {p50 * 1000:.0f} ms, max {p99 * 1000:.0f} ms; "
        f"operator RSS {operator.rss_mib():.0f} MiB"
    )
    assert p99 < 5


def test_only_the_highest_priority_replica_acts(crd: Cluster, kljs: Kljs, start_operator) -> None:
    peering = f"test-{kljs.namespace}"
    crd.kubectl(
        "apply",
        "-f",
        "-",
        input=yaml.safe_dump(
            {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": peering}}
        ),
    )
    try:
        standby = start_operator(standalone=False, peering=peering, priority=10)
        active = start_operator(standalone=False, peering=peering, priority=20)
        wait_for(
            lambda: "Pausing operations in favour of" in standby.log_path.read_text(),
            what="the lower-priority replica to stand by",
        )
        kljs.apply(job_manifest("ha-1"))
        created = kljs.wait_event("ha-1", "JobCreated")
        assert created["reportingInstance"] == "operator-1-0", created["reportingInstance"]
        kljs.wait_phase("ha-1", "Downloading")
        assert "ha-1" not in standby.log_path.read_text().split("Pausing operations in favour of")[-1]

        active.stop()  # a graceful exit withdraws from the peering at once
        wait_for(
            lambda: "Resuming operations after the pause" in standby.log_path.read_text(),
            what="the standby replica to take over",
        )
        kljs.apply(job_manifest("ha-2"))
        created = kljs.wait_event("ha-2", "JobCreated")
        assert created["reportingInstance"] == "operator-0-0"
        kljs.wait_phase("ha-2", "Downloading")
        assert [e.get("reportingInstance") for e in kljs.events("ha-1") if e["reason"] == "JobCreated"] == [
            "operator-1-0"
        ]
    finally:
        crd.kubectl("delete", "clusterkopfpeering", peering, "--wait=false", check=False)
