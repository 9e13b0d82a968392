"""Session fixtures for the real components: the Kubernetes control plane with KWOK nodes, and MinIO.

They start on first use and stop at the end of the session. Nothing here is mocked; when a binary is
missing the fixture fails (it never skips), naming the build script to run.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.infra.controlplane import ControlPlane
from tests.infra.hub import HubServer
from tests.infra.kwok import Kwok
from tests.infra.minio import MinioServer

REPO = Path(__file__).resolve().parents[1]
CRD_PATH = REPO / "crds" / "kontextlorajob.yaml"


@dataclass
class Cluster:
    plane: ControlPlane
    kwok: Kwok

    @property
    def kubeconfig(self) -> Path:
        return self.plane.kubeconfig

    def kubectl(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return self.plane.kubectl(*args, **kwargs)

    def api_client(self):
        """A kubernetes ApiClient for the admin identity (each call returns a fresh one)."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig))

    def install_crd(self) -> None:
        self.kubectl("apply", "--server-side", "-f", str(CRD_PATH))
        self.plane.wait_established("kontextlorajobs.kontext-lora.io")


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("cluster")
    plane = ControlPlane.start(root)
    kwok = None
    try:
        kwok = Kwok(plane).start()
        print(f"\ncontrol plane up in {plane.started_seconds:.1f}s; kubeconfig {plane.kubeconfig}")
        yield Cluster(plane, kwok)
    finally:
        if kwok:
            kwok.stop()
        plane.stop()


@pytest.fixture(scope="session")
def crd(cluster: Cluster) -> Cluster:
    """The cluster with the committed KontextLoRAJob CRD installed and established."""
    cluster.install_crd()
    return cluster


@pytest.fixture
def namespace(cluster: Cluster) -> Iterator[str]:
    """A fresh namespace per test, deleted afterwards (without waiting)."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    # The service-account controller makes `default` shortly after (seconds on a loaded machine); pods created before
    # it would be refused.
    deadline = time.monotonic() + 60
    while cluster.kubectl("get", "sa", "default", "-n", name, check=False).returncode != 0:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no default service account in {name} after 60 s")
        time.sleep(0.2)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="session")
def minio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MinioServer]:
    server = MinioServer(root=tmp_path_factory.mktemp("minio")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def bucket(minio: MinioServer) -> str:
    """A fresh, empty bucket per test."""
    return minio.create_bucket(f"t-{uuid.uuid4().hex[:12]}")


@pytest.fixture
def s3_env(minio: MinioServer, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The environment a trainer pod gets from its storage Secret, pointed at the test MinIO."""
    env = {**minio.credentials_env, "AWS_ENDPOINT_URL_S3": minio.endpoint, "AWS_REGION": minio.region}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@dataclass
class Hub:
    """The stand-in hub with FLUX.1-Kontext-dev (gated, the tiny model's files), and three tokens."""

    server: HubServer
    repo: str
    commit: str
    granted_token: str  # of a user who accepted the licence
    refused_token: str  # of a user who did not
    unknown_token: str  # no user has it


@pytest.fixture(scope="session")
def hub() -> Iterator[Hub]:
    """A stand-in for huggingface.co (tests/infra/hub.py) serving the tiny model as the gated
    black-forest-labs/FLUX.1-Kontext-dev, on loopback."""
    from kontext_trainer.demo import ensure_tiny_model

    from kontext_lora.api import DEFAULT_BASE_MODEL

    server = HubServer().start()
    commit = server.add_repo(DEFAULT_BASE_MODEL, ensure_tiny_model(), gated=True, granted={"licensee"})
    granted, refused = f"hf_{uuid.uuid4().hex}", f"hf_{uuid.uuid4().hex}"
    server.add_token(granted, "licensee")
    server.add_token(refused, "newcomer")
    try:
        yield Hub(server, DEFAULT_BASE_MODEL, commit, granted, refused, f"hf_{uuid.uuid4().hex}")
    finally:
        server.stop()


def pytest_report_header(config: pytest.Config) -> str:
    from tests.infra.binaries import bin_dir

    return f"kontext-lora test binaries: {bin_dir()} (torch threads: {os.environ.get('OMP_NUM_THREADS', 'default')})"
