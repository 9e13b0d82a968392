"""The KontextLoRAJob status.

Two writers share it without stepping on each other, each owning its own keys (merge patches):
- the trainer (through a per-job Role limited to its own job): `stage`, progress (`step`, `totalSteps`,
  `loss`, `stepsPerSecond`, `etaSeconds`, `progressPercentage`, `learningRate`), `datasetPairs`,
  `preparation`, `checkpoints`, `lastCheckpoint`, `bestCheckpoint`, `loraUri`, `lastProgressTime` (the
  preparation pod reports `stage: Preparing` and `preparation`, the training pod's rank 0 the rest);
- the operator: `phase`, `conditions`, `message`, `reason`, `restarts`, `jobName`, `worldSize`, `startTime`,
  `completionTime`, `observedGeneration`.
The operator derives `phase` from the Kubernetes Job and the trainer's `stage`.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated

from pydantic import Field

from .base import ApiModel


class Phase(StrEnum):
    Pending = "Pending"
    Preparing = "Preparing"
    Downloading = "Downloading"
    Training = "Training"
    Uploading = "Uploading"
    Succeeded = "Succeeded"
    Failed = "Failed"
    Suspended = "Suspended"

    @property
    def finished(self) -> bool:
        return self in (Phase.Succeeded, Phase.Failed)


class Stage(StrEnum):
    """What the trainer is doing; the operator shows it as the phase while the pod runs."""

    Preparing = "Preparing"
    Downloading = "Downloading"
    Training = "Training"
    Uploading = "Uploading"
    Done = "Done"


class ConditionType(StrEnum):
    Prepared = "Prepared"
    Created = "Created"
    Running = "Running"
    Restarting = "Restarting"
    Suspended = "Suspended"
    Succeeded = "Succeeded"
    Failed = "Failed"


class PreparationStatus(ApiModel):
    """What the preparation pod is doing, and what it found (reported by the pod, read by the operator)."""

    task: Annotated[str, Field(max_length=128)] | None = Field(
        None,
        description="What the preparation is doing: checking storage, checking model access, listing, downloading "
        "or validating the pairs, downloading the model, done.",
    )
    done: int | None = Field(None, ge=0, description="Items of the task done (files, pairs).")
    total: int | None = Field(None, ge=0, description="Items of the task in all.")
    warnings: list[Annotated[str, Field(max_length=2048)]] = Field(
        default_factory=list,
        max_length=20,
        description="What the preparation noticed but did not fail on (files ignored, small images).",
    )
    manifest_uri: Annotated[str, Field(max_length=2048)] | None = Field(
        None, description="The validated dataset and model the training pod starts from (preparation.json)."
    )
    model_revision: Annotated[str, Field(max_length=128)] | None = Field(
        None, description="The hub commit a hub model resolved to; the training pod loads exactly this one."
    )


class Condition(ApiModel):
    type: Annotated[str, Field(max_length=64)]
    status: Annotated[str, Field(pattern=r"^(True|False|Unknown)$")]
    reason: Annotated[str, Field(max_length=128)] | None = None
    message: Annotated[str, Field(max_length=4096)] | None = None
    last_transition_time: datetime | None = None


class CheckpointRecord(ApiModel):
    step: int = Field(ge=0, description="Optimiser step the checkpoint was saved at.")
    uri: Annotated[str, Field(max_length=2048)] = Field(description="LoRA safetensors of this checkpoint.")
    validation_loss: float | None = Field(None, description="Mean flow-matching loss on the held-out pairs.")
    edit_score: float | None = Field(
        None,
        description="Edit score of this checkpoint's LoRA: PSNR (dB) of FluxKontextPipeline's output against the "
        "target, mean over the held-out pairs (higher is better).",
    )
    base_edit_score: float | None = Field(
        None, description="The same score of the base model without the LoRA, for comparison."
    )
    preview_uri: Annotated[str, Field(max_length=2048)] | None = Field(
        None, description="Before/after preview grid on the held-out pairs."
    )
    time: datetime | None = None


class KontextLoRAJobStatus(ApiModel):
    phase: Phase | None = Field(
        None, description="Pending, Preparing, Downloading, Training, Uploading, Succeeded, Failed or Suspended."
    )
    message: Annotated[str, Field(max_length=8192)] | None = Field(
        None, description="Human-readable detail of the phase, e.g. why it failed."
    )
    reason: Annotated[str, Field(max_length=128)] | None = Field(
        None, description="Machine-readable cause of the last transition."
    )
    conditions: list[Condition] = Field(
        default_factory=list, description="Prepared, Created, Running, Restarting, Suspended, Succeeded, Failed."
    )
    observed_generation: int | None = None
    job_name: Annotated[str, Field(max_length=253)] | None = Field(
        None, description="The batch/v1 Job running the trainer."
    )
    world_size: int | None = Field(
        None, ge=1, description="Training processes (GPUs) of the job: spec.resources count x nodes."
    )
    restarts: int = Field(0, ge=0, description="Times the trainer was restarted (failures and preemptions).")
    start_time: datetime | None = None
    completion_time: datetime | None = None

    stage: Stage | None = Field(None, description="What the trainer reports it is doing.")
    step: int | None = Field(None, ge=0, description="Optimiser steps done.")
    total_steps: int | None = Field(None, ge=0, description="Steps the run will take.")
    loss: float | None = Field(None, description="Training loss, smoothed (exponential moving average).")
    learning_rate: float | None = None
    steps_per_second: float | None = None
    eta_seconds: int | None = Field(None, ge=0, description="Estimated seconds until training ends.")
    progress_percentage: int | None = Field(None, ge=0, le=100)
    dataset_pairs: int | None = Field(None, ge=0, description="Valid pairs found in the dataset.")
    preparation: PreparationStatus | None = Field(
        None, description="Progress and findings of the preparation pod (before any GPU is requested)."
    )
    checkpoints: list[CheckpointRecord] = Field(
        default_factory=list, description="Checkpoints kept in storage, oldest first."
    )
    last_checkpoint: Annotated[str, Field(max_length=2048)] | None = Field(
        None, description="URI of the newest checkpoint."
    )
    best_checkpoint: Annotated[str, Field(max_length=2048)] | None = Field(
        None, description="Checkpoint with the highest edit score (without edit scores: the lowest held-out loss)."
    )
    lora_uri: Annotated[str, Field(max_length=2048)] | None = Field(None, description="The final LoRA, once uploaded.")
    last_progress_time: datetime | None = Field(None, description="When the trainer last reported progress.")
