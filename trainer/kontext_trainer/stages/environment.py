"""What every stage of a run shares: the job, how the trainer runs, and where progress is reported."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kontext_lora.api import KontextLoRAJob, Stage
from kontext_lora.api.spec import KontextLoRAJobSpec

from ..logs import fields
from ..metrics import TrainerMetrics
from ..progress import StatusReporter
from ..settings import TrainerSettings
from ..signals import StopSignals
from ..storage import S3Settings

log = logging.getLogger(__name__)


@dataclass
class RunEnvironment:
    job: KontextLoRAJob
    settings: TrainerSettings
    stop: StopSignals
    metrics: TrainerMetrics
    status: StatusReporter
    s3: S3Settings

    @property
    def spec(self) -> KontextLoRAJobSpec:
        return self.job.spec

    @property
    def name(self) -> str:
        """File name stem of the LoRA: `spec.output.name`, else the job's name."""
        return self.spec.output.name or self.job.metadata.name

    @property
    def work(self) -> Path:
        return self.settings.work_dir

    def stage(self, stage: Stage, **extra: Any) -> None:
        log.info("stage: %s", stage.value, **fields(stage=stage.value))
        self.status.update(force=True, stage=stage, **extra)


def fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
