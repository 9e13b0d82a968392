"""Fixtures of the fault-injection suite: the operator's fixtures, a node agent with room for parallel trainer pods,
a MinIO of its own (stopped and started by the storage tests, with recognisable credentials for the secret scan),
the S3 fault proxy in front of it, and the tiny model."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Cluster
from tests.infra.minio import MinioServer
from tests.infra.node_agent import NodeAgent
from tests.infra.operator_fixtures import (  # noqa: F401
    kljs,
    operator,
    operator_identity,
    pytest_runtest_makereport,
    serving,
    start_operator,
)
from tests.infra.processes import free_port
from tests.infra.s3_fault_proxy import S3FaultProxy

from .support import FaultStore

# Recognisable credentials: the secret scan looks for exactly these strings everywhere.
ACCESS_KEY_PREFIX = "KLFAULTACCESS"
SECRET_KEY_PREFIX = "kl-fault-secret-"


@pytest.fixture(scope="session")
def fault_minio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MinioServer]:
    """A MinIO only this suite uses: the storage tests stop and start it (on the same data dir and port)."""
    server = MinioServer(root=tmp_path_factory.mktemp("fault-minio"))
    server.access_key = ACCESS_KEY_PREFIX + secrets.token_hex(6).upper()
    server.secret_key = SECRET_KEY_PREFIX + secrets.token_urlsafe(18)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def fault_bucket(fault_minio: MinioServer) -> str:
    if fault_minio.process is None or not fault_minio.process.running:
        fault_minio.start()  # a failed test may have left it stopped
    return fault_minio.create_bucket(f"f-{uuid.uuid4().hex[:12]}")


@pytest.fixture
def proxy(fault_minio: MinioServer) -> Iterator[S3FaultProxy]:
    server = S3FaultProxy(fault_minio.port).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The tiny random FLUX.1-Kontext model (built once into ~/.cache/kontext-lora/models, as the demo's)."""
    from kontext_trainer.demo import ensure_tiny_model

    return ensure_tiny_model()


@pytest.fixture(scope="session")
def pairs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three small example pairs (control/, target/ with captions, the last target uncaptioned)."""
    from kontext_trainer.data.synthetic import write_example_pairs

    return write_example_pairs(tmp_path_factory.mktemp("fault-pairs"), count=3)


@pytest.fixture
def agent(crd: Cluster, tmp_path: Path) -> Iterator[NodeAgent]:
    """A node-agent L40S node with 10 GPUs (parallel trainer pods), the only schedulable L40S node during the test,
    and its CPU node for the preparation pods (the KWOK L40S and CPU nodes are cordoned, as in tests/e2e). Trainer
    processes get a free metrics port, no previews, one torch thread each."""
    node = NodeAgent(crd.plane, tmp_path / "node-agent", name=f"agent-fault-{uuid.uuid4().hex[:6]}", gpus=10)
    node.env_overrides.update(
        KONTEXT_LORA_METRICS_PORT=str(free_port()),
        KONTEXT_LORA_PREVIEW_STEPS="0",
        KONTEXT_LORA_PROGRESS="0",
        OMP_NUM_THREADS="1",
    )
    with serving(crd, node):
        yield node


@pytest.fixture
def store(fault_minio: MinioServer, fault_bucket: str, tiny_model: Path, pairs_dir: Path) -> FaultStore:
    return FaultStore(fault_minio, fault_bucket, tiny_model, pairs_dir)
