"""The spec's other training paths run end to end: bf16 autocast, gradient checkpointing, latents encoded per
step, batches of 2 with gradient accumulation, Adafactor with a cosine schedule; the recipe options (several
resolutions, flux_shift timesteps, caption dropout, modulation targets) and the speed options."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from diffusers import FluxKontextPipeline
from kontext_trainer.batches import BatchSchedule, CaptionDropout
from kontext_trainer.encoding import EncodedPair, TextEmbedding
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


def test_several_resolutions_flux_shift_caption_dropout_and_modulation_targets(
    tiny_model: Path, pairs_dir: Path, tmp_path: Path
) -> None:
    """One run with the recipe options on; its LoRA (modulation projections included) loads into the pipeline, and
    the checkpoint's fingerprint refuses a resume without the modulation adapters."""
    document = job_document(
        "recipe",
        str(tiny_model),
        pairs_dir.as_uri(),
        (tmp_path / "out").as_uri(),
        training={"steps": 3, "timestepSampling": "flux_shift", "captionDropout": 0.5, "attentionBackend": "math"},
        checkpoints={"saveEvery": 3, "keep": 1},
        lora={"rank": 8, "modulation": True},
    )
    document["spec"]["dataset"].update(resolution=512, resolutions=[512, 768])
    job = write_job(tmp_path / "job.yaml", document)
    settings = TrainerSettings(
        work_dir=tmp_path / "work", base_dir=tmp_path, model_cache=tmp_path / "models", preview_steps=0
    )
    assert run_training(job_file=job, settings=settings) == ExitCode.OK

    # Every pair was encoded at both resolutions; the captions and the dropped caption ("RMV,") were encoded once.
    assert len(list((tmp_path / "work" / "cache" / "latents").iterdir())) == 6 * 2
    captions = {p.read_text().strip() for p in (pairs_dir / "target").glob("*.txt")} | {"remove the coloured shape"}
    assert len(list((tmp_path / "work" / "cache" / "text").iterdir())) == len(captions) + 1
    validation = json.loads((tmp_path / "out" / "checkpoints" / "step-000003" / "validation.json").read_text())
    assert validation["validationLoss"] > 0 and len(validation["heldOutPairs"]) == 2  # one pair, two resolutions

    path = tmp_path / "out" / "recipe.safetensors"
    lora = safetensors.torch.load_file(path)
    modulation = [k for k in lora if ".norm1.linear." in k or ".norm1_context.linear." in k or ".norm.linear." in k]
    assert {k.split(".lora_")[0] for k in modulation} == {
        "transformer.transformer_blocks.0.norm1.linear",
        "transformer.transformer_blocks.0.norm1_context.linear",
        "transformer.single_transformer_blocks.0.norm.linear",
    }
    pipeline = FluxKontextPipeline.from_pretrained(tiny_model)
    pipeline.load_lora_weights(str(path), adapter_name="recipe")
    loaded = pipeline.transformer.transformer_blocks[0].norm1.linear
    torch.testing.assert_close(
        loaded.lora_B["recipe"].weight, lora["transformer.transformer_blocks.0.norm1.linear.lora_B.weight"]
    )
    assert float(lora["transformer.transformer_blocks.0.norm1.linear.lora_B.weight"].abs().sum()) > 0  # it trained

    document["spec"]["lora"]["modulation"] = False
    document["spec"]["training"]["steps"] = 6
    settings = settings.model_copy(update={"termination_log": tmp_path / "termination-log"})
    assert run_training(job_file=write_job(tmp_path / "job.yaml", document), settings=settings) == 2
    assert "different LoRA (target_modules: checkpoint" in (tmp_path / "termination-log").read_text()


def test_several_resolutions_make_an_epoch_of_every_pair_at_each() -> None:
    """Samples are (pair, resolution); each resolution's buckets differ, so no batch mixes resolutions."""
    buckets = [(512, 512), (768, 768)] * 4 + [(592, 448), (880, 672)] * 2  # 6 pairs x [512, 768]
    schedule = BatchSchedule(buckets, batch_size=2, seed=3)
    assert schedule.batches_per_epoch == 2 + 2 + 1 + 1
    seen = [i for b in range(schedule.batches_per_epoch) for i in schedule.batch(b)]
    assert sorted(seen) == list(range(12))
    assert all(len({buckets[i] for i in schedule.batch(b)}) == 1 for b in range(schedule.batches_per_epoch))


def test_caption_dropout_is_a_pure_function_of_the_micro_batch() -> None:
    def text(value: float) -> TextEmbedding:
        return TextEmbedding(torch.full((1, 2, 4), value), torch.full((1, 3), value))

    items = [EncodedPair(pair=None, text=text(1.0), latent_hw=(8, 8)) for _ in range(4)]  # type: ignore[arg-type]
    dropout = CaptionDropout(0.25, seed=7, dropped=text(0.0))
    masks = [dropout.mask(m, 4) for m in range(2000)]
    assert masks[:50] == [CaptionDropout(0.25, seed=7, dropped=text(0.0)).mask(m, 4) for m in range(50)]
    rate = sum(map(sum, masks)) / (2000 * 4)
    assert 0.23 < rate < 0.27
    applied = dropout.apply(items, 11)
    assert [float(i.text.prompt_embeds.sum()) == 0 for i in applied] == masks[11]
    assert CaptionDropout(0.0, seed=7).apply(items, 11) is items
    with pytest.raises(ValueError, match="dropped caption"):
        CaptionDropout(0.1, seed=7)
