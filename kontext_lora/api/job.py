"""The whole KontextLoRAJob object, and reading one from YAML with errors that name the field."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import ConfigDict, Field, ValidationError

from .base import ApiModel
from .errors import describe
from .spec import KontextLoRAJobSpec
from .status import KontextLoRAJobStatus

GROUP = "kontext-lora.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "KontextLoRAJob"
PLURAL = "kontextlorajobs"
SINGULAR = "kontextlorajob"
SHORT_NAMES = ["klj"]


class ObjectMeta(ApiModel):
    """The parts of Kubernetes metadata the product reads; everything else is passed through untouched."""

    model_config = ConfigDict(extra="allow")  # merged with ApiModel's config

    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)
    namespace: str | None = None
    uid: str | None = None
    generation: int | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class KontextLoRAJob(ApiModel):
    api_version: Literal["kontext-lora.io/v1alpha1"] = API_VERSION
    kind: Literal["KontextLoRAJob"] = KIND
    metadata: ObjectMeta
    spec: KontextLoRAJobSpec
    status: KontextLoRAJobStatus | None = None


class InvalidJobError(ValueError):
    """A KontextLoRAJob that fails validation; `errors` has one line per offending field."""

    def __init__(self, source: str, errors: list[str]):
        self.source = source
        self.errors = errors
        super().__init__(f"{source}: invalid KontextLoRAJob:\n  " + "\n  ".join(errors))


def parse_job(document: dict, source: str = "<job>") -> KontextLoRAJob:
    try:
        return KontextLoRAJob.model_validate(document)
    except ValidationError as error:
        raise InvalidJobError(source, describe(error, root="").split("; ")) from None


def load_job_file(path: str | Path) -> KontextLoRAJob:
    """Read the first KontextLoRAJob document of a YAML file (other kinds in the file are skipped)."""
    path = Path(path)
    try:
        documents = [d for d in yaml.safe_load_all(path.read_text()) if d]
    except FileNotFoundError:
        raise InvalidJobError(str(path), ["file not found"]) from None
    except yaml.YAMLError as error:
        raise InvalidJobError(str(path), [f"not valid YAML: {error}"]) from None
    jobs = [d for d in documents if isinstance(d, dict) and d.get("kind") == KIND]
    if not jobs:
        raise InvalidJobError(str(path), [f"no document with kind: {KIND}"])
    return parse_job(jobs[0], str(path))
