"""What every stage of a run shares: the job, how the trainer runs, and where progress is reported."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from kontext_lora.api import KontextLoRAJob, Stage
from kontext_lora.api.spec import KontextLoRAJobSpec

from ..distributed import World
from ..logs import fields
from ..metrics import TrainerMetrics
from ..progress import KubernetesStatusSink, StatusReporter
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
    world: World = field(default_factory=World)
    """This process among the job's ranks (distributed.py); a world of one without torchrun."""
    started: float = field(default_factory=lambda: psutil.Process().create_time())
    """When the process started (epoch seconds): in a pod, the container's start."""
    timeline: dict[str, float] = field(default_factory=dict)
    """Seconds after `started` at which the run passed each milestone (logged with the first step)."""

    @classmethod
    def create(
        cls,
        job: KontextLoRAJob,
        settings: TrainerSettings,
        stop: StopSignals | None = None,
        world: World | None = None,
    ) -> RunEnvironment:
        return cls(
            world=world or World(),
            job=job,
            settings=settings,
            stop=stop or StopSignals(),  # not installed: never requested
            metrics=TrainerMetrics(job.metadata.name, job.metadata.namespace or ""),
            status=StatusReporter(_status_sink(job, settings), interval=settings.status_interval_seconds),
            s3=S3Settings.from_spec(job.spec.storage),
        )

    def mark(self, milestone: str) -> float:
        seconds = self.timeline[milestone] = round(time.time() - self.started, 2)
        return seconds

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
        seconds = self.mark(f"stage {stage.value}")
        log.info("stage: %s", stage.value, **fields(stage=stage.value, seconds_since_start=seconds))
        self.status.update(force=True, stage=stage, **extra)


def _status_sink(job: KontextLoRAJob, settings: TrainerSettings) -> KubernetesStatusSink | None:
    if not settings.report_status:
        return None
    try:
        return KubernetesStatusSink(job.metadata.name, job.metadata.namespace)
    except Exception as error:  # no API access must not cost the LoRA: train, and say why status is missing
        log.error("status reporting disabled: cannot set up the Kubernetes client: %s", error)
        return None


def fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
