"""The trainer as the operator runs it (docs/architecture.md): `train --from-env`, everything in S3, status
patched on the real apiserver, metrics served while training, JSON logs, credentials never printed."""

from __future__ import annotations

import json
import subprocess
import threading
import urllib.request
from pathlib import Path
from typing import Any

from kubernetes import client

from kontext_lora.api import API_VERSION, GROUP, KIND, PLURAL, VERSION
from tests.infra.processes import free_port

from .helpers import KONTEXT_LORA, job_document, s3_keys, trainer_env, upload_tree

METRICS = (
    "kontext_train_loss",
    "kontext_train_loss_ema",
    "kontext_train_step",
    "kontext_train_total_steps",
    "kontext_train_learning_rate",
    "kontext_train_step_seconds_bucket",
    "kontext_train_gpu_memory_bytes",
    "kontext_train_checkpoints_saved_total",
    "kontext_dataset_pairs",
    "kontext_train_validation_loss",
    "kontext_train_edit_score",
)
STAGES = ["Preparing", "Downloading", "Training", "Uploading", "Done"]


class Observer(threading.Thread):
    """Polls /metrics and the job's status.stage while the trainer runs."""

    def __init__(self, port: int, custom: client.CustomObjectsApi, namespace: str, name: str):
        super().__init__(daemon=True)
        self.port, self.custom, self.namespace, self.name = port, custom, namespace, name
        self.metrics: list[str] = []
        self.stages: list[str] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.1):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=2) as response:
                    self.metrics.append(response.read().decode())
            except OSError:
                pass
            job = self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, self.name)
            stage = (job.get("status") or {}).get("stage")
            if stage and (not self.stages or self.stages[-1] != stage):
                self.stages.append(stage)


def _sample(text: str, name: str, labels: dict[str, str]) -> float | None:
    selector = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and selector in line:
            return float(line.rsplit(" ", 1)[1])
    return None


def test_from_env_run_reports_status_serves_metrics_and_writes_everything_to_s3(
    crd, namespace: str, minio, bucket: str, s3_env: dict, tiny_model: Path, pairs_dir: Path, tmp_path: Path
) -> None:
    s3 = minio.client()
    upload_tree(s3, bucket, pairs_dir, "pairs/")
    upload_tree(s3, bucket, tiny_model, "models/tiny/")
    name = "pod-run"
    document = job_document(
        name,
        f"s3://{bucket}/models/tiny/",
        f"s3://{bucket}/pairs/",
        f"s3://{bucket}/out/",
        training={"steps": 8},
        checkpoints={"saveEvery": 4, "keep": 1},
        storage={"endpoint": minio.endpoint},
    )
    api = crd.api_client()
    custom = client.CustomObjectsApi(api)
    created = custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, document)
    # What the operator owns must survive the trainer's patches.
    custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, PLURAL, name, {"status": {"phase": "Training", "restarts": 1, "jobName": "j-1"}}
    )
    job_json = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {k: created["metadata"][k] for k in ("name", "namespace", "uid", "generation")},
        "spec": created["spec"],
    }
    port = free_port()
    env = trainer_env(
        KONTEXT_LORA_JOB=json.dumps(job_json),
        KONTEXT_LORA_WORK_DIR=str(tmp_path / "work"),
        KONTEXT_LORA_METRICS_PORT=str(port),
        KONTEXT_LORA_REPORT_STATUS="true",
        KONTEXT_LORA_TERMINATION_LOG=str(tmp_path / "termination-log"),
        KUBECONFIG=str(crd.kubeconfig),
        HF_HOME=str(tmp_path / "hf"),
    )
    observer = Observer(port, custom, namespace, name)
    observer.start()
    log_path = tmp_path / "pod.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [KONTEXT_LORA, "train", "--from-env"], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path
        )
        try:
            code = process.wait(timeout=400)
        finally:
            observer.done.set()
            observer.join(10)
            if process.poll() is None:
                process.kill()
    output = log_path.read_text()
    assert code == 0, output[-5000:]

    # Status: every trainer-owned field, the operator's untouched.
    status: dict[str, Any] = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)["status"]
    assert status["phase"] == "Training" and status["restarts"] == 1 and status["jobName"] == "j-1"
    assert status["stage"] == "Done"
    assert status["step"] == status["totalSteps"] == 8 and status["progressPercentage"] == 100
    assert status["datasetPairs"] == 6
    # Without a preparation pod (no $KONTEXT_LORA_PREPARED) the trainer prepared itself and reported it.
    assert status["preparation"]["task"] == "done" and status["preparation"]["done"] == 6
    assert status["preparation"]["manifestUri"] == f"s3://{bucket}/out/preparation.json"
    assert status["loraUri"] == f"s3://{bucket}/out/{name}.safetensors"
    [record] = status["checkpoints"]  # keep: 1
    assert record["step"] == 8
    assert record["uri"] == f"s3://{bucket}/out/checkpoints/step-000008/{name}-step-000008.safetensors"
    assert record["previewUri"] == f"s3://{bucket}/out/checkpoints/step-000008/preview.png"
    assert record["validationLoss"] > 0
    # The edit scores survive the CRD's structural schema (unknown status fields would be pruned).
    assert isinstance(record["editScore"], float) and isinstance(record["baseEditScore"], float), record
    assert status["lastCheckpoint"] == status["bestCheckpoint"] == record["uri"]
    assert "lastProgressTime" in status and status["loss"] > 0 and status["learningRate"] > 0
    seen = [s for s in observer.stages if s in STAGES]
    assert seen == sorted(seen, key=STAGES.index) and {"Training", "Done"} <= set(seen), observer.stages

    # Metrics, scraped while it trained.
    assert observer.metrics, f"the metrics endpoint never answered:\n{output[-3000:]}"
    last = observer.metrics[-1]
    labels = {"job_name": name, "job_namespace": namespace}
    for metric in METRICS:
        assert _sample(last, metric, labels) is not None, f"{metric} missing:\n{last}"
    assert _sample(last, "kontext_train_total_steps", labels) == 8
    assert _sample(last, "kontext_dataset_pairs", labels) == 6
    steps_seen = [_sample(text, "kontext_train_step", labels) for text in observer.metrics]
    assert max(s for s in steps_seen if s is not None) >= 4

    # Storage: the model was synced to the model cache; outputs are in MinIO.
    assert (tmp_path / "hf" / "kontext-lora" / "s3" / bucket / "models" / "tiny" / "model_index.json").is_file()
    keys = s3_keys(s3, bucket, "out/")
    assert f"out/{name}.safetensors" in keys and "out/preparation.json" in keys
    # The encodings went to the shared cache beside the output folder (the bucket's root here): 6 pairs' latents.
    cached = s3_keys(s3, bucket, "kontext-lora-cache/encodings/v1/")
    assert len([k for k in cached if "/latents/" in k]) == 6 and any("/text/" in k for k in cached), cached
    assert sorted(k for k in keys if "/checkpoints/" in k) == [
        f"out/checkpoints/step-000008/{f}"
        for f in sorted(
            ["COMPLETE", f"{name}-step-000008.safetensors", "preview.png", "training_state.pt", "validation.json"]
        )
    ]

    # Logs: JSON lines with structured fields; no credentials anywhere.
    records = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert records and all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    assert any("loss" in r and "step" in r and "eta_seconds" in r for r in records)
    assert any(r.get("resumed_from_step") is None and r["message"].startswith("LoRA written to") for r in records)
    for secret in (minio.secret_key, minio.access_key):
        assert secret not in output
    assert not (tmp_path / "termination-log").exists()
