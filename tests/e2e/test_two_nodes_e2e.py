"""A job on two nodes, end to end on the real control plane: `spec.resources.nodes: 2` -> the operator's Indexed Job
and headless Service -> the real scheduler puts the two pods on two distinct L40S nodes (two node agents, one GPU
each) -> each agent runs its pod's `torchrun` as a local process, the two rendezvous and train one LoRA with gloo
-> one pod SIGKILLed after the first checkpoint: the whole group is replaced and resumes -> the LoRA in MinIO.

The one stand-in: there is no cluster DNS here, so `PET_MASTER_ADDR` (`<job>-trainer-0.<job>-trainer`, the first
pod's hostname under the Service) is mapped to 127.0.0.1 by the agents, with a free port for `PET_MASTER_PORT`
because both "pods" share this host's network. Everything else (env, hostnames, Service) is what a cluster gets.
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

import pytest
from kontext_trainer.data.synthetic import write_example_pairs

from tests.conftest import Cluster
from tests.infra.klj import Kljs, job_manifest
from tests.infra.minio import MinioServer
from tests.infra.node_agent import NodeAgent
from tests.infra.operator_fixtures import KWOK_CPU_NODES, KWOK_L40S_NODES
from tests.infra.operator_process import OperatorProcess
from tests.infra.processes import free_port, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.cluster, pytest.mark.s3, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
VENV_BIN = REPO / ".venv" / "bin"
STEPS, SAVE_EVERY, PAIRS = 8, 4, 4


def test_two_nodes_train_one_lora_as_one_group_that_restarts_together(
    crd: Cluster,
    kljs: Kljs,
    operator: OperatorProcess,
    minio: MinioServer,
    bucket: str,
    tiny_model: Path,
    tmp_path: Path,
) -> None:
    suffix = uuid.uuid4().hex[:6]
    agents = [
        NodeAgent(crd.plane, tmp_path / f"agent-{i}", name=f"agent-l40s-{suffix}-{i}", cpu_node=i == 0)
        for i in range(2)
    ]
    overrides = {
        "PET_MASTER_ADDR": "127.0.0.1",  # the stand-in for cluster DNS (module docstring)
        "PET_MASTER_PORT": str(free_port()),
        "KONTEXT_LORA_METRICS_PORT": str(free_port()),
        "KONTEXT_LORA_PREVIEW_STEPS": "0",
        "KONTEXT_LORA_PROGRESS": "0",
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # torchrun --no-python finds kontext-lora
    }
    for agent in agents:
        agent.commands["torchrun"] = [str(VENV_BIN / "torchrun")]
        agent.env_overrides.update(overrides)
        agent.start()
    nodes = (*KWOK_L40S_NODES, *KWOK_CPU_NODES)
    crd.kubectl("cordon", *nodes)
    try:
        _run(crd, kljs, minio, bucket, tiny_model, tmp_path, agents)
    finally:
        crd.kubectl("uncordon", *nodes, check=False)
        for agent in agents:
            agent.stop()


def _run(
    crd: Cluster,
    kljs: Kljs,
    minio: MinioServer,
    bucket: str,
    tiny_model: Path,
    tmp_path: Path,
    agents: list[NodeAgent],
) -> None:
    s3 = minio.client()
    pairs = write_example_pairs(tmp_path / "pairs", count=PAIRS)
    for folder in ("control", "target"):
        for path in sorted((pairs / folder).iterdir()):
            s3.upload_file(str(path), bucket, f"data/two-nodes/{folder}/{path.name}")
    kljs.create_s3_secret(minio.access_key, minio.secret_key)
    name = "two-nodes"
    manifest = job_manifest(
        name,
        model={"base": str(tiny_model), "dtype": "fp32"},
        dataset={
            "uri": f"s3://{bucket}/data/two-nodes/",
            "defaultCaption": "remove the coloured shape",
            "resolution": 512,
            "heldOutPairs": 0,
        },
        lora={"rank": 8},
        training={"steps": STEPS, "learningRate": 1.0e-3, "gradientCheckpointing": False},
        checkpoints={"saveEvery": SAVE_EVERY, "keep": 2},
        output={"uri": f"s3://{bucket}/loras/two-nodes/"},
        storage={"endpoint": minio.endpoint, "credentialsSecret": "s3-credentials"},
        resources={"gpu": "L40S-48GB", "count": 1, "nodes": 2},
        runPolicy={"backoffLimit": 2},
    )
    kljs.apply(manifest)

    # The Indexed Job, its headless Service and the rendezvous environment, as the apiserver holds them.
    [job] = wait_for(lambda: kljs.jobs(name), timeout=240, what="the GPU Job (after the preparation)")
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 2, 2)
    assert spec["template"]["spec"]["subdomain"] == f"{name}-trainer"
    service = crd.plane.kubectl("get", "service", f"{name}-trainer", "-n", kljs.namespace, "-o", "json").stdout
    assert '"clusterIP": "None"' in service and '"publishNotReadyAddresses": true' in service

    def scheduled() -> list[dict]:
        pods = [p for p in kljs.pods(name) if p["spec"].get("nodeName") and not p["metadata"].get("deletionTimestamp")]
        return pods if len(pods) == 2 else []

    first = wait_for(scheduled, timeout=60, what="two scheduled pods")
    assert {p["spec"]["nodeName"] for p in first} == {a.name for a in agents}, "one pod per GPU node of the class"
    env = {e["name"]: e for e in first[0]["spec"]["containers"][0]["env"]}
    assert env["PET_MASTER_ADDR"]["value"] == f"{name}-trainer-0.{name}-trainer"
    assert env["PET_NNODES"]["value"] == "2" and env["PET_NPROC_PER_NODE"]["value"] == "1"
    assert "job-completion-index" in env["PET_NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"]
    print(f"\n[two nodes] pod spec env: { {k: v for k, v in env.items() if k.startswith('PET_')} }")

    # After the first checkpoint, node rank 1's pod dies (SIGKILL): the Job fails as a group, the operator replaces it.
    kljs.wait_status(name, lambda s: s.get("checkpoints"), 420, "the first checkpoint")
    rank_1 = next(p for p in first if p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] == "1")
    agent = next(a for a in agents if a.name == rank_1["spec"]["nodeName"])
    agent.kill_pod(kljs.namespace, rank_1["metadata"]["name"])
    restart = kljs.wait_event(name, "GroupRestart", timeout=120)
    print(f"[two nodes] {restart['message']}")

    status = kljs.wait_phase(name, "Succeeded", timeout=600)
    assert status["worldSize"] == 2 and status["restarts"] == 1 and status["step"] == STEPS
    assert kljs.get_table(name)["WORLD"] == "2"
    first_names = {p["metadata"]["name"] for p in first}
    second = [p for p in kljs.pods(name) if p["metadata"]["name"] not in first_names]
    assert len(second) == 2 and {p["spec"]["nodeName"] for p in second} == {a.name for a in agents}
    logs = "".join(
        a.pod_log(kljs.namespace, p["metadata"]["name"])
        for p in second
        for a in agents
        if a.name == p["spec"]["nodeName"]
    )
    resumed = re.search(r"resuming from \S+ \(step (\d+)\)", logs)
    assert resumed and int(resumed.group(1)) >= SAVE_EVERY, logs[-3000:]
    print(f"[two nodes] the new group resumed at step {resumed.group(1)} (saveEvery {SAVE_EVERY})")

    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="loras/two-nodes/")["Contents"]}
    assert f"loras/two-nodes/{name}.safetensors" in keys
    assert status["loraUri"] == f"s3://{bucket}/loras/two-nodes/{name}.safetensors"
