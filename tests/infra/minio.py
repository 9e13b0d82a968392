"""A real S3 server for tests: MinIO (built from the Go module proxy) on loopback with a temporary data dir.

`stop()` and `start()` may be called again on the same data dir to simulate storage outages.
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
import urllib.request
from pathlib import Path

from .binaries import binary
from .processes import ServerProcess, free_port


class MinioServer:
    def __init__(self, root: Path | None = None, port: int | None = None):
        self.owns_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="kontext-minio-")) if root is None else root
        self.port = port or free_port()
        self.console_port = free_port()
        self.access_key = "kontext-test-" + secrets.token_hex(4)
        self.secret_key = secrets.token_urlsafe(24)
        self.region = "us-east-1"
        self.process: ServerProcess | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def credentials_env(self) -> dict[str, str]:
        """What a Secret holding these credentials becomes in a trainer pod's environment."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}

    def start(self, timeout: float = 60) -> MinioServer:
        self.process = ServerProcess(
            "minio",
            [
                binary("minio"),
                "server",
                self.root / "data",
                "--address",
                f"127.0.0.1:{self.port}",
                "--console-address",
                f"127.0.0.1:{self.console_port}",
                "--quiet",
            ],
            self.root / "logs",
            env={
                "MINIO_ROOT_USER": self.access_key,
                "MINIO_ROOT_PASSWORD": self.secret_key,
                "MINIO_REGION": self.region,
                "MINIO_BROWSER": "off",
                "MINIO_UPDATE": "off",
            },
        ).start()
        self.process.wait_ready(self._live, timeout=timeout)
        return self

    def _live(self) -> bool:
        with urllib.request.urlopen(f"{self.endpoint}/minio/health/ready", timeout=2) as response:
            return response.status == 200

    def stop(self) -> None:
        if self.process:
            self.process.stop()

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
        )

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def cleanup(self) -> None:
        self.stop()
        if self.owns_root:
            shutil.rmtree(self.root, ignore_errors=True)
