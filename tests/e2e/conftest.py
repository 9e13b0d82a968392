"""Fixtures for the end-to-end tests: the operator's fixtures plus a tiny FLUX.1-Kontext model."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.infra.operator_fixtures import (  # noqa: F401
    agent_node,
    kljs,
    operator,
    operator_identity,
    pytest_runtest_makereport,
    start_operator,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-initialised FLUX.1-Kontext model in diffusers format, made by the product's own CLI."""
    directory = tmp_path_factory.mktemp("tiny-model")
    subprocess.run([str(REPO / ".venv" / "bin" / "kontext-lora"), "tiny-model", str(directory)], check=True)
    return directory
