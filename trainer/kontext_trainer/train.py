"""A training run of one KontextLoRAJob, start to finish: the stages of `stages/` in order.

Preparing (`stages.preparation`): check storage and model access, list + validate + fetch the pairs, write the
manifest — skipped when a preparation pod already did it (`KONTEXT_LORA_PREPARED`: the run starts from its
manifest). Downloading (`stages.setup.download`): find the checkpoint to resume from, gather cached encodings,
fetch the model parts and pair images still needed. Training: encode what is not cached (the encoders then leave
memory), load the transformer, add the LoRA (`stages.setup.set_up`), run the optimiser steps (`stages.loop`) with
checkpoints (LoRA + resumable state + held-out loss + preview, `stages.checkpointing`) every `saveEvery` steps
and at the end, rotating old ones. Uploading: the final `<name>.safetensors`. Done.
SIGTERM/SIGINT during training: the step in progress finishes, a checkpoint is saved at it, `Interrupted` is raised
(signals.py); before training they stop the run at once.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from kontext_lora.api import KontextLoRAJob, Stage
from kontext_lora.api.status import CheckpointRecord

from .distributed import World, quiet_other_ranks, rank_settings_update
from .errors import TrainerError
from .logs import fields
from .model.speed import require_supported_attention
from .settings import TrainerSettings
from .signals import StopSignals
from .stages.checkpointing import Checkpointer
from .stages.environment import RunEnvironment, fmt
from .stages.loop import train
from .stages.preparation import PreparedInputs, load_prepared, prepare_inputs
from .stages.setup import announce_world, download, encode, set_up
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
    base_edit_score: float | None  # the base model's held-out edit score (records carry the LoRA's per checkpoint)
    checkpoints: list[CheckpointRecord]
    best_checkpoint: str | None
    seconds: float
    step_seconds: list[float] = field(default_factory=list)

    @property
    def resumed(self) -> bool:
        return self.start_step > 0


class TrainingRun:
    def __init__(
        self,
        job: KontextLoRAJob,
        settings: TrainerSettings,
        stop: StopSignals | None = None,
        world: World | None = None,
    ):
        world = world or World.from_env()
        settings = settings.model_copy(update=rank_settings_update(world, settings.work_dir, settings.termination_log))
        quiet_other_ranks(world)
        self.job = job
        self.settings = settings
        self.env = RunEnvironment.create(job, settings, stop, world)
        self.checkpointer = Checkpointer(self.env)

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
        env, checkpointer, world = self.env, self.checkpointer, self.env.world
        require_supported_precision(env.spec.model.dtype)  # before anything is downloaded
        require_supported_attention(env.spec.training.attention_backend)
        world.accelerator(env.spec.model.dtype, env.spec.training.gradient_accumulation)  # joins the process group
        announce_world(env)
        with world.in_turn():  # rank 0 writes first; the others then find it written (distributed.py)
            inputs: PreparedInputs | None = None
            if self.settings.prepared:
                env.stage(Stage.Downloading)
                inputs = load_prepared(env)
            if inputs is None:
                if not world.main:
                    raise TrainerError(f"{world.describe()}: rank 0 wrote no preparation manifest to start from")
                env.stage(Stage.Preparing)
                inputs = prepare_inputs(env)
                env.stage(Stage.Downloading)
            prepared = download(env, inputs, checkpointer)
            encoded = encode(env, prepared)
        prepared.complete = world.same_checkpoint(prepared.complete, prepared.store.storage.uri())
        env.stage(Stage.Training, step=0, total_steps=prepared.total_steps)
        ctx, step_fn, train_set = set_up(env, prepared, checkpointer, encoded)
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
            base_edit_score=ctx.base_edits.score if ctx.base_edits else None,
            checkpoints=records,
            best_checkpoint=checkpointer.best(),
            seconds=time.monotonic() - started,
            step_seconds=step_seconds,
        )
