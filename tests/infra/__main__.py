"""`python -m tests.infra up`: start the test control plane, KWOK nodes and MinIO, and keep them running.

Prints the kubeconfig path and the S3 endpoint/credentials, then waits for Ctrl-C. For debugging by hand.
"""

from __future__ import annotations

import signal
import sys

from .controlplane import ControlPlane
from .kwok import Kwok
from .minio import MinioServer


def main(argv: list[str]) -> int:
    if argv[:1] != ["up"]:
        print("usage: python -m tests.infra up", file=sys.stderr)
        return 2
    plane = ControlPlane.start()
    kwok = Kwok(plane).start()
    minio = MinioServer().start()
    print(f"export KUBECONFIG={plane.kubeconfig}")
    print(
        f"export AWS_ENDPOINT_URL_S3={minio.endpoint} AWS_ACCESS_KEY_ID={minio.access_key} "
        f"AWS_SECRET_ACCESS_KEY={minio.secret_key} AWS_REGION={minio.region}"
    )
    print(f"# logs in {plane.root / 'logs'}; Ctrl-C stops everything", flush=True)
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        minio.cleanup()
        kwok.stop()
        plane.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
