"""Time from a training pod's start to its first training step: a first run, a restart, a second job — ours against
an earlier trainer (`--reference-cli`, e.g. a checkout of main before the preparation phase), side by side.

Each "pod" is a `kontext-lora train` process with an empty work folder (a pod's emptyDir), on the same pairs and model
(file://, so storage speed is not what is measured). The clock runs from the process's start to the first step its
/metrics endpoint shows. Ours runs as the cluster runs it: a `kontext-lora prepare` process first (the preparation
pod: CPU only, timed apart — no GPU is held meanwhile), then the training process with `KONTEXT_LORA_PREPARED=true`.
The reference does everything in the training process. The restart is a graceful stop after the first step (the
checkpoint saved) followed by a new process with a new work folder; the second job trains another output on the same
pairs. With the tiny model the encoders cost little: this measures the machinery (preparation skipped in the GPU
pod, encodings found in the shared cache); docs/benchmarks.md turns it into the real model's expected saving.

    .venv/bin/python -m bench.first_step --reference-cli /path/to/old/.venv/bin/kontext-lora [--pairs 12] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

from .harness import console

OURS = str(Path(sys.executable).with_name("kontext-lora"))
SCENARIOS = ("first run", "restart", "second job")


def _job(name: str, model: Path, pairs: Path, output: Path, steps: int) -> dict:
    return {
        "apiVersion": "kontext-lora.io/v1alpha1",
        "kind": "KontextLoRAJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"base": str(model), "dtype": "fp32"},
            "dataset": {
                "uri": pairs.as_uri() + "/",
                "triggerWord": "RMV,",
                "defaultCaption": "remove the coloured shape",
                "resolution": 512,
                "heldOutPairs": 1,
            },
            "lora": {"rank": 8},
            "training": {"steps": steps, "learningRate": 3.0e-3, "gradientCheckpointing": False},
            "checkpoints": {"saveEvery": 1, "keep": 1},
            "output": {"uri": output.as_uri() + "/"},
        },
    }


def _metrics_step(port: int) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as response:
            text = response.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("kontext_train_step{"):
            return int(float(line.rsplit(" ", 1)[1]))
    return None


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    # PYTHONDONTWRITEBYTECODE: a reference checkout's tree is read, never written.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KONTEXT_LORA_PREVIEW_STEPS": "0", "PYTHONDONTWRITEBYTECODE": "1"}
    env.update(extra)
    return env


def _train_until_first_step(cli: str, job: Path, work: Path, env: dict[str, str], stop: bool, after: int) -> float:
    """Seconds from the process's start to its first step (past step `after`, where a restart resumes at the
    earliest); `stop`: SIGTERM it then (it saves the step it reached)."""
    port = _free_port()
    log = work.with_suffix(".log").open("w")
    began = time.monotonic()
    process = subprocess.Popen(
        [cli, "train", str(job), "--work-dir", str(work), "--metrics-port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{cli} exited with {process.returncode} before its first step; see {log.name}")
            step = _metrics_step(port)
            if step is not None and step >= 1 + after:
                seconds = time.monotonic() - began
                break
            time.sleep(0.05)
        if stop:
            process.send_signal(signal.SIGTERM)
        process.wait(600)
        return seconds
    finally:
        if process.poll() is None:
            process.kill()
        log.close()


def _scenarios(cli: str, ours: bool, root: Path, model: Path, pairs: Path, steps: int) -> dict[str, dict[str, float]]:
    """The three "pods" for one trainer; for ours each preceded by its preparation process (timed apart)."""
    results: dict[str, dict[str, float]] = {}
    jobs = {
        "first run": _job("first", model, pairs, root / "out-first", steps),
        "restart": _job("first", model, pairs, root / "out-first", steps),
        "second job": _job("second", model, pairs, root / "out-second", steps),
    }
    for scenario, document in jobs.items():
        job = root / f"{document['metadata']['name']}.yaml"
        job.write_text(yaml.safe_dump(document))
        work = root / f"work-{scenario.replace(' ', '-')}"
        figures: dict[str, float] = {}
        env = _env()
        if ours:
            if scenario != "restart":  # a restarted pod's preparation ran before the first pod
                began = time.monotonic()
                subprocess.run(
                    [cli, "prepare", str(job), "--work-dir", str(work) + "-prep"],
                    env=env,
                    check=True,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                figures["preparation_s"] = round(time.monotonic() - began, 2)
            env = _env(KONTEXT_LORA_PREPARED="true")
        restart = scenario == "restart"
        seconds = _train_until_first_step(cli, job, work, env, stop=scenario == "first run", after=1 if restart else 0)
        figures["to_first_step_s"] = round(seconds, 2)
        results[scenario] = figures
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference-cli", default=None, help="kontext-lora executable of the trainer to compare")
    parser.add_argument("--pairs", type=int, default=12)
    parser.add_argument("--smoke", action="store_true", help="4 pairs, ours only against itself")
    parser.add_argument("--json", type=Path, default=None)
    options = parser.parse_args(argv)
    from kontext_trainer.data.synthetic import write_example_pairs
    from kontext_trainer.demo import ensure_tiny_model

    model = ensure_tiny_model()
    reference = options.reference_cli or OURS
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="first-step-") as scratch:
        root = Path(scratch)
        pairs = write_example_pairs(root / "pairs", count=4 if options.smoke else options.pairs)
        for label, cli, ours in (("reference", reference, False), ("ours", OURS, True)):
            folder = root / label
            folder.mkdir()
            results[label] = _scenarios(cli, ours, folder, model, pairs, steps=3)
            shutil.rmtree(folder / "out-first", ignore_errors=True)
    count = 4 if options.smoke else options.pairs
    console.print(f"time from a training process's start to its first step ({count} pairs, tiny model, CPU)")
    console.print(
        f"reference: {reference}" + (" (ours: the smoke run compares ours with itself)" if reference == OURS else "")
    )
    for scenario in SCENARIOS:
        before = results["reference"][scenario]["to_first_step_s"]
        after = results["ours"][scenario]["to_first_step_s"]
        prep = results["ours"][scenario].get("preparation_s")
        extra = f"; preparation beforehand {prep:.1f} s, CPU only" if prep is not None else ""
        ratio = before / after
        console.print(f"  {scenario:<11} reference {before:6.1f} s   ours {after:6.1f} s   ratio {ratio:.2f}{extra}")
    if options.json:
        options.json.write_text(json.dumps({"reference_cli": reference, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
