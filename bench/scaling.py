"""Data-parallel scaling: training samples per second at world size 1 and N, side by side, as ratio and efficiency.

Each run is the real trainer (`kontext-lora train`, the tiny model, file:// pairs): world 1 as one process, world N
under `torchrun --nproc-per-node N` (gloo on CPUs; NCCL on GPUs with `--gpus N`), the same batchSize per rank, so a
step of world N trains N times the pairs. Runs alternate (1, N, 1, N, ...). The clock is rank 0's log: from its first
step to its last (the first step, which pays for warm-up, is left out), so start-up, encoding and the final upload are
not in it. samples/s = world x batchSize x (steps - 1) / that time; ratio = samples/s(N) / samples/s(1);
efficiency = ratio / N.

On CPUs every rank gets one thread (`OMP_NUM_THREADS=1`): world 1 uses one core, world 2 two. On the 2-core shared
machine this measures gloo's all-reduce and the ranks' lock-step against a second core, not a GPU's scaling; report
the load beside it. `--gpus N` runs the same on N CUDA GPUs (world 1 on one of them) when a device is lent.

    .venv/bin/python -m bench.scaling [--world 2] [--steps 20] [--repeats 2] [--gpus N] [--smoke] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path

import yaml

from .harness import Sample, console, load_average, machine, print_table, write_result

BIN = Path(sys.executable).parent
KONTEXT_LORA, TORCHRUN = str(BIN / "kontext-lora"), str(BIN / "torchrun")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _job(name: str, model: Path, pairs: Path, output: Path, steps: int, batch: int, world: int, gpu: bool) -> dict:
    return {
        "apiVersion": "kontext-lora.io/v1alpha1",
        "kind": "KontextLoRAJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"base": str(model), "dtype": "bf16" if gpu else "fp32"},
            "dataset": {
                "uri": pairs.as_uri() + "/",
                "triggerWord": "RMV,",
                "defaultCaption": "remove the coloured shape",
                "resolution": 512,
                "heldOutPairs": 0,
            },
            "lora": {"rank": 16},
            "training": {
                "steps": steps,
                "batchSize": batch,
                "learningRate": 1e-4,
                "learningRateScaling": "none",
                "gradientCheckpointing": False,
            },
            "checkpoints": {"saveEvery": steps, "keep": 1},
            "output": {"uri": output.as_uri() + "/"},
            "resources": {"count": world},
        },
    }


def _training_seconds(log: str) -> tuple[float, int]:
    """(seconds from rank 0's first step to its last, steps in between) from the JSON log lines."""
    first = last = None
    last_step = 0
    for line in log.splitlines():
        if not line.startswith("{"):
            continue
        record = json.loads(line)
        when = datetime.fromisoformat(record["time"]).timestamp()
        if "time_to_first_step" in record:
            first = when
        if record.get("step") and record.get("total_steps") and record["step"] == record["total_steps"]:
            last, last_step = when, record["step"]
    if first is None or last is None:
        raise RuntimeError(f"no first/last step in the trainer's log:\n{log[-3000:]}")
    return last - first, last_step - 1


def run_once(root: Path, model: Path, pairs: Path, world: int, steps: int, batch: int, gpu: bool, index: int) -> dict:
    name = f"w{world}-{index}"
    job = root / f"{name}.yaml"
    job.write_text(yaml.safe_dump(_job(name, model, pairs, root / name / "out", steps, batch, world, gpu)))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "OMP_WAIT_POLICY": "PASSIVE",
        "KONTEXT_LORA_LOG_JSON": "true",
        "KONTEXT_LORA_PREVIEW_STEPS": "0",
    }
    if gpu and world == 1:
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    train = [KONTEXT_LORA, "train", str(job), "--work-dir", str(root / name / "work")]
    if world > 1:
        train = [
            TORCHRUN,
            "--nproc-per-node",
            str(world),
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(_free_port()),
            "--no-python",
            *train,
        ]
    done = subprocess.run(train, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"world {world} failed ({done.returncode}):\n{(done.stdout + done.stderr)[-4000:]}")
    seconds, timed_steps = _training_seconds(done.stdout + done.stderr)
    return {"seconds": seconds, "samples": world * batch * timed_steps, "steps": timed_steps}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2, help="world size compared with 1 on CPUs (default 2)")
    parser.add_argument("--gpus", type=int, default=0, help="compare 1 GPU with this many CUDA GPUs instead")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=1, help="batchSize per rank")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="6 steps, one repeat (CI keeps it working)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.repeats = 6, 1
    gpu = args.gpus > 0
    world = args.gpus if gpu else args.world
    if gpu:
        import torch

        if torch.cuda.device_count() < world:
            parser.error(f"--gpus {world}: only {torch.cuda.device_count()} CUDA devices here")

    from kontext_trainer.data.synthetic import write_example_pairs
    from kontext_trainer.demo import ensure_tiny_model

    model = ensure_tiny_model()
    samples = {1: Sample("world 1"), world: Sample(f"world {world}")}
    rates: dict[int, list[float]] = {1: [], world: []}
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as scratch:
        root = Path(scratch)
        pairs = write_example_pairs(root / "pairs", count=args.pairs)
        for index in range(args.repeats):
            for size in (1, world):  # alternating: drifts of the machine land on both sides
                result = run_once(root, model, pairs, size, args.steps, args.batch, gpu, index)
                samples[size].seconds.append(result["seconds"])
                rates[size].append(result["samples"] / result["seconds"])
    median = {size: statistics.median(r) for size, r in rates.items()}
    ratio = median[world] / median[1]
    efficiency = ratio / world
    for size, sample in samples.items():
        sample.extra["samples/s"] = median[size]
    print_table(
        f"training time of {args.steps - 1} steps, batchSize {args.batch} per rank ({'GPU' if gpu else 'CPU, gloo'})",
        list(samples.values()),
        extra_columns=("samples/s",),
    )
    console.print(
        f"samples/s: world 1 {median[1]:.2f}, world {world} {median[world]:.2f}; "
        f"ratio world {world}/world 1 = {ratio:.2f}, efficiency {efficiency:.0%}  ({machine()}; load {load_average()})"
    )
    write_result(
        args.json,
        {
            "device": "cuda" if gpu else "cpu",
            "world": world,
            "steps": args.steps,
            "batch_per_rank": args.batch,
            "samples_per_second": {str(k): v for k, v in median.items()},
            "runs": {str(k): v for k, v in rates.items()},
            "ratio": ratio,
            "efficiency": efficiency,
            "load": load_average(),
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
