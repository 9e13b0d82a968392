"""A training run of one KontextLoRAJob, start to finish: the stages of `stages/` in order.

Downloading: check storage, list + validate + fetch the pairs, resolve the model, find the checkpoint to
resume from (`stages.preparation`). Training: encode the dataset once (text encoders then leave memory), load
the transformer, add the LoRA (`stages.setup`), run the optimiser steps (`stages.loop`) with checkpoints (LoRA +
resumable state + held-out loss + preview, `stages.checkpointing`) every `saveEvery` steps and at the end,
rotating old ones. Uploading: the final `<name>.safetensors`. Done.
SIGTERM/SIGINT during training: the step in progress finishes, a checkpoint is saved at it, `Interrupted` is raised
(signals.py); before training they stop the run at once.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from kontext_lora.api import KontextLoRAJob, Stage
from kontext_lora.api.status import CheckpointRecord

from .logs import fields
from .metrics import TrainerMetrics
from .progress import KubernetesStatusSink, StatusReporter
from .settings import TrainerSettings
from .signals import StopSignals
from .stages.checkpointing import Checkpointer
from .stages.environment import RunEnvironment, fmt
from .stages.loop import train
from .stages.preparation import prepare
from .stages.setup import set_up
from .storage import S3Settings
from .train_step import require_supported_precision

log = logging.getLogger(__name__)

# How long the last status report may take at exit: normally, and after a stop signal (the grace period runs).
STATUS_FLUSH_SECONDS, STATUS_FLUSH_SECONDS_STOPPING = 30.0, 10.0


@dataclass
class RunResult:
    lora_uri: str
    total_steps: int
    start_step: int
    validation_before: float | None
    validation_after: float | None
    checkpoints: list[CheckpointRecord]
    best_checkpoint: str | None
    seconds: float
    step_seconds: list[float] = field(default_factory=list)

    @property
    def resumed(self) -> bool:
        return self.start_step > 0


class TrainingRun:
    def __init__(self, job: KontextLoRAJob, settings: TrainerSettings, stop: StopSignals | None = None):
        self.job = job
        self.settings = settings
        self.env = RunEnvironment(
            job=job,
            settings=settings,
            stop=stop or StopSignals(),  # not installed: never requested
            metrics=TrainerMetrics(job.metadata.name, job.metadata.namespace or ""),
            status=StatusReporter(self._status_sink(), interval=settings.status_interval_seconds),
            s3=S3Settings.from_spec(job.spec.storage),
        )
        self.checkpointer = Checkpointer(self.env)

    def _status_sink(self) -> KubernetesStatusSink | None:
        if not self.settings.report_status:
            return None
        try:
            return KubernetesStatusSink(self.job.metadata.name, self.job.metadata.namespace)
        except Exception as error:  # no API access must not cost the LoRA: train, and say why status is missing
            log.error("status reporting disabled: cannot set up the Kubernetes client: %s", error)
            return None

    def run(self) -> RunResult:
        started = time.monotonic()
        env = self.env
        env.metrics.serve(self.settings.metrics_port)
        try:
            return self._run(started)
        finally:
            env.status.close(STATUS_FLUSH_SECONDS_STOPPING if env.stop.requested else STATUS_FLUSH_SECONDS)
            env.metrics.close()

    def _run(self, started: float) -> RunResult:
        env, checkpointer = self.env, self.checkpointer
        require_supported_precision(env.spec.model.dtype)  # before anything is downloaded
        env.stage(Stage.Downloading)
        prepared = prepare(env)
        env.stage(Stage.Training, step=0, total_steps=prepared.total_steps)
        ctx, step_fn, train_set = set_up(env, prepared, checkpointer)
        # From the first step on, a stop signal waits for a safe point (signals.py).
        with env.stop.deferred("finishing the step in progress, then saving a checkpoint and exiting"):
            step_seconds = train(env, ctx, step_fn, train_set, checkpointer)
            with env.stop.deferred("training is complete: finishing the final upload"):
                env.stage(Stage.Uploading)
                lora_uri = checkpointer.upload_final(ctx, prepared.output)
                records = checkpointer.sorted_records()
                last_validation = records[-1].validation_loss if records else None
                env.stage(
                    Stage.Done,
                    lora_uri=lora_uri,
                    step=ctx.total_steps,
                    progress_percentage=100,
                    eta_seconds=0,
                    **checkpointer.status_fields(),
                )
        if env.stop.requested:
            log.info("%s arrived after the last step: the run was finished first", env.stop.name)
        log.info(
            "LoRA written to %s (held-out loss %s -> %s)",
            lora_uri,
            fmt(ctx.baseline),
            fmt(last_validation),
            **fields(lora_uri=lora_uri, validation_before=ctx.baseline, validation_after=last_validation),
        )
        return RunResult(
            lora_uri=lora_uri,
            total_steps=ctx.total_steps,
            start_step=ctx.start_step,
            validation_before=ctx.baseline,
            validation_after=last_validation,
            checkpoints=records,
            best_checkpoint=checkpointer.best(),
            seconds=time.monotonic() - started,
            step_seconds=step_seconds,
        )
