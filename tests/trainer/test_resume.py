"""Preemption: SIGKILL mid-run, restart, and the run continues from the newest complete checkpoint in S3."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import torch

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
    write_job,
)

STEPS, SAVE_EVERY, KEEP = RESUME_STEPS, 3, 2


def test_sigkill_then_restart_resumes_from_the_newest_complete_checkpoint(
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
    env = trainer_env(KONTEXT_LORA_PREVIEW_STEPS="0")  # previews are covered elsewhere; this is about state

    def job(output: str) -> Path:
        document = job_document(
            "resume",
            f"file://{tiny_model}",
            f"s3://{bucket}/pairs/",
            f"s3://{bucket}/{output}/",
            training={"steps": STEPS},
            checkpoints={"saveEvery": SAVE_EVERY, "keep": KEEP},
        )
        return write_job(tmp_path / f"{output}.yaml", document)

    work = tmp_path / "work"
    args = ["train", str(job("out")), "--work-dir", str(work)]
    with (tmp_path / "killed.log").open("w") as log:
        process = subprocess.Popen([KONTEXT_LORA, *args], stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            wait_for(
                lambda: (
                    "out/checkpoints/step-000006/COMPLETE" in s3_keys(client, bucket, "out/")
                    or process.poll() is not None
                ),
                timeout=300,
                what="the second checkpoint in MinIO",
                interval=0.05,
            )
            process.send_signal(signal.SIGKILL)
        finally:
            process.wait(timeout=30)
    killed_log = (tmp_path / "killed.log").read_text()
    assert process.returncode == -signal.SIGKILL, f"the trainer ended before the kill:\n{killed_log[-3000:]}"
    at_kill = checkpoint_files(s3_keys(client, bucket, "out/"), "out/")
    complete = sorted(step for step, files in at_kill.items() if "COMPLETE" in files)
    assert complete and 6 <= complete[-1] < STEPS
    assert "out/resume.safetensors" not in s3_keys(client, bucket, "out/")
    # What a kill during an upload leaves behind: files without the COMPLETE marker. Never resumed from.
    client.put_object(Bucket=bucket, Key="out/checkpoints/step-000012/resume-step-000012.safetensors", Body=b"half")

    restarted = run_cli(args, env, tmp_path / "restarted.log")
    assert restarted.code == 0, restarted.output[-4000:]
    newest = complete[-1]
    assert f"resuming from s3://{bucket}/out/checkpoints/step-{newest:06d}/ (step {newest})" in restarted.output
    assert f"removing incomplete checkpoint s3://{bucket}/out/checkpoints/step-000012/" in restarted.output

    keys = s3_keys(client, bucket, "out/")
    final = checkpoint_files(keys, "out/")
    expected_files = {"COMPLETE", "training_state.pt", "validation.json"}
    assert sorted(final) == [STEPS - SAVE_EVERY, STEPS], keys
    for step, files in final.items():
        assert files == expected_files | {f"resume-step-{step:06d}.safetensors"}, files
    assert "out/resume.safetensors" in keys
    assert sorted(p.name for p in (work / "checkpoints").iterdir()) == [f"step-{s:06d}" for s in sorted(final)]

    # Resuming is exact: the same run without the kill ends with the same LoRA.
    assert_same_lora(download_lora(client, bucket, "out/resume.safetensors", tmp_path), uninterrupted_lora)


def test_checkpoints_of_a_differently_shaped_lora_are_refused_not_mixed(
    tiny_model: Path, pairs_dir: Path, tmp_path: Path
) -> None:
    """Rank changed between runs with the same output: exit 2 naming both ranks; the old checkpoint stays."""
    from kontext_trainer.errors import ExitCode
    from kontext_trainer.main import run_training
    from kontext_trainer.settings import TrainerSettings

    output = (tmp_path / "out").as_uri()
    settings = TrainerSettings(
        work_dir=tmp_path / "work",
        base_dir=tmp_path,
        model_cache=tmp_path / "models",
        preview_steps=0,
        termination_log=tmp_path / "termination-log",
    )
    first = job_document("shape", str(tiny_model), pairs_dir.as_uri(), output, training={"steps": 2})
    first["spec"]["checkpoints"] = {"saveEvery": 2, "keep": 1}
    assert run_training(job_file=write_job(tmp_path / "first.yaml", first), settings=settings) == ExitCode.OK
    second = {**first, "spec": {**first["spec"], "lora": {"rank": 16}}}
    code = run_training(job_file=write_job(tmp_path / "second.yaml", second), settings=settings)
    assert code == ExitCode.INVALID_INPUT
    message = (tmp_path / "termination-log").read_text()
    assert "was trained with a different LoRA (rank: checkpoint 8, job 16" in message, message
    assert (tmp_path / "out" / "checkpoints" / "step-000002" / "COMPLETE").is_file()
