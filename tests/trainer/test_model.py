"""Model loading: one code path for a folder and an s3:// prefix, clear errors for a model that does not load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from kontext_trainer.errors import ExitCode, ModelLoadError
from kontext_trainer.model.load import load_scheduler, load_text_pipeline, load_transformer, load_vae
from kontext_trainer.model.source import resolve_model_dir
from kontext_trainer.storage import S3Settings

from kontext_lora.api.spec import ModelSpec, StorageSpec

from .helpers import run_cli, trainer_env, upload_tree

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def built_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`kontext-lora tiny-model DIR`, as a user runs it."""
    root = tmp_path_factory.mktemp("tiny")
    finished = run_cli(["tiny-model", str(root / "model")], trainer_env(), root / "build.log")
    assert finished.code == 0, finished.output
    return root / "model"


def test_tiny_model_loads_through_the_trainers_loader(built_model: Path) -> None:
    directory = resolve_model_dir(ModelSpec(base=f"file://{built_model}"), S3Settings(), Path("/unused"))
    assert directory == built_model
    text = load_text_pipeline(directory, torch.float32, CPU)
    prompt_embeds, pooled, text_ids = text.encode_prompt("RMV, remove the red circle", prompt_2=None)
    assert prompt_embeds.shape == (1, 512, 32) and pooled.shape == (1, 32) and text_ids.shape == (512, 3)
    assert isinstance(load_vae(directory, torch.float32, CPU), AutoencoderKL)
    transformer = load_transformer(directory, torch.bfloat16, CPU)
    assert isinstance(transformer, FluxTransformer2DModel) and transformer.dtype == torch.bfloat16
    assert transformer.config.guidance_embeds
    assert isinstance(load_scheduler(directory), FlowMatchEulerDiscreteScheduler)


def test_incomplete_model_folder_is_named(built_model: Path, tmp_path: Path) -> None:
    import shutil

    broken = Path(shutil.copytree(built_model, tmp_path / "model"))
    shutil.rmtree(broken / "tokenizer_2")
    with pytest.raises(ModelLoadError, match="missing tokenizer_2") as failure:
        resolve_model_dir(ModelSpec(base=str(broken)), S3Settings(), Path("/unused"))
    assert failure.value.exit_code is ExitCode.INVALID_INPUT
    weights = next((broken / "transformer").glob("*.safetensors"))
    weights.write_bytes(b"not safetensors")
    with pytest.raises(ModelLoadError, match=rf"cannot load the transformer from {broken}/"):
        load_transformer(broken, torch.float32, CPU)


def test_s3_model_is_synced_once_and_loaded_from_the_cache(
    minio, bucket: str, s3_env: dict, built_model: Path, tmp_path: Path
) -> None:
    count = upload_tree(minio.client(), bucket, built_model, "models/tiny/")
    settings = S3Settings.from_spec(StorageSpec())
    spec = ModelSpec(base=f"s3://{bucket}/models/tiny/")
    directory = resolve_model_dir(spec, settings, tmp_path / "cache", show_progress=False)
    assert directory == tmp_path / "cache" / "s3" / bucket / "models" / "tiny"
    files = {p: p.stat().st_mtime_ns for p in directory.rglob("*") if p.is_file() and not p.name.startswith(".")}
    assert len(files) == count
    assert resolve_model_dir(spec, settings, tmp_path / "cache", show_progress=False) == directory
    assert {p: p.stat().st_mtime_ns for p in files} == files  # nothing downloaded the second time
    assert load_transformer(directory, torch.float32, CPU).config.num_layers == 1

    with pytest.raises(ModelLoadError, match=f"model s3://{bucket}/models/none/: no model_index.json"):
        resolve_model_dir(ModelSpec(base=f"s3://{bucket}/models/none/"), settings, tmp_path / "cache")
