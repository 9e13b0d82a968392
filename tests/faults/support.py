"""Helpers of the fault-injection suite: small real training jobs, checkpoint listings, the trainer's step as its
metrics endpoint reports it, and the figures each test measures (printed, and collected for docs/reliability.md)."""

from __future__ import annotations

import json
import os
import re
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kontext_lora.api import API_VERSION, KIND
from tests.infra.klj import Kljs
from tests.infra.minio import MinioServer
from tests.infra.node_agent import NodeAgent
from tests.infra.processes import wait_for

REPORT_ENV = "KONTEXT_LORA_FAULT_REPORT"
DEFAULT_REPORT = Path("/tmp/kontext-lora-fault-report.json")
SEED_ENV = "KONTEXT_LORA_FAULT_SEED"
TRIGGER = "RMV,"
_CHECKPOINT_KEY = re.compile(r"checkpoints/step-(\d+)/(.+)$")


def seed(default: int) -> int:
    """The seed of a test's random choices: `$KONTEXT_LORA_FAULT_SEED` when set (to replay a run), else `default`."""
    value = int(os.environ.get(SEED_ENV, default))
    print(f"\nfault seed: {value} (replay with {SEED_ENV}={value})")
    return value


def record(fault: str, **figures: Any) -> None:
    """Print a test's measured figures and merge them into the suite's JSON report (read back for the docs)."""
    path = Path(os.environ.get(REPORT_ENV, DEFAULT_REPORT))
    try:
        report = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        report = {}
    report[fault] = {**figures, "recorded": time.strftime("%Y-%m-%dT%H:%M:%S")}
    path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    print(f"\n[fault report] {fault}: {json.dumps(figures, sort_keys=True)}")


def trainer_job(
    name: str,
    *,
    bucket: str,
    endpoint: str,
    model: Path,
    steps: int = 8,
    save_every: int = 4,
    keep: int = 2,
    backoff_limit: int = 3,
    dataset: str = "data/",
    output: str | None = None,
    secret: str | None = "s3-credentials",
    **overrides: Any,
) -> dict[str, Any]:
    """A KontextLoRAJob for the real trainer with the tiny model: fp32, 512 px, rank 8, no held-out pairs."""
    spec: dict[str, Any] = {
        "model": {"base": str(model), "dtype": "fp32"},
        "dataset": {
            "uri": f"s3://{bucket}/{dataset}",
            "controlDir": "control",
            "targetDir": "target",
            "defaultCaption": "remove the coloured shape",
            "triggerWord": TRIGGER,
            "resolution": 512,
            "heldOutPairs": 0,
        },
        "lora": {"rank": 8},
        "training": {"steps": steps, "learningRate": 3.0e-3, "gradientCheckpointing": False},
        "checkpoints": {"saveEvery": save_every, "keep": keep},
        "output": {"uri": f"s3://{bucket}/{output or name + '/'}"},
        "storage": {"endpoint": endpoint, **({"credentialsSecret": secret} if secret else {})},
        "resources": {"gpu": "L40S-48GB", "cpu": "1", "memory": "2Gi"},
        "runPolicy": {"backoffLimit": backoff_limit},
    }
    for section, values in overrides.items():
        if isinstance(values, dict):
            spec.setdefault(section, {}).update(values)
        elif values is None:
            spec.pop(section, None)
        else:
            spec[section] = values
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name}, "spec": spec}


def use_hub_model(job: dict[str, Any], repo: str, token_secret: str | None = None) -> dict[str, Any]:
    """Point `job` at the stand-in hub's copy of FLUX.1-Kontext-dev (the tiny model under the real id). The operator
    admits a job on that id only when the real model's measured peak fits its 48 GB class (docs/benchmarks.md §6),
    so the job keeps the real model's defaults: bf16 and gradient checkpointing (fp32, or no checkpointing at 512 px,
    would be refused as InvalidSpec before any pod)."""
    job["spec"]["model"] = {"base": repo, **({"tokenSecret": {"name": token_secret}} if token_secret else {})}
    job["spec"]["training"]["gradientCheckpointing"] = True
    return job


def upload_pairs(client, bucket: str, prefix: str, pairs_dir: Path) -> int:
    """Upload a folder of pairs (control/, target/) under `prefix`; returns the number of pairs."""
    for path in sorted(pairs_dir.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}{path.relative_to(pairs_dir).as_posix()}")
    return len(list((pairs_dir / "control").iterdir()))


def keys(client, bucket: str, prefix: str = "") -> dict[str, int]:
    """{key: size} of every object under `prefix`."""
    found: dict[str, int] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        found.update({item["Key"]: item["Size"] for item in page.get("Contents", [])})
    return found


@dataclass
class Checkpoints:
    """Checkpoint folders under an output prefix: {step: {file name: size}}, and which are complete."""

    files: dict[int, dict[str, int]] = field(default_factory=dict)
    markers: dict[int, dict[str, Any]] = field(default_factory=dict)

    @property
    def complete(self) -> list[int]:
        """Steps whose COMPLETE marker lists exactly the files present, with their sizes."""
        return sorted(
            step
            for step, marker in self.markers.items()
            if all(self.files[step].get(name) == size for name, size in marker.get("files", {}).items())
        )

    @property
    def partial(self) -> list[int]:
        return sorted(set(self.files) - set(self.complete))

    @property
    def newest_complete(self) -> int:
        return max(self.complete, default=0)


def checkpoints(client, bucket: str, prefix: str) -> Checkpoints:
    found = Checkpoints()
    for key, size in keys(client, bucket, prefix + "checkpoints/").items():
        match = _CHECKPOINT_KEY.search(key)
        if match:
            found.files.setdefault(int(match.group(1)), {})[match.group(2)] = size
    for step, files in found.files.items():
        if "COMPLETE" in files:
            body = client.get_object(Bucket=bucket, Key=f"{prefix}checkpoints/step-{step:06d}/COMPLETE")["Body"]
            found.markers[step] = json.loads(body.read())
    return found


def log_records(agent: NodeAgent, namespace: str, pod: str) -> list[dict[str, Any]]:
    """The JSON log lines of a pod the node agent ran (other lines are skipped)."""
    records = []
    for line in agent.pod_log(namespace, pod).splitlines():
        if line.startswith("{"):
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


def resumed_from(agent: NodeAgent, namespace: str, pod: str) -> int:
    """The step a trainer pod resumed from, 0 when it started afresh. Read it once the pod has trained a step: the
    trainer logs its resume (`resumed_from_step`) before the first step."""
    steps = [int(e["resumed_from_step"]) for e in log_records(agent, namespace, pod) if "resumed_from_step" in e]
    assert len(steps) <= 1, f"{pod} resumed {len(steps)} times"
    return steps[0] if steps else 0


class StepWatcher(threading.Thread):
    """Polls a trainer's Prometheus endpoint (`kontext_train_step`) 20 times a second and keeps the last value it
    read, so the step at which a trainer died is known to within one poll after the fact."""

    def __init__(self, port: int, interval: float = 0.05):
        super().__init__(daemon=True, name=f"steps-{port}")
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.interval = interval
        self.step: int | None = None
        self.read_at = 0.0
        self.stopped = threading.Event()

    def read(self) -> int | None:
        try:
            with urllib.request.urlopen(self.url, timeout=1) as response:
                text = response.read().decode()
        except (urllib.error.URLError, OSError, ValueError):
            return None
        match = re.search(r"^kontext_train_step\{[^}]*\} ([0-9.e+]+)$", text, re.MULTILINE)
        return int(float(match.group(1))) if match else None

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            step = self.read()
            if step is not None:
                self.step, self.read_at = step, time.monotonic()

    def reset(self) -> None:
        self.step, self.read_at = None, 0.0

    def wait_step(self, at_least: int, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.step is not None and self.step >= at_least:
                return self.step
            time.sleep(0.02)
        raise TimeoutError(f"the trainer did not reach step {at_least} in {timeout:.0f}s (last: {self.step})")


def wait_until(predicate, timeout: float, what: str, interval: float = 0.2):
    """`wait_for` with the timeout and what is awaited first, as the fault tests read."""
    return wait_for(predicate, timeout, interval, what)


def scan_for(secrets: dict[str, str], texts: dict[str, str]) -> list[str]:
    """Where any secret value occurs: 'source: secret name' for each hit (empty when clean)."""
    return [f"{source}: {name}" for source, text in texts.items() for name, value in secrets.items() if value in text]


@dataclass
class FaultStore:
    """What a training-job fault test starts from: the suite's MinIO, a fresh bucket, the tiny model, the pairs."""

    minio: MinioServer
    bucket: str
    model: Path
    pairs: Path

    def client(self):
        return self.minio.client()

    @property
    def secrets(self) -> dict[str, str]:
        """The credentials, named, as the secret scans look for them."""
        return {"access key": self.minio.access_key, "secret key": self.minio.secret_key}

    def create_secret(self, jobs: Kljs) -> None:
        """The job namespace's `s3-credentials` Secret with this MinIO's keys."""
        jobs.create_s3_secret(self.minio.access_key, self.minio.secret_key)

    def upload_pairs(self, prefix: str = "data/") -> int:
        return upload_pairs(self.client(), self.bucket, prefix, self.pairs)

    def job(self, name: str, *, endpoint: str | None = None, **kwargs) -> dict:
        """`support.trainer_job` on this bucket and model, through `endpoint` (default: MinIO itself)."""
        return trainer_job(
            name, bucket=self.bucket, endpoint=endpoint or self.minio.endpoint, model=self.model, **kwargs
        )
