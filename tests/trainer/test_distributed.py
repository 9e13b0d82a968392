"""Data-parallel training on CPUs: `torchrun` with gloo, the real `kontext-lora train` in every rank.

- Two ranks at batchSize 1 train the LoRA one process trains at batchSize 2 (same seed, `learningRateScaling:
  none`), and rank 0 is the only process that writes the output, the shared encoding cache or rank 0's work folder.
- One rank SIGKILLed mid-run: torchrun stops the other and fails; the next group (torchrun again, as the operator's
  next Job in a cluster) resumes from the newest complete checkpoint and ends with the same LoRA.
- SIGTERM to rank 1 alone: both ranks stop after the same step, with the one checkpoint rank 0 saves there.

Tolerance (`ATOL`): the two runs differ only in float32 summation order — DDP's gloo all-reduce averages two
1-pair gradients where one process averages one 2-pair loss — about 1e-7 relative per gradient, which AdamW's
normalised updates carry into the weights at most at the learning rate's scale (3e-3 per step). Measured: a max
abs difference of 7.4e-7 here (12 steps; 8e-6 in a 6-step run on 6 pairs); ATOL = 1e-4 leaves 12x headroom over the
larger and is 1/125 of what the last four steps of training move the LoRA (1.25e-2; asserted, so the comparison
could tell a wrong shard or noise from a right one).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

from .helpers import KONTEXT_LORA, job_document, run_cli, trainer_env, wait_for, write_job

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
AUDIT = Path(__file__).with_name("write_audit")
STEPS, SAVE_EVERY, PAIRS = 12, 4, 4
ATOL = 1e-4


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _job(root: Path, name: str, model: Path, pairs: Path, batch: int, world: int) -> Path:
    document = job_document(
        name,
        f"file://{model}",
        f"file://{pairs}/",
        f"file://{root}/{name}/out/",
        training={"steps": STEPS, "batchSize": batch, "learningRateScaling": "none"},
        checkpoints={"saveEvery": SAVE_EVERY, "keep": 2},
        resources={"count": world},
    )
    document["spec"]["dataset"]["heldOutPairs"] = 0  # PAIRS training pairs: whole global batches of 2
    return write_job(root / f"{name}.yaml", document)


def _torchrun(job: Path, work: Path, env: dict, *extra: str) -> list[str]:
    return [
        TORCHRUN,
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(_free_port()),
        *extra,
        "--no-python",
        KONTEXT_LORA,
        "train",
        str(job),
        "--work-dir",
        str(work),
    ]


def _lora(path: Path):
    import safetensors.torch

    return safetensors.torch.load_file(path)


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def cpu_pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kontext_trainer.data.synthetic import write_example_pairs

    return write_example_pairs(tmp_path_factory.mktemp("pairs"), count=PAIRS)


@pytest.fixture(scope="module")
def one_process(tiny_model: Path, cpu_pairs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One process at batchSize 2: the reference LoRA's output folder."""
    root = tmp_path_factory.mktemp("one-process")
    job = _job(root, "single", tiny_model, cpu_pairs, batch=2, world=1)
    env = trainer_env(KONTEXT_LORA_PREVIEW_STEPS="0")
    finished = run_cli(["train", str(job), "--work-dir", str(root / "work")], env, root / "train.log")
    assert finished.code == 0, finished.output[-4000:]
    return root / "single" / "out"


def test_two_ranks_train_the_lora_of_one_process_with_twice_the_batch_and_only_rank_0_writes(
    tiny_model: Path, cpu_pairs: Path, one_process: Path, tmp_path: Path
) -> None:
    audit = tmp_path / "audit"
    audit.mkdir()
    env = trainer_env(
        KONTEXT_LORA_PREVIEW_STEPS="0",
        PYTHONPATH=os.pathsep.join(filter(None, [str(AUDIT), os.environ.get("PYTHONPATH")])),
        KONTEXT_TEST_AUDIT_ROOT=str(tmp_path),
        KONTEXT_TEST_AUDIT_LOG=str(audit),
    )
    job = _job(tmp_path, "ranks", tiny_model, cpu_pairs, batch=1, world=2)
    work = tmp_path / "work"
    with (tmp_path / "torchrun.log").open("w") as log:
        code = subprocess.run(_torchrun(job, work, env), stdout=log, stderr=subprocess.STDOUT, env=env, timeout=300)
    output = (tmp_path / "torchrun.log").read_text()
    assert code.returncode == 0, output[-4000:]
    assert "data-parallel over 2 processes: each optimiser step sees 2 pairs" in output

    two, one = _lora(tmp_path / "ranks" / "out" / "ranks.safetensors"), _lora(one_process / "single.safetensors")
    difference = _max_difference(two, one)
    print(f"\nmax |LoRA(2 ranks x batch 1) - LoRA(1 process x batch 2)| = {difference:.2e} (tolerance {ATOL:g})")
    assert difference <= ATOL
    earlier = STEPS - SAVE_EVERY
    moved = _max_difference(
        one, _lora(one_process / "checkpoints" / f"step-{earlier:06d}" / f"single-step-{earlier:06d}.safetensors")
    )
    print(f"the last {SAVE_EVERY} steps moved the LoRA by {moved:.2e}")
    assert moved > 100 * ATOL, f"{SAVE_EVERY} steps must move the LoRA far more than the tolerance"

    # Exactly one writer: every path under the output, the shared encoding cache and rank 0's work folder was
    # written by rank 0 alone; rank 1 wrote only inside its own work folder (it finds everything rank 0 wrote).
    writers: dict[str, set[str]] = defaultdict(set)
    for line in "".join(p.read_text() for p in audit.iterdir()).splitlines():
        rank, _, path = line.split("\t")
        writers[path].add(rank)
    shared = [p for p in writers if not p.startswith(str(work / "rank-1"))]
    outputs = [p for p in shared if p.startswith(str(tmp_path / "ranks" / "out"))]
    assert any(p.endswith("ranks.safetensors") for p in outputs) and any("COMPLETE" in p for p in outputs)
    assert any("kontext-lora-cache" in p for p in shared), "the shared encoding cache was written"
    assert {p: writers[p] for p in shared if writers[p] != {"0"}} == {}
    assert all(p.startswith(str(work / "rank-1")) for p, ranks in writers.items() if "1" in ranks)


def test_one_rank_killed_the_group_stops_and_the_next_group_resumes_from_the_newest_checkpoint(
    tiny_model: Path, cpu_pairs: Path, one_process: Path, tmp_path: Path
) -> None:
    """What a pod's death does in the cluster, on one machine: torchrun stops the surviving rank and fails; the next
    group (the operator's next Job; here torchrun again) resumes from the newest complete checkpoint."""
    env = trainer_env(KONTEXT_LORA_PREVIEW_STEPS="0")
    job = _job(tmp_path, "killed", tiny_model, cpu_pairs, batch=1, world=2)
    out = tmp_path / "killed" / "out"
    code, killed_after, _ = _signal_rank_1(job, out, tmp_path, env, signal.SIGKILL)
    assert code != 0, "torchrun reports the group's failure"
    assert not (out / "killed.safetensors").exists()

    with (tmp_path / "restart.log").open("w") as log:
        code = subprocess.run(
            _torchrun(job, tmp_path / "work", env), stdout=log, stderr=subprocess.STDOUT, env=env, timeout=300
        ).returncode
    output = (tmp_path / "restart.log").read_text()
    assert code == 0, output[-4000:]
    resumed = [int(m) for m in re.findall(r"resuming from \S+ \(step (\d+)\)", output)]
    # The newest complete checkpoint: the one there at the kill, or the next if rank 0 finished it before torchrun
    # stopped it. Checkpoints are SAVE_EVERY apart, so at most SAVE_EVERY steps are lost.
    assert len(resumed) == 1 and resumed[0] in (killed_after, killed_after + SAVE_EVERY), output[-4000:]
    print(f"\nrank 1 SIGKILLed after checkpoint {killed_after}; the next group resumed at step {resumed[0]}")
    difference = _max_difference(_lora(out / "killed.safetensors"), _lora(one_process / "single.safetensors"))
    assert difference <= ATOL


def test_sigterm_to_one_rank_stops_every_rank_after_the_same_step_with_one_checkpoint(
    tiny_model: Path, cpu_pairs: Path, tmp_path: Path
) -> None:
    """Only rank 1 is told to stop (as when one node of a job is drained): rank 0 learns it in the step's agreement,
    saves the one checkpoint at that step, and both exit 143."""
    env = trainer_env(KONTEXT_LORA_PREVIEW_STEPS="0")
    job = _job(tmp_path, "stopped", tiny_model, cpu_pairs, batch=1, world=2)
    code, _, output = _signal_rank_1(job, tmp_path / "stopped" / "out", tmp_path, env, signal.SIGTERM)
    out = tmp_path / "stopped" / "out"
    assert code != 0, output[-3000:]
    stopped = re.findall(r"stopped by SIGTERM after step (\d+)/", output)
    # Both ranks name the same step; the checkpoint there is the stop's (between the regular ones).
    assert len(stopped) == 2 and len(set(stopped)) == 1, output[-4000:]
    step = int(stopped[0])
    assert SAVE_EVERY < step < STEPS
    validation = json.loads((out / "checkpoints" / f"step-{step:06d}" / "validation.json").read_text())
    assert validation["stoppedBy"] == "SIGTERM"
    print(f"\nSIGTERM to rank 1 only: both ranks stopped after step {step}, one checkpoint there")


def _signal_rank_1(job: Path, out: Path, tmp_path: Path, env: dict, sig: int) -> tuple[int, int, str]:
    """Run the job on 2 ranks, send `sig` to rank 1 alone once the first checkpoint is complete; (torchrun's exit
    code, the newest complete checkpoint's step when the signal went, the log)."""
    log_path = tmp_path / f"{job.stem}.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            _torchrun(job, tmp_path / "work", env), stdout=log, stderr=subprocess.STDOUT, env=env
        )
        try:
            wait_for((out / "checkpoints" / f"step-{SAVE_EVERY:06d}" / "COMPLETE").exists, 240, "the first checkpoint")
            os.kill(_worker_pid(process.pid, rank=1), sig)
            signalled_after = _steps_done(out)
            code = process.wait(timeout=120)
        finally:
            if process.poll() is None:
                process.kill()
    return code, signalled_after, log_path.read_text()


def _worker_pid(agent: int, rank: int) -> int:
    """The pid of the torchrun worker with RANK=`rank` among the agent's children."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for child in Path(f"/proc/{agent}/task/{agent}/children").read_text().split():
            try:
                environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in environ:
                return int(child)
        time.sleep(0.2)
    raise AssertionError(f"no worker with RANK={rank} under torchrun {agent}")


def _steps_done(out: Path) -> int:
    """The newest complete checkpoint's step (what a kill can at most lose the steps after)."""
    steps = [int(p.parent.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*/COMPLETE")]
    return max(steps, default=0)


@pytest.mark.parametrize(
    ("training", "refused"),
    [
        ({"steps": 12, "learningRateScaling": "none"}, False),  # same rate and steps at any world size
        ({"steps": 12, "learningRateScaling": "sqrt"}, True),  # the rate would change mid-run
        ({"steps": "auto", "learningRateScaling": "none"}, True),  # so would the step count
    ],
)
def test_a_checkpoint_from_another_world_size_resumes_only_on_the_same_schedule(training: dict, refused: bool) -> None:
    from types import SimpleNamespace

    from kontext_trainer.distributed import World
    from kontext_trainer.errors import CheckpointMismatchError
    from kontext_trainer.stages.checkpointing import Checkpointer

    from kontext_lora.api import parse_job

    document = job_document("resize", "file:///m", "file:///pairs/", "file:///out/", training=training)
    spec = parse_job(document).spec
    taken = Checkpointer(SimpleNamespace(world=World(size=2), spec=spec))
    state = {"schedule": taken._schedule(spec.total_steps(40, 2))}
    resuming = Checkpointer(SimpleNamespace(world=World(size=4), spec=spec))
    if not refused:
        resuming._same_schedule(state, spec.total_steps(40, 4), "step-000004/")
        return
    with pytest.raises(CheckpointMismatchError, match="taken with 2 training processes") as error:
        resuming._same_schedule(state, spec.total_steps(40, 4), "step-000004/")
    assert "learningRateScaling: none" in str(error.value)
