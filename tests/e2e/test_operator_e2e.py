"""End to end: `kubectl apply -f` of an examples/ job on the real control plane -> the preparation pod (CPU only)
runs on the agent's CPU node and validates the pairs -> the real scheduler places the trainer pod on a matching
GPU node -> the node agent runs the real trainer (`kontext-lora train --from-env`, tiny model, pairs in MinIO),
which starts from the preparation's manifest -> Succeeded, with the LoRA and the rotated checkpoints in MinIO and
progress in status.

The operator runs under its least-privilege ServiceAccount; both pods report progress with their own token through
the per-job Role. After the first checkpoint the trainer process and the operator are killed with SIGKILL: the Job
retries and the new trainer resumes from the checkpoint, encoding nothing (the encodings are in MinIO). A second
job on the same pairs and model encodes nothing either. The time from each trainer's start to its first training
step is measured and printed (`[e2e timing]`).
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import pytest
import yaml
from kontext_trainer.data.synthetic import write_example_pairs
from safetensors import safe_open

from tests.conftest import Cluster
from tests.faults.support import log_records, record
from tests.infra.klj import PREPARE, Kljs
from tests.infra.minio import MinioServer
from tests.infra.node_agent import NodeAgent
from tests.infra.operator_process import OperatorProcess
from tests.infra.processes import free_port, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.cluster, pytest.mark.s3, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "jewellery-refining.yaml"
STEPS, SAVE_EVERY, KEEP = 30, 10, 2
RERUN_STEPS = 4


def upload_pairs(minio: MinioServer, bucket: str, prefix: str, control_dir: str, target_dir: str, scratch: Path) -> int:
    """The demo's synthetic pairs (generated here: nothing depends on the demo having run), uploaded to MinIO."""
    pairs = write_example_pairs(scratch / "pairs")
    s3 = minio.client()
    for source, folder in ((pairs / "control", control_dir), (pairs / "target", target_dir)):
        for path in sorted(source.iterdir()):
            s3.upload_file(str(path), bucket, f"{prefix}{folder}/{path.name}")
    return len(list((pairs / "control").iterdir()))


def example_for_this_cluster(tmp_path: Path, minio: MinioServer, bucket: str, tiny_model: Path) -> tuple[Path, dict]:
    """The jewellery example, pointed at this cluster's storage and the tiny model, and shortened for a CPU."""
    job = yaml.safe_load(EXAMPLE.read_text())
    spec = job["spec"]
    spec["model"] = {"base": str(tiny_model), "dtype": "fp32"}
    spec["dataset"]["uri"] = f"s3://{bucket}/data/jewellery/"
    spec["dataset"]["resolution"] = 512
    spec["training"].update(steps=STEPS, learningRate=1.0e-3, gradientCheckpointing=False)
    spec["checkpoints"] = {"saveEvery": SAVE_EVERY, "keep": KEEP}
    spec["output"] = {"uri": f"s3://{bucket}/loras/jewellery/"}
    spec["storage"]["endpoint"] = minio.endpoint  # credentialsSecret stays: s3-credentials
    path = tmp_path / EXAMPLE.name
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path, job


class Observer(threading.Thread):
    """Samples the job's status twice a second, as a user watching `kubectl get klj -w` would see it."""

    def __init__(self, kljs: Kljs, name: str):
        super().__init__(daemon=True)
        self.kljs, self.name = kljs, name
        self.seen: list[dict] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.5):
            status = self.kljs.status(self.name)
            sample = {key: status.get(key) for key in ("phase", "step", "totalSteps", "loss", "etaSeconds")}
            if not self.seen or self.seen[-1] != sample:
                self.seen.append(sample)


def test_kubectl_apply_to_lora_in_s3(
    crd: Cluster,
    kljs: Kljs,
    operator: OperatorProcess,
    agent_node: NodeAgent,
    minio: MinioServer,
    bucket: str,
    tiny_model: Path,
    tmp_path: Path,
) -> None:
    agent_node.env_overrides.update(
        KONTEXT_LORA_METRICS_PORT=str(free_port()),  # a pod's own network namespace; here a shared host
        KONTEXT_LORA_PREVIEW_STEPS="2",
        KONTEXT_LORA_PROGRESS="0",
    )
    path, job = example_for_this_cluster(tmp_path, minio, bucket, tiny_model)
    name = job["metadata"]["name"]
    dataset = job["spec"]["dataset"]
    pairs = upload_pairs(minio, bucket, "data/jewellery/", dataset["controlDir"], dataset["targetDir"], tmp_path)
    kljs.create_s3_secret(minio.access_key, minio.secret_key)

    observer = Observer(kljs, name)
    began = time.monotonic()
    crd.kubectl("apply", "-n", kljs.namespace, "-f", str(path))
    wait_for(lambda: kljs.jobs(name), interval=0.05, what="the batch Job")
    job_created = time.monotonic() - began
    observer.start()

    # The real scheduler picks the agent's node: the only schedulable L40S 48 GB node.
    pod = wait_for(lambda: [p for p in kljs.pods(name) if p["spec"].get("nodeName")], what="a scheduled pod")[0]
    assert pod["spec"]["nodeName"] == agent_node.name
    env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
    assert "value" not in env["AWS_SECRET_ACCESS_KEY"], "credentials reach the pod only by Secret reference"

    # Once the first checkpoint is in storage, the node loses the trainer (SIGKILL, as in an OOM kill) and the
    # operator dies without warning too. The Job retries; the new trainer resumes from the checkpoint.
    kljs.wait_status(
        name, lambda s: any(c["step"] == SAVE_EVERY for c in s.get("checkpoints") or []), 300, "the first checkpoint"
    )
    first_pod = kljs.running_pod(name)["metadata"]["name"]
    agent_node.kill_pod(kljs.namespace, first_pod)
    operator.kill()
    operator.start()

    status = kljs.wait_phase(name, "Succeeded", timeout=420)
    wall = time.monotonic() - began
    observer.stop.set()
    observer.join()
    print(
        f"\napply -> GPU Job created (after the preparation) {job_created:.2f}s; apply -> Succeeded {wall:.0f}s; "
        f"status seen: {observer.seen}"
    )

    # Progress was visible on the way: Training with a step and a loss, then the final step.
    training = [s for s in observer.seen if s["phase"] == "Training" and s["step"] and s["loss"] is not None]
    assert training, observer.seen
    assert all(s["totalSteps"] == STEPS for s in training)
    assert status["step"] == STEPS and status["datasetPairs"] == pairs
    assert len(kljs.jobs()) == 1 and kljs.jobs()[0]["status"]["succeeded"] == 1
    assert status["restarts"] == 1
    assert "code 137" in kljs.wait_event(name, "Restarting")["message"]
    second_pod = next(p["metadata"]["name"] for p in kljs.pods(name) if p["metadata"]["name"] != first_pod)
    resumed = re.search(r"resuming from \S+ \(step (\d+)\)", agent_node.pod_log(kljs.namespace, second_pod))
    assert resumed and int(resumed.group(1)) >= SAVE_EVERY, agent_node.pod_log(kljs.namespace, second_pod)[-3000:]

    # The LoRA and the rotated checkpoints are in MinIO, and status points at them.
    s3 = minio.client()
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="loras/jewellery/")["Contents"]}
    lora_key = f"loras/jewellery/{name}.safetensors"
    assert status["loraUri"] == f"s3://{bucket}/{lora_key}" and lora_key in keys
    steps_kept = sorted({int(k.split("step-")[1][:6]) for k in keys if "/checkpoints/step-" in k})
    assert steps_kept == [STEPS - SAVE_EVERY, STEPS], f"keep={KEEP} rotates older checkpoints out: {sorted(keys)}"
    for step in steps_kept:
        prefix = f"loras/jewellery/checkpoints/step-{step:06d}/"
        assert {f"{prefix}COMPLETE", f"{prefix}{name}-step-{step:06d}.safetensors"} <= keys
    recorded = {c["step"]: c["uri"] for c in status["checkpoints"]}
    assert sorted(recorded) == steps_kept
    for uri in recorded.values():
        assert uri.removeprefix(f"s3://{bucket}/") in keys

    download = tmp_path / "lora.safetensors"
    s3.download_file(bucket, lora_key, str(download))
    with safe_open(str(download), framework="pt") as lora:
        metadata = lora.metadata()
        assert lora.keys()
    assert metadata["kontext_lora.rank"] == "64" and metadata["kontext_lora.trigger_word"] == "XM,", metadata

    reasons = [e["reason"] for e in kljs.events(name)]
    for reason in ("JobCreated", "Training", "Succeeded"):
        assert reason in reasons, reasons

    # The preparation ran first, CPU only, on the agent's CPU node; the trainer started from its manifest.
    [preparation] = kljs.pods(name, role=PREPARE)
    assert preparation["spec"]["nodeName"] == agent_node.cpu_name
    assert not any("gpu" in k for k in preparation["spec"]["containers"][0]["resources"].get("requests", {}))
    assert "loras/jewellery/preparation.json" in keys
    first_run, restart = (_trainer_timing(agent_node, kljs.namespace, pod) for pod in (first_pod, second_pod))
    assert first_run["started_from_manifest"] and restart["started_from_manifest"]
    assert first_run["encoded"] == {"latents": pairs, "text": first_run["encoded"]["text"]}
    assert restart["encoded"] == {"latents": 0, "text": 0}, "a restarted trainer encodes nothing"

    # A second job on the same pairs and model: its own preparation, and no encoding at all.
    rerun = yaml.safe_load(path.read_text())
    rerun["metadata"]["name"] = "jewellery-rerun"
    rerun["spec"]["training"]["steps"] = RERUN_STEPS
    rerun["spec"]["checkpoints"] = {"saveEvery": RERUN_STEPS, "keep": 1}
    rerun["spec"]["output"]["uri"] = f"s3://{bucket}/loras/jewellery-rerun/"
    kljs.apply(rerun)
    kljs.wait_phase("jewellery-rerun", "Succeeded", timeout=420)
    rerun_timing = _trainer_timing(agent_node, kljs.namespace, kljs.pods("jewellery-rerun")[0]["metadata"]["name"])
    assert rerun_timing["encoded"] == {"latents": 0, "text": 0}, "the second job encodes nothing"
    timings = {"first run": first_run, "restart": restart, "rerun": rerun_timing}
    for label, timing in timings.items():
        print(
            f"\n[e2e timing] {label}: first step {timing['time_to_first_step']} s after the trainer started; {timing}"
        )
    record("time-to-first-step", **timings)

    # Deleting the job removes its cluster objects, never the LoRAs.
    kljs.delete(name)
    after = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="loras/jewellery/")["Contents"]}
    assert after == keys


def _trainer_timing(agent: NodeAgent, namespace: str, pod: str) -> dict:
    """What a trainer pod's log says about its start: seconds to its first step and the milestones on the way, what
    it encoded, and whether it started from the preparation's manifest."""
    records = log_records(agent, namespace, pod)
    first = next(r for r in records if "time_to_first_step" in r)
    encoded = next(r for r in records if "encoded" in r and isinstance(r["encoded"], dict))
    return {
        "time_to_first_step": first["time_to_first_step"],
        "timeline": first["timeline"],
        "encoded": encoded["encoded"],
        "started_from_manifest": any(r["message"].startswith("starting from the preparation") for r in records),
    }
