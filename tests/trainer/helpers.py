"""Helpers for the trainer's tests: job documents, running the CLI, MinIO listings, polling.

Runs go through the real `kontext-lora` command in a subprocess wherever the behaviour is a process's
(exit codes, SIGKILL, metrics served while training, logs), in-process where only the data matters.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parents[2]
KONTEXT_LORA = str(Path(sys.executable).with_name("kontext-lora"))
# One thread per trainer: the tiny model's matrices are too small for a second thread to pay off much, and on
# a machine shared with other test runs two spinning OpenMP threads per process slow everything down ~2.5x.
TRAINER_THREADS = "1"
# Steps of the runs that are killed or stopped and resumed; conftest.uninterrupted_lora trains them in one go.
RESUME_STEPS = 12


def job_document(name: str, base: str, dataset: str, output: str, **spec: Any) -> dict[str, Any]:
    """A small, fast KontextLoRAJob (fp32, 512 px, rank 8, no gradient checkpointing) with overrides."""
    document: dict[str, Any] = {
        "apiVersion": "kontext-lora.io/v1alpha1",
        "kind": "KontextLoRAJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"base": base, "dtype": "fp32"},
            "dataset": {
                "uri": dataset,
                "triggerWord": "RMV,",
                "defaultCaption": "remove the coloured shape",
                "resolution": 512,
                "heldOutPairs": 1,
            },
            "lora": {"rank": 8},
            "training": {"steps": 12, "learningRate": 3.0e-3, "gradientCheckpointing": False},
            "checkpoints": {"saveEvery": 4, "keep": 2},
            "output": {"uri": output},
        },
    }
    for section, values in spec.items():
        if isinstance(values, dict):
            document["spec"].setdefault(section, {}).update(values)
        else:
            document["spec"][section] = values
    return document


def write_job(path: Path, document: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def trainer_env(**extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": TRAINER_THREADS,
        "PYTHONUNBUFFERED": "1",
        "KONTEXT_LORA_PREVIEW_STEPS": "2",
    }
    env.update(extra)
    return env


@dataclass
class Finished:
    code: int
    output: str  # stdout and stderr together
    seconds: float


def run_cli(args: Sequence[str], env: dict[str, str], log: Path, timeout: float = 300) -> Finished:
    """Run `kontext-lora ARGS` to completion; its combined output is kept in `log` as well."""
    started = time.monotonic()
    with log.open("w") as handle:
        code = subprocess.run(
            [KONTEXT_LORA, *args], stdout=handle, stderr=subprocess.STDOUT, env=env, timeout=timeout
        ).returncode
    return Finished(code, log.read_text(), time.monotonic() - started)


def upload_tree(client, bucket: str, root: Path, prefix: str) -> int:
    """Upload every file under `root` to s3://bucket/prefix/...; returns the count."""
    count = 0
    for path in sorted(root.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}{path.relative_to(root).as_posix()}")
            count += 1
    return count


def s3_keys(client, bucket: str, prefix: str = "") -> list[str]:
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [item["Key"] for item in page.get("Contents", [])]
    return sorted(keys)


def wait_for(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def checkpoint_files(keys: list[str], prefix: str) -> dict[int, set[str]]:
    """{step: file names} of the checkpoint folders among `keys` (an S3 listing under `prefix`)."""
    found: dict[int, set[str]] = {}
    for key in keys:
        match = re.fullmatch(rf"{re.escape(prefix)}checkpoints/step-(\d+)/(.+)", key)
        if match:
            found.setdefault(int(match.group(1)), set()).add(match.group(2))
    return found


def metrics_step(port: int) -> int | None:
    """The step a trainer's /metrics shows (0 before the first step); None while it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except (OSError, ValueError):
        return None
    match = re.search(r"^kontext_train_step\{[^}]*\} (\S+)$", text, re.MULTILINE)
    return int(float(match.group(1))) if match else None


def wait_for_step(process: subprocess.Popen, port: int, minimum: int, timeout: float = 300) -> int:
    """Wait until the trainer's /metrics shows at least `minimum` steps; the step seen. Fails if it exits first."""
    seen: list[int] = []

    def reached() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"the trainer exited with {process.returncode} before step {minimum}")
        step = metrics_step(port)
        if step is not None and step >= minimum:
            seen.append(step)
            return True
        return False

    wait_for(reached, timeout, f"step {minimum} on the trainer's metrics", interval=0.02)
    return seen[0]


def download_lora(client, bucket: str, key: str, folder: Path) -> dict[str, torch.Tensor]:
    import safetensors.torch

    path = folder / key.replace("/", "_")
    client.download_file(bucket, key, str(path))
    return safetensors.torch.load_file(path)


def assert_same_lora(resumed: dict[str, torch.Tensor], uninterrupted: dict[str, torch.Tensor]) -> None:
    """Equal to 1e-6: a resumed run is the uninterrupted run."""
    import torch

    assert resumed.keys() == uninterrupted.keys()
    for key in resumed:
        torch.testing.assert_close(resumed[key], uninterrupted[key], rtol=0, atol=1e-6)


def random_inputs(config: Any, batch: int, latent_hw: tuple[int, int], text_tokens: int, generator) -> Any:
    """Random `flux_math.KontextInputs` for a transformer with `config`: a target and a same-size control of
    `latent_hw` latents (packed 2x2), `text_tokens` T5 tokens; drawn in that order from `generator`."""
    import torch
    from kontext_trainer import flux_math

    tokens = (latent_hw[0] // 2) * (latent_hw[1] // 2)
    channels = config.in_channels
    return flux_math.KontextInputs(
        target=torch.randn(batch, tokens, channels, generator=generator),
        control=torch.randn(batch, tokens, channels, generator=generator),
        prompt_embeds=torch.randn(batch, text_tokens, config.joint_attention_dim, generator=generator),
        pooled_prompt_embeds=torch.randn(batch, config.pooled_projection_dim, generator=generator),
        img_ids=flux_math.kontext_image_ids(latent_hw, latent_hw),
        txt_ids=flux_math.text_ids(text_tokens),
    )
