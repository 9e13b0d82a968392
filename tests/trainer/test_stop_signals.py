"""Graceful stop: SIGTERM (the pod deleted, evicted, preempted, its node drained) or Ctrl-C during training finishes
the step in progress, saves a checkpoint at it and exits 143 / 130; the restart resumes there, losing no step, and
ends with the uninterrupted run's LoRA. A second signal aborts at once; a signal before training exits without one."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from kontext_trainer.errors import ExitCode
from kontext_trainer.signals import Interrupted, StopSignals

from tests.infra.processes import free_port
from tests.infra.s3_fault_proxy import S3FaultProxy

from .helpers import (
    KONTEXT_LORA,
    RESUME_STEPS,
    assert_same_lora,
    checkpoint_files,
    download_lora,
    job_document,
    run_cli,
    s3_keys,
    trainer_env,
    upload_tree,
    wait_for,
    wait_for_step,
    write_job,
)

# One regular checkpoint (6) before the stop, the next (12) the last step: a stop anywhere in 7..11 is between them.
STEPS, SAVE_EVERY, KEEP = RESUME_STEPS, 6, 1
STOPPED = re.compile(r"stopped by (SIG\w+) after step (\d+)/(\d+): checkpoint (\S+) saved; (.+? from it)")


def _job(tmp_path: Path, name: str, tiny_model: Path, dataset: str, output: str) -> Path:
    document = job_document(
        name,
        f"file://{tiny_model}",
        dataset,
        output,
        training={"steps": STEPS},
        checkpoints={"saveEvery": SAVE_EVERY, "keep": KEEP},
    )
    return write_job(tmp_path / f"{name}.yaml", document)


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("w") as handle:
        return subprocess.Popen([KONTEXT_LORA, *args], stdout=handle, stderr=subprocess.STDOUT, env=env)


def _wait(process: subprocess.Popen, timeout: float, log: Path) -> int:
    """The exit code; a process still running after `timeout` is killed and its log's end shown."""
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {timeout:.0f}s after the signal; its log ends:\n{log.read_text()[-6000:]}")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_sigterm_between_checkpoints_saves_the_step_reached_and_the_restart_loses_nothing(
    minio,
    bucket: str,
    s3_env: dict,
    tiny_model: Path,
    pairs_dir: Path,
    tmp_path: Path,
    uninterrupted_lora: dict[str, torch.Tensor],
) -> None:
    client = minio.client()
    upload_tree(client, bucket, pairs_dir, "pairs/")
    job = _job(tmp_path, "stopped", tiny_model, f"s3://{bucket}/pairs/", f"s3://{bucket}/out/")
    args = ["train", str(job), "--work-dir", str(tmp_path / "work")]
    env = trainer_env(KONTEXT_LORA_PREVIEW_STEPS="2")  # regular checkpoints get a preview, the stop's does not
    port = free_port()
    process = _start([*args, "--metrics-port", str(port)], env, tmp_path / "stopped.log")
    try:
        reached = wait_for_step(process, port, SAVE_EVERY + 1)  # past the checkpoint at 6
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
    finally:
        code = _wait(process, timeout=120, log=tmp_path / "stopped.log")
    seconds = time.monotonic() - signalled
    output = (tmp_path / "stopped.log").read_text()
    assert code == ExitCode.TERMINATED == 143, output[-4000:]
    assert "SIGTERM received: finishing the step in progress, then saving a checkpoint and exiting" in output

    # A complete checkpoint at the step reached: the step in progress was finished, none was lost.
    [stopped] = STOPPED.findall(output)
    step = int(stopped[1])
    prefix = f"s3://{bucket}/out/checkpoints/step-{step:06d}/"
    assert stopped == ("SIGTERM", str(step), str(STEPS), prefix, "run the same command again to resume from it")
    assert reached <= step < STEPS, (reached, step)
    print(f"\nSIGTERM after step {reached} (metrics): checkpoint at step {step}, exit {seconds:.2f}s after the signal")
    keys = s3_keys(client, bucket, "out/")
    at_stop = checkpoint_files(keys, "out/")
    # keep 1: the stop's checkpoint rotated the one at 6 out. No preview, no held-out loss: it is saved in a hurry.
    lora = f"stopped-step-{step:06d}.safetensors"
    assert at_stop == {step: {"COMPLETE", "training_state.pt", "validation.json", lora}}, keys

    def read_json(name: str) -> dict:
        body = client.get_object(Bucket=bucket, Key=f"out/checkpoints/step-{step:06d}/{name}")["Body"]
        return json.loads(body.read())

    marker = read_json("COMPLETE")
    assert marker["step"] == step and set(marker["files"]) == at_stop[step] - {"COMPLETE"}
    validation = read_json("validation.json")
    assert validation["stoppedBy"] == "SIGTERM" and validation["validationLoss"] is None, validation
    assert "out/stopped.safetensors" not in keys
    assert sorted(p.name for p in (tmp_path / "work" / "checkpoints").iterdir()) == [f"step-{step:06d}"]

    restarted = run_cli(args, env, tmp_path / "restarted.log")
    assert restarted.code == 0, restarted.output[-4000:]
    assert f"resuming from {prefix} (step {step})" in restarted.output
    final = checkpoint_files(s3_keys(client, bucket, "out/"), "out/")
    assert sorted(final) == [STEPS] and "preview.png" in final[STEPS], final  # exactly `keep`, a regular one
    assert_same_lora(download_lora(client, bucket, "out/stopped.safetensors", tmp_path), uninterrupted_lora)


def test_a_second_ctrl_c_during_the_checkpoint_upload_aborts_at_once(
    minio, bucket: str, s3_env: dict, tiny_model: Path, pairs_dir: Path, tmp_path: Path
) -> None:
    """The first Ctrl-C starts the save; its upload is held at a proxy (as a slow or hung S3 would); the second Ctrl-C
    must end the process at once — not after the 60 s read timeout and retries — leaving no COMPLETE marker."""
    client = minio.client()
    upload_tree(client, bucket, pairs_dir, "pairs/")
    proxy = S3FaultProxy(minio.port).start()
    upload = proxy.hold(lambda request: request.method == "PUT" and "/checkpoints/" in request.path)
    try:
        job = _job(tmp_path, "aborted", tiny_model, f"s3://{bucket}/pairs/", f"s3://{bucket}/out/")
        env = trainer_env(AWS_ENDPOINT_URL_S3=proxy.endpoint, KONTEXT_LORA_PREVIEW_STEPS="0")
        port = free_port()
        args = ["train", str(job), "--work-dir", str(tmp_path / "work"), "--metrics-port", str(port)]
        process = _start(args, env, tmp_path / "aborted.log")
        try:
            wait_for_step(process, port, 2)
            process.send_signal(signal.SIGINT)
            held = upload.wait_hit(timeout=120)
            process.send_signal(signal.SIGINT)
            aborted_at = time.monotonic()
        finally:
            code = _wait(process, timeout=30, log=tmp_path / "aborted.log")
        seconds = time.monotonic() - aborted_at
    finally:
        upload.release(drop=True)
        proxy.stop()
    output = (tmp_path / "aborted.log").read_text()
    assert code == ExitCode.INTERRUPTED == 130, output[-4000:]
    assert "SIGINT received: finishing the step in progress" in output
    assert "aborted by a second SIGINT" in output, output[-3000:]
    print(f"\nexited {seconds:.2f}s after the second Ctrl-C, with {held.path} still held")
    keys = s3_keys(client, bucket, "out/")
    assert not [key for key in keys if key.endswith("/COMPLETE")], keys


def test_sigterm_before_training_exits_at_once_without_a_checkpoint(
    tiny_model: Path, pairs_dir: Path, tmp_path: Path
) -> None:
    job = _job(tmp_path, "early", tiny_model, f"file://{pairs_dir}/", f"file://{tmp_path}/out/")
    termination_log = tmp_path / "termination-log"
    env = trainer_env(KONTEXT_LORA_TERMINATION_LOG=str(termination_log))
    log = tmp_path / "early.log"
    process = _start(["train", str(job), "--work-dir", str(tmp_path / "work")], env, log)
    try:
        # Encoding the dataset and loading the model: seconds before the first step.
        wait_for(lambda: "stage: Training" in log.read_text() or process.poll() is not None, 300, "stage Training")
        process.send_signal(signal.SIGTERM)
    finally:
        code = _wait(process, timeout=60, log=log)
    output = log.read_text()
    assert code == ExitCode.TERMINATED, output[-4000:]
    expected = "stopped by SIGTERM before training: no new checkpoint (nothing trained yet in this run)"
    assert expected in output and termination_log.read_text().startswith(expected)
    assert not list((tmp_path / "out").glob("checkpoints/*")) and "Traceback" not in output


def test_ctrl_c_in_the_demo_saves_a_checkpoint_and_prints_how_to_resume(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    port = free_port()
    env = trainer_env(KONTEXT_LORA_METRICS_PORT=str(port))
    process = _start(["demo", "--work-dir", str(work)], env, tmp_path / "demo.log")
    try:
        reached = wait_for_step(process, port, 1)
        process.send_signal(signal.SIGINT)
    finally:
        code = _wait(process, timeout=120, log=tmp_path / "demo.log")
    output = (tmp_path / "demo.log").read_text()
    assert code == ExitCode.INTERRUPTED, output[-4000:]
    work = work.resolve()
    assert f"kontext-lora train {work / 'job.yaml'} --work-dir {work}" in output, output[-2000:]
    [stopped] = STOPPED.findall(output)
    step = int(stopped[1])
    assert step >= reached and (work / "lora" / "checkpoints" / f"step-{step:06d}" / "COMPLETE").is_file()


# The main thread waits on a lock with no timeout (as for an upload a hung S3 server holds) while both signals land
# on another thread: Python would run its handler only when the main thread next runs bytecode — never, here.
SIGNALS_ON_ANOTHER_THREAD = """
import signal, threading
from kontext_trainer.signals import StopSignals

stop = StopSignals(on_abort=lambda message: print("on_abort:", message, flush=True))

def signal_this_thread_twice():
    for _ in range(2):
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)

with stop.installed(), stop.deferred("finishing the upload"):
    threading.Thread(target=signal_this_thread_twice).start()
    threading.Event().wait()
print("not aborted", flush=True)
"""


def test_a_second_signal_aborts_even_when_another_thread_receives_it_and_the_main_thread_is_blocked() -> None:
    result = subprocess.run(
        [sys.executable, "-c", SIGNALS_ON_ANOTHER_THREAD], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == ExitCode.INTERRUPTED, result.stdout + result.stderr
    assert "SIGINT received: finishing the upload (a second Ctrl-C aborts at once)" in result.stderr, result.stderr
    assert "on_abort: aborted by a second SIGINT" in result.stdout and "not aborted" not in result.stdout


def test_a_signal_is_noted_while_deferred_raises_otherwise_and_the_handlers_are_restored() -> None:
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    stop = StopSignals()
    with stop.installed(), stop.deferred("finishing the step in progress"):
        os.kill(os.getpid(), signal.SIGTERM)  # handled before the next statement
        assert stop.requested and stop.name == "SIGTERM"
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before

    with pytest.raises(Interrupted) as raised, StopSignals().installed():
        os.kill(os.getpid(), signal.SIGINT)
    assert raised.value.exit_code == ExitCode.INTERRUPTED and raised.value.checkpoint is None
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
