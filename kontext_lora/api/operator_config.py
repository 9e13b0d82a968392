"""The operator's own configuration: what the Helm chart's values become (a ConfigMap mounted as YAML).

The operator reads it from `$KONTEXT_LORA_OPERATOR_CONFIG` (default `/etc/kontext-lora/config.yaml`); a
missing file means all defaults. GPU classes map to node labels here, so clusters labelled differently
from NVIDIA GPU Feature Discovery adapt the mapping without a new release.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError

from .base import ApiModel
from .errors import describe
from .gpu import DEFAULT_GPU_CLASSES, GPU_PRESENT_LABEL, GpuClassPlacement, Toleration
from .spec import QUANTITY, GpuClass, SecretKeySelector

CONFIG_ENV = "KONTEXT_LORA_OPERATOR_CONFIG"
DEFAULT_CONFIG_PATH = Path("/etc/kontext-lora/config.yaml")


class DefaultStorage(ApiModel):
    endpoint: Annotated[str, Field(pattern=r"^https?://[^\s/]+(/.*)?$")] | None = Field(
        None, description="S3 endpoint used when a job's spec.storage.endpoint is unset."
    )
    region: str = Field("us-east-1", description="Region used when a job leaves the default region.")


class TrainerPodConfig(ApiModel):
    image: str = Field("ghcr.io/kontext-lora/trainer:0.1.0", description="Trainer image.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    image_pull_secrets: list[str] = Field(default_factory=list)
    metrics_port: int = Field(9090, ge=1, le=65535)
    work_dir_size_limit: str = Field("200Gi", description="Size limit of the /work emptyDir.")
    labels: dict[str, str] = Field(default_factory=dict, description="Extra labels on trainer pods.")
    annotations: dict[str, str] = Field(default_factory=dict, description="Extra annotations on trainer pods.")
    priority_class_name: str | None = None
    termination_grace_period_seconds: int = Field(
        120,
        ge=1,
        description="Seconds a trainer pod has after SIGTERM (deletion, eviction, preemption, drain) to finish its "
        "step and upload a checkpoint before SIGKILL.",
    )


def _prefer_nodes_without_gpus() -> dict[str, Any]:
    return {
        "nodeAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 100,
                    "preference": {
                        "matchExpressions": [{"key": GPU_PRESENT_LABEL, "operator": "NotIn", "values": ["true"]}]
                    },
                }
            ]
        }
    }


class PreparationConfig(ApiModel):
    """The CPU-only preparation pod that runs before a job's GPU pod (docs/operator.md, "Preparation")."""

    enabled: bool = Field(
        True,
        description="Run the preparation Job before the GPU Job. Off: the GPU pod checks storage, the model and the "
        "pairs itself, while holding its GPU.",
    )
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node selector of preparation pods.")
    tolerations: list[Toleration] = Field(default_factory=list, description="Tolerations of preparation pods.")
    affinity: dict[str, Any] = Field(
        default_factory=_prefer_nodes_without_gpus,
        description="Affinity of preparation pods; by default they prefer nodes without a GPU "
        f"({GPU_PRESENT_LABEL} not true).",
    )
    cpu: Annotated[str, Field(pattern=QUANTITY)] = Field("1", description="CPU request of a preparation pod.")
    memory: Annotated[str, Field(pattern=QUANTITY)] = Field(
        "4Gi", description="Memory request and limit of a preparation pod (images are decoded one at a time)."
    )
    work_dir_size_limit: Annotated[str, Field(pattern=QUANTITY)] = Field(
        "50Gi", description="Size limit of the preparation pod's /work emptyDir (the downloaded pairs)."
    )
    active_deadline_seconds: int = Field(
        7200,
        ge=60,
        description="Fail a job whose preparation runs longer than this (a hub download of ~30 GB at 20 MB/s takes "
        "25 minutes).",
    )
    backoff_limit: int = Field(
        2, ge=0, le=10, description="Retries of a preparation pod that crashed (bad input fails at once)."
    )
    labels: dict[str, str] = Field(default_factory=dict, description="Extra labels on preparation pods.")
    annotations: dict[str, str] = Field(default_factory=dict, description="Extra annotations on preparation pods.")


class HubConfig(ApiModel):
    """How pods reach the Hugging Face hub for jobs whose base model is a hub id."""

    endpoint: Annotated[str, Field(pattern=r"^https?://[^\s/]+(/.*)?$")] | None = Field(
        None, description="HF_ENDPOINT of the pods: a hub mirror or a private hub; unset: huggingface.co."
    )
    token_secret: SecretKeySelector | None = Field(
        None,
        description="Default Secret (in each job's namespace) with a hub token, for jobs that name no "
        "spec.model.tokenSecret.",
    )


class OperatorConfig(ApiModel):
    trainer: TrainerPodConfig = Field(default_factory=TrainerPodConfig)
    preparation: PreparationConfig = Field(default_factory=PreparationConfig)
    hub: HubConfig = Field(default_factory=HubConfig)
    gpu_classes: dict[GpuClass, GpuClassPlacement] = Field(
        default_factory=lambda: dict(DEFAULT_GPU_CLASSES),
        description="Node affinity, tolerations and resource name per GPU class.",
    )
    default_storage: DefaultStorage = Field(default_factory=DefaultStorage)
    watch_namespaces: list[str] = Field(default_factory=list, description="Namespaces to watch; empty = all.")
    metrics_port: int = Field(8080, ge=1, le=65535, description="Port of the operator's own /metrics.")
    health_port: int = Field(8081, ge=1, le=65535, description="Port of the operator's liveness/readiness probe.")


def load_operator_config(path: Path | None = None) -> OperatorConfig:
    path = path or Path(os.environ.get(CONFIG_ENV, DEFAULT_CONFIG_PATH))
    if not path.exists():
        return OperatorConfig()
    try:
        return OperatorConfig.model_validate(yaml.safe_load(path.read_text()) or {})
    except ValidationError as error:
        raise ValueError(f"{path}: invalid operator config: {describe(error, root='')}") from None
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML: {error}") from None
