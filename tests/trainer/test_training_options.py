"""The spec's other training paths run end to end: bf16 autocast, gradient checkpointing, latents encoded per
step, batches of 2 with gradient accumulation, Adafactor with a cosine schedule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from kontext_trainer.batches import BatchSchedule
from kontext_trainer.errors import ExitCode
from kontext_trainer.main import run_training
from kontext_trainer.settings import TrainerSettings

from .helpers import job_document, write_job


def test_bf16_checkpointing_uncached_latents_accumulation_and_adafactor(
    tiny_model: Path, pairs_dir: Path, tmp_path: Path
) -> None:
    document = job_document(
        "options",
        str(tiny_model),
        pairs_dir.as_uri(),
        (tmp_path / "out").as_uri(),
        model={"dtype": "bf16"},
        training={
            "steps": 2,
            "batchSize": 2,
            "gradientAccumulation": 2,
            "gradientCheckpointing": True,
            "cacheLatents": False,
            "optimizer": "adafactor",
            "lrScheduler": "cosine",
            "warmupSteps": 1,
            "timestepSampling": "sigmoid",
        },
        checkpoints={"saveEvery": 1, "keep": 1},
        lora={"rank": 8, "alpha": 16, "targetModules": "attention"},
    )
    job = write_job(tmp_path / "job.yaml", document)
    settings = TrainerSettings(
        work_dir=tmp_path / "work", base_dir=tmp_path, model_cache=tmp_path / "models", preview_steps=1
    )
    assert run_training(job_file=job, settings=settings) == ExitCode.OK

    lora = safetensors.torch.load_file(tmp_path / "out" / "options.safetensors")
    assert {t.dtype for t in lora.values()} == {torch.bfloat16}
    assert lora and all(".attn." in key for key in lora)  # targetModules: attention
    assert not any(".ff." in key or "proj_mlp" in key for key in lora)
    validation = json.loads((tmp_path / "out" / "checkpoints" / "step-000002" / "validation.json").read_text())
    assert validation["validationLoss"] > 0
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()) == ["step-000002"]
    state = torch.load(
        tmp_path / "out" / "checkpoints" / "step-000002" / "training_state.pt", map_location="cpu", weights_only=True
    )
    assert state["step"] == 2 and state["fingerprint"]["alpha"] == 16
    assert all(t.dtype == torch.float32 for t in state["lora"].values())  # exact master weights for resume


def test_batches_never_mix_buckets_and_cover_every_pair_each_epoch() -> None:
    buckets = [(512, 512)] * 5 + [(592, 448)] * 3
    schedule = BatchSchedule(buckets, batch_size=2, seed=1)
    assert schedule.batches_per_epoch == 3 + 2
    for epoch in range(3):
        seen = [i for b in range(5) for i in schedule.batch(epoch * 5 + b)]
        assert sorted(seen) == list(range(8))
        for b in range(5):
            assert len({buckets[i] for i in schedule.batch(epoch * 5 + b)}) == 1
    assert [schedule.batch(i) for i in range(5)] != [schedule.batch(i) for i in range(5, 10)]  # reshuffled
    assert BatchSchedule(buckets, 2, seed=1).batch(7) == schedule.batch(7)  # a pure function of the index


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 trains on a GPU; the CPU refusal is what is tested")
def test_fp16_on_a_cpu_is_refused_naming_the_field(tiny_model: Path, pairs_dir: Path, tmp_path: Path) -> None:
    document = job_document(
        "half", str(tiny_model), pairs_dir.as_uri(), (tmp_path / "out").as_uri(), model={"dtype": "fp16"}
    )
    job = write_job(tmp_path / "job.yaml", document)
    settings = TrainerSettings(
        work_dir=tmp_path / "work",
        base_dir=tmp_path,
        model_cache=tmp_path / "models",
        termination_log=tmp_path / "termination-log",
    )
    assert run_training(job_file=job, settings=settings) == ExitCode.INVALID_INPUT
    assert "spec.model.dtype fp16 needs a CUDA GPU" in (tmp_path / "termination-log").read_text()
