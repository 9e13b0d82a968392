"""Fixtures for the trainer's tests: the tiny model and example pairs (helpers.py has the rest)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from .helpers import RESUME_STEPS, TRAINER_THREADS, job_document, run_cli, trainer_env, write_job


@pytest.fixture(scope="session", autouse=True)
def _torch_threads() -> None:
    """In-process training uses as many threads as the trainer subprocesses (see helpers.TRAINER_THREADS)."""
    import torch

    torch.set_num_threads(int(TRAINER_THREADS))


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The tiny FLUX.1-Kontext model in diffusers format (built once, cached like the demo's)."""
    from kontext_trainer.demo import ensure_tiny_model

    return ensure_tiny_model()


@pytest.fixture(scope="session")
def toy_base() -> Path:
    """The toy base that can edit (model/toy), built once and cached like the demo's."""
    from kontext_trainer.demo import ensure_toy_base

    return ensure_toy_base()


@pytest.fixture(scope="session")
def pairs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six example pairs (control/, target/ with captions; the last target uncaptioned)."""
    from kontext_trainer.data.synthetic import write_example_pairs

    return write_example_pairs(tmp_path_factory.mktemp("pairs"), count=6)


@pytest.fixture(scope="session")
def uninterrupted_lora(
    tiny_model: Path, pairs_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, torch.Tensor]:
    """The final LoRA of `job_document` with RESUME_STEPS steps trained in one go: what a run killed or stopped and
    then resumed must end with. One reference for every such test, whatever its `saveEvery`/`keep`: batches and
    noise are functions of the seed and step, and a checkpoint saves the state without changing it."""
    import safetensors.torch

    root = tmp_path_factory.mktemp("uninterrupted")
    document = job_document(
        "uninterrupted",
        f"file://{tiny_model}",
        f"file://{pairs_dir}/",
        f"file://{root}/out/",
        training={"steps": RESUME_STEPS},
    )
    job = write_job(root / "job.yaml", document)
    env = trainer_env(KONTEXT_LORA_PREVIEW_STEPS="0")
    finished = run_cli(["train", str(job), "--work-dir", str(root / "work")], env, root / "train.log")
    assert finished.code == 0, finished.output[-4000:]
    return safetensors.torch.load_file(root / "out" / "uninterrupted.safetensors")
