"""Where the test-only server binaries live, and a clear error when one has not been built."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "tests" / "cluster" / "build_binaries.sh"


def cache_dir() -> Path:
    return Path(os.environ.get("KONTEXT_LORA_CACHE", Path.home() / ".cache" / "kontext-lora"))


def bin_dir() -> Path:
    return cache_dir() / "bin"


class MissingBinaryError(RuntimeError):
    pass


def binary(name: str, system_fallback: bool = False) -> Path:
    """Path of a built binary; with `system_fallback`, a program on PATH (Debian packages) is accepted too."""
    path = bin_dir() / name
    if path.is_file() and os.access(path, os.X_OK):
        return path
    if system_fallback and (found := shutil.which(name)):
        return Path(found)
    raise MissingBinaryError(
        f"{name} is not built: run `bash {BUILD_SCRIPT.relative_to(REPO)}` (or `make test`, which does) first"
    )
