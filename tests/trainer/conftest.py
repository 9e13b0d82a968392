"""Fixtures for the trainer's tests: the tiny model and example pairs (helpers.py has the rest)."""

from __future__ import annotations

from pathlib import Path

import pytest

from .helpers import TRAINER_THREADS


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
def pairs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six example pairs (control/, target/ with captions; the last target uncaptioned)."""
    from kontext_trainer.data.synthetic import write_example_pairs

    return write_example_pairs(tmp_path_factory.mktemp("pairs"), count=6)
