"""A training run of one KontextLoRAJob, start to finish.

Downloading: check storage, list + validate + fetch the pairs, resolve the model, find the checkpoint to
resume from. Training: encode the dataset once (text encoders then leave memory), load the transformer, add
the LoRA, run the optimiser steps with checkpoints (LoRA + resumable state + held-out loss + preview) every
`saveEvery` steps and at the end, rotating old ones. Uploading: the final `<name>.safetensors`. Done.
SIGTERM/SIGINT during training: the step in progress finishes, a checkpoint is saved at it, `Interrupted` is raised
(signals.py); before training they stop the run at once.
"""

from __future__ import annotations

import json
import logging
import math
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from diffusers import FlowMatchEulerDiscreteScheduler
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from kontext_lora.api import KontextLoRAJob, Stage
from kontext_lora.api.spec import DType
from kontext_lora.api.status import CheckpointRecord

from . import __version__
from .batches import BatchSchedule, micro_batch_generator
from .checkpoints import (
    PREVIEW_FILE,
    STATE_FILE,
    VALIDATION_FILE,
    CheckpointStore,
    StoredCheckpoint,
    lora_file_name,
    step_prefix,
)
from .data.dataset import TrainingPair, prepare_dataset
from .encoding import DatasetEncoder, EncodedPair, batch_inputs
from .errors import CheckpointMismatchError, InvalidInputError
from .logs import fields
from .metrics import TrainerMetrics
from .model.load import TORCH_DTYPES, load_scheduler, load_transformer
from .model.lora import TARGET_PATTERNS, add_lora, export_lora, lora_weights, restore_lora_weights
from .model.source import resolve_model_dir
from .progress import KubernetesStatusSink, ProgressTracker, StatusReporter
from .settings import TrainerSettings
from .signals import StopSignals
from .storage import Location, S3Settings, Storage, open_storage
from .train_step import (
    KontextTrainStep,
    build_lr_scheduler,
    build_optimizer,
    make_accelerator,
    require_supported_precision,
)
from .validation import EDIT_METRIC, HeldOutEdits, HeldOutSet

log = logging.getLogger(__name__)

STATE_FORMAT = 1
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


def split_held_out(pairs: list[TrainingPair], wanted: int, seed: int) -> tuple[list[TrainingPair], list[TrainingPair]]:
    """(training pairs, held-out pairs): a seeded choice, never leaving fewer than one pair to train on."""
    count = max(0, min(wanted, len(pairs) - 1))
    held = set(random.Random(seed).sample(range(len(pairs)), count))
    return [p for i, p in enumerate(pairs) if i not in held], [p for i, p in enumerate(pairs) if i in held]


class TrainingRun:
    def __init__(self, job: KontextLoRAJob, settings: TrainerSettings, stop: StopSignals | None = None):
        self.job = job
        self.stop = stop or StopSignals()  # not installed: never requested
        self.spec = job.spec
        self.settings = settings
        self.name = self.spec.output.name or job.metadata.name
        self.work = settings.work_dir
        self.s3 = S3Settings.from_spec(self.spec.storage)
        self.metrics = TrainerMetrics(job.metadata.name, job.metadata.namespace or "")
        self.status = StatusReporter(self._status_sink(), interval=settings.status_interval_seconds)
        self.records: dict[int, CheckpointRecord] = {}

    def _status_sink(self) -> KubernetesStatusSink | None:
        if not self.settings.report_status:
            return None
        try:
            return KubernetesStatusSink(self.job.metadata.name, self.job.metadata.namespace)
        except Exception as error:  # no API access must not cost the LoRA: train, and say why status is missing
            log.error("status reporting disabled: cannot set up the Kubernetes client: %s", error)
            return None

    # ---- the run -------------------------------------------------------------------------------------------
    def run(self) -> RunResult:
        started = time.monotonic()
        self.metrics.serve(self.settings.metrics_port)
        try:
            return self._run(started)
        finally:
            self.status.close(STATUS_FLUSH_SECONDS_STOPPING if self.stop.requested else STATUS_FLUSH_SECONDS)
            self.metrics.close()

    def _stage(self, stage: Stage, **extra: Any) -> None:
        log.info("stage: %s", stage.value, **fields(stage=stage.value))
        self.status.update(force=True, stage=stage, **extra)

    def _run(self, started: float) -> RunResult:
        require_supported_precision(self.spec.model.dtype)  # before anything is downloaded
        self._stage(Stage.Downloading)
        downloaded = self._download()
        self._stage(Stage.Training, step=0, total_steps=downloaded.total_steps)
        ctx, step_fn, train_set = self._prepare(downloaded)
        # From the first step on, a stop signal waits for a safe point (signals.py).
        with self.stop.deferred("finishing the step in progress, then saving a checkpoint and exiting"):
            step_seconds = self._train(ctx, step_fn, train_set)
            with self.stop.deferred("training is complete: finishing the final upload"):
                self._stage(Stage.Uploading)
                lora_uri = self._upload_final(ctx, downloaded.output)
                records = self._sorted_records()
                last_validation = records[-1].validation_loss if records else None
                self._stage(
                    Stage.Done,
                    lora_uri=lora_uri,
                    step=ctx.total_steps,
                    progress_percentage=100,
                    eta_seconds=0,
                    **self._checkpoint_fields(),
                )
        if self.stop.requested:
            log.info("%s arrived after the last step: the run was finished first", self.stop.name)
        log.info(
            "LoRA written to %s (held-out loss %s -> %s)",
            lora_uri,
            _fmt(ctx.baseline),
            _fmt(last_validation),
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
            best_checkpoint=self._best(),
            seconds=time.monotonic() - started,
            step_seconds=step_seconds,
        )

    def _download(self) -> _Downloaded:
        """Storage checks, the validated dataset, existing checkpoints (incomplete ones removed), the model."""
        spec, settings = self.spec, self.settings
        dataset_storage = open_storage(Location.parse(spec.dataset.uri, settings.base_dir), self.s3)
        output = open_storage(Location.parse(spec.output.uri, settings.base_dir), self.s3)
        output.check()
        pairs, _ = prepare_dataset(dataset_storage, spec.dataset, self.work / "dataset", settings.show_progress)
        train_pairs, held_pairs = split_held_out(pairs, spec.dataset.held_out_pairs, spec.training.seed)
        total_steps = spec.total_steps(len(pairs))
        self.metrics.dataset_pairs.set(len(pairs))
        self.metrics.total_steps.set(total_steps)
        log.info(
            "dataset: %d pairs (%d training, %d held out) from %s",
            len(pairs),
            len(train_pairs),
            len(held_pairs),
            dataset_storage.uri(),
            **fields(pairs=len(pairs), held_out=len(held_pairs), total_steps=total_steps),
        )
        self.status.update(dataset_pairs=len(pairs), total_steps=total_steps, step=0)

        store = CheckpointStore(output, self.work / "checkpoints", self.name, spec.checkpoints.keep)
        found = store.scan()
        store.discard_incomplete(found)
        complete = [c for c in found if c.complete]
        if len(complete) > spec.checkpoints.keep:
            # A run killed between publishing a checkpoint and rotating left one too many: keep the newest `keep`.
            complete, _ = store.rotate()
        model_dir = resolve_model_dir(
            spec.model, self.s3, settings.model_cache, settings.base_dir, settings.show_progress
        )
        return _Downloaded(output, pairs, train_pairs, held_pairs, total_steps, store, complete, model_dir)

    def _prepare(self, data: _Downloaded) -> tuple[_RunContext, KontextTrainStep, list[EncodedPair]]:
        """Encode the dataset, build the LoRA and optimiser, then resume or measure the untrained held-out loss."""
        spec, settings = self.spec, self.settings
        accelerator = make_accelerator(spec.model.dtype, spec.training.gradient_accumulation)
        weight_dtype = TORCH_DTYPES[spec.model.dtype]
        # The VAE runs in bf16 or fp32: FLUX's VAE is not trustworthy in fp16.
        vae_dtype = torch.bfloat16 if spec.model.dtype is DType.bf16 else torch.float32
        encoder = DatasetEncoder(data.model_dir, self.work / "cache", accelerator.device, weight_dtype, vae_dtype)
        previews = settings.preview_steps > 0 and bool(data.held_pairs)
        encoded, latent_encoder = encoder.encode(
            data.pairs,
            cache_latents=spec.training.cache_latents,
            keep_vae=previews,
            show_progress=settings.show_progress,
        )
        by_stem = {e.pair.stem: e for e in encoded}
        held_out = HeldOutSet(
            [by_stem[p.stem] for p in data.held_pairs],
            latent_encoder,
            spec.training.timestep_sampling,
            spec.training.timestep_shift,
            spec.training.seed,
            settings.validation_timesteps,
        )

        transformer = load_transformer(data.model_dir, weight_dtype, accelerator.device)
        set_seed(spec.training.seed)  # the LoRA's initial A matrices (and any dropout) follow the job's seed
        parameters = add_lora(transformer, spec.lora, spec.lora_alpha)
        if spec.training.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        optimizer = build_optimizer(parameters, spec.training)
        lr_scheduler = build_lr_scheduler(optimizer, spec.training, data.total_steps)
        transformer, optimizer, lr_scheduler = accelerator.prepare(transformer, optimizer, lr_scheduler)
        step_fn = KontextTrainStep(
            transformer,
            parameters,
            optimizer,
            lr_scheduler,
            accelerator,
            max_grad_norm=spec.training.max_grad_norm,
            guidance_scale=spec.training.guidance_scale,
            timestep_sampling=spec.training.timestep_sampling,
            timestep_shift=spec.training.timestep_shift,
        )
        log.info(
            "model %s: LoRA rank %d alpha %d on %d tensors (%.2fM parameters), %s on %s",
            spec.model.base,
            spec.lora.rank,
            spec.lora_alpha,
            len(parameters),
            sum(p.numel() for p in parameters) / 1e6,
            spec.model.dtype.value,
            accelerator.device,
        )

        start_step, baseline, loss_ema = 0, None, None
        if data.complete:
            start_step, baseline, loss_ema = self._resume(data.complete[-1], data.store, step_fn)
            self.records = {r.step: r for r in data.store.records(data.complete)}
            self.status.update(force=True, step=start_step, **self._checkpoint_fields())
        else:
            baseline = held_out.loss(transformer, accelerator, spec.training.guidance_scale)
            if baseline is not None:
                log.info("held-out loss before training: %.4f", baseline, **fields(validation_loss=baseline))
        tracker = ProgressTracker(data.total_steps, start_step)
        tracker.loss = loss_ema
        context = _RunContext(
            accelerator=accelerator,
            transformer=transformer,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            held_out=held_out,
            latent_encoder=latent_encoder,
            scheduler_config=dict(load_scheduler(data.model_dir).config) if previews else None,
            store=data.store,
            total_steps=data.total_steps,
            start_step=start_step,
            baseline=baseline,
            tracker=tracker,
        )
        context.base_edits = context.held_out_edits(settings.preview_steps, spec.training.seed, base=True)
        if context.base_edits is not None:
            log.info(
                "held-out edit score of the base model: %.2f dB",
                context.base_edits.score,
                **fields(base_edit_score=context.base_edits.score),
            )
        return context, step_fn, [by_stem[p.stem] for p in data.train_pairs]

    # ---- training loop -------------------------------------------------------------------------------------
    def _train(self, ctx: _RunContext, step_fn: KontextTrainStep, train_set: list[EncodedPair]) -> list[float]:
        spec, settings = self.spec, self.settings
        accumulation = spec.training.gradient_accumulation
        schedule = BatchSchedule([p.pair.bucket for p in train_set], spec.training.batch_size, spec.training.seed)
        step_seconds: list[float] = []
        last_log = time.monotonic()
        # On a terminal the bar is live; in a pod's log it is rendered into the periodic progress log lines.
        with (
            tqdm(
                total=ctx.total_steps,
                initial=ctx.start_step,
                desc="training",
                unit="step",
                dynamic_ncols=True,
                ascii=not settings.show_progress,
                file=sys.stderr if settings.show_progress else _Discard(),
                mininterval=0.5,
            ) as bar,
            logging_redirect_tqdm() if settings.show_progress else nullcontext(),
        ):
            for step in range(ctx.start_step + 1, ctx.total_steps + 1):
                micro = range((step - 1) * accumulation, step * accumulation)
                batches = [batch_inputs([train_set[i] for i in schedule.batch(m)], ctx.latent_encoder) for m in micro]
                generators = [micro_batch_generator(spec.training.seed, m) for m in micro]
                began = time.perf_counter()
                result = step_fn(batches, generators)
                elapsed = time.perf_counter() - began
                if not math.isfinite(result.loss):
                    raise InvalidInputError(
                        f"training diverged: the loss is {result.loss} at step {step}; lower "
                        f"spec.training.learningRate (now {spec.training.learning_rate:g}) or keep maxGradNorm > 0"
                    )
                step_seconds.append(elapsed)
                ctx.tracker.update(step, result.loss, result.learning_rate)
                self.metrics.step.set(step)
                self.metrics.loss.set(result.loss)
                self.metrics.loss_ema.set(ctx.tracker.loss)
                self.metrics.learning_rate.set(result.learning_rate)
                self.metrics.step_seconds.observe(elapsed)
                self.metrics.observe_memory()
                bar.update(1)
                bar.set_postfix(loss=f"{ctx.tracker.loss:.4f}", lr=f"{result.learning_rate:.2e}", refresh=False)
                self.status.update(**ctx.tracker.status_fields())
                if time.monotonic() - last_log >= settings.log_every_seconds or step == ctx.total_steps:
                    last_log = time.monotonic()
                    log.info(
                        "%s",
                        str(bar) if not settings.show_progress else f"step {step}/{ctx.total_steps}",
                        **fields(
                            step=step,
                            total_steps=ctx.total_steps,
                            loss=ctx.tracker.loss,
                            learning_rate=result.learning_rate,
                            steps_per_second=ctx.tracker.steps_per_second,
                            eta_seconds=ctx.tracker.eta_seconds,
                            step_seconds=elapsed,
                        ),
                    )
                # Asked to stop: save this step (quickly) and exit, unless it is the last (the run just finishes).
                # A signal arriving during a regular save lets that save finish, then exits too.
                due = step % spec.checkpoints.save_every == 0 or step == ctx.total_steps
                stopping = self.stop.requested and step < ctx.total_steps
                if stopping or due:
                    checkpoint = self._save_checkpoint(ctx, step, stopped_by=self.stop.name if stopping else None)
                    if step < ctx.total_steps and self.stop.requested:
                        raise self.stop.interrupted(step=step, total_steps=ctx.total_steps, checkpoint=checkpoint)
        return step_seconds

    # ---- checkpoints ---------------------------------------------------------------------------------------
    def _fingerprint(self) -> dict[str, Any]:
        """What a checkpoint must share with this job to be resumable (the LoRA's shape and base)."""
        return {
            "base_model": self.spec.model.base,
            "rank": self.spec.lora.rank,
            "alpha": self.spec.lora_alpha,
            "target_modules": TARGET_PATTERNS[self.spec.lora.target_modules],
        }

    def _lora_metadata(self, step: int, total_steps: int, validation: float | None, baseline: float | None) -> dict:
        spec = self.spec
        return {
            "name": self.name,
            "base_model": spec.model.base,
            "rank": spec.lora.rank,
            "alpha": spec.lora_alpha,
            "step": step,
            "total_steps": total_steps,
            "trigger_word": spec.dataset.trigger_word,
            "resolution": spec.dataset.resolution,
            "target_modules": spec.lora.target_modules.value,
            "validation_loss": validation,
            "baseline_validation_loss": baseline,
            "job": f"{self.job.metadata.namespace or 'local'}/{self.job.metadata.name}",
            "trainer": f"kontext-lora {__version__}",
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }

    def _save_checkpoint(self, ctx: _RunContext, step: int, stopped_by: str | None = None) -> str:
        """Save, publish and rotate the checkpoint of `step`; its URI. `stopped_by` (a signal's name): the trainer
        is exiting within the pod's grace period, so the held-out loss and the preview are skipped."""
        with self.stop.deferred("finishing the checkpoint being saved first"):
            return self._write_checkpoint(ctx, step, stopped_by)

    def _write_checkpoint(self, ctx: _RunContext, step: int, stopped_by: str | None) -> str:
        spec, settings = self.spec, self.settings
        began = time.monotonic()
        unwrapped = ctx.accelerator.unwrap_model(ctx.transformer)
        staging = ctx.store.staging_dir(step)
        validation = None
        if stopped_by is None:
            validation = ctx.held_out.loss(ctx.transformer, ctx.accelerator, spec.training.guidance_scale)
        metadata = self._lora_metadata(step, ctx.total_steps, validation, ctx.baseline)
        export_lora(
            unwrapped,
            staging / lora_file_name(self.name, step),
            TORCH_DTYPES[spec.model.dtype],
            {**metadata, "stopped_by": stopped_by},
        )
        torch.save(
            {
                "format": STATE_FORMAT,
                "step": step,
                "total_steps": ctx.total_steps,
                "fingerprint": self._fingerprint(),
                "lora": lora_weights(unwrapped),
                "optimizer": ctx.optimizer.state_dict(),
                "lr_scheduler": ctx.lr_scheduler.state_dict(),
                "grad_scaler": ctx.accelerator.scaler.state_dict() if ctx.accelerator.scaler is not None else None,
                "rng": {
                    "python": random.getstate(),
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                },
                "loss_ema": ctx.tracker.loss,
                "baseline_validation_loss": ctx.baseline,
            },
            staging / STATE_FILE,
        )
        preview = lora_edits = None
        if ctx.base_edits is not None and stopped_by is None:
            lora_edits = ctx.held_out_edits(settings.preview_steps, spec.training.seed)
            preview = ctx.held_out.preview(
                ctx.base_edits,
                lora_edits,
                title=f"{self.name} step {step}: before | after | base model | LoRA"
                + f" (edit score {lora_edits.score:.2f} dB, base {ctx.base_edits.score:.2f} dB"
                + (f", held-out loss {validation:.4f})" if validation is not None else ")"),
            )
            preview.save(staging / PREVIEW_FILE)
        now = datetime.now(UTC)
        (staging / VALIDATION_FILE).write_text(
            json.dumps(
                {
                    "step": step,
                    "validationLoss": validation,
                    "baselineValidationLoss": ctx.baseline,
                    "heldOutPairs": [p.pair.stem for p in ctx.held_out.pairs],
                    "timesteps": [round(float(t), 6) for t in ctx.held_out.sigmas],
                    **_edit_score_fields(ctx.held_out, ctx.base_edits, lora_edits),
                    "time": now.isoformat(timespec="seconds"),
                    **(
                        {
                            "stoppedBy": stopped_by,
                            "note": f"saved on {stopped_by} before exiting: held-out loss and preview skipped",
                        }
                        if stopped_by
                        else {}
                    ),
                },
                indent=2,
            )
            + "\n"
        )
        ctx.store.publish(step, staging)
        kept, deleted = ctx.store.rotate()
        storage = ctx.store.storage
        prefix = step_prefix(step)
        self.records[step] = CheckpointRecord(
            step=step,
            uri=storage.uri(prefix + lora_file_name(self.name, step)),
            validation_loss=validation,
            edit_score=_rounded(lora_edits.score if lora_edits else None),
            base_edit_score=_rounded(ctx.base_edits.score if lora_edits and ctx.base_edits else None),
            preview_uri=storage.uri(prefix + PREVIEW_FILE) if preview is not None else None,
            time=now,
        )
        kept_steps = {c.step for c in kept}
        self.records = {s: r for s, r in self.records.items() if s in kept_steps}
        self.metrics.checkpoints_saved.inc()
        if validation is not None:
            self.metrics.validation_loss.set(validation)
        if lora_edits is not None:
            self.metrics.edit_score.set(lora_edits.score)
        self.status.update(force=True, **self._checkpoint_fields())
        log.info(
            "checkpoint step %d saved to %s (%s, %.1fs)%s",
            step,
            storage.uri(prefix),
            f"on {stopped_by}: no held-out loss or preview"
            if stopped_by
            else f"held-out loss {_fmt(validation)}"
            + (f", edit score {lora_edits.score:.2f} dB (base {ctx.base_edits.score:.2f} dB)" if lora_edits else ""),
            time.monotonic() - began,
            f"; rotated out steps {deleted}" if deleted else "",
            **fields(
                step=step,
                checkpoint=storage.uri(prefix),
                validation_loss=validation,
                **({"edit_score": lora_edits.score} if lora_edits else {}),
                rotated_out=deleted,
                **({"stopped_by": stopped_by} if stopped_by else {}),
            ),
        )
        return storage.uri(prefix)

    def _sorted_records(self) -> list[CheckpointRecord]:
        return [self.records[s] for s in sorted(self.records)]

    def _best(self) -> str | None:
        """The kept checkpoint with the highest edit score; without edit scores, the lowest held-out loss."""
        edited = [r for r in self.records.values() if r.edit_score is not None]
        if edited:
            return max(edited, key=lambda r: (r.edit_score, r.step)).uri
        scored = [r for r in self.records.values() if r.validation_loss is not None]
        return min(scored, key=lambda r: (r.validation_loss, -r.step)).uri if scored else None

    def _checkpoint_fields(self) -> dict[str, Any]:
        records = self._sorted_records()
        if not records:
            return {}
        return {"checkpoints": records, "last_checkpoint": records[-1].uri, "best_checkpoint": self._best()}

    def _resume(
        self, latest: StoredCheckpoint, store: CheckpointStore, step_fn: KontextTrainStep
    ) -> tuple[int, float | None, float | None]:
        """Restore the newest complete checkpoint; (its step, the "before" held-out loss, the smoothed loss)."""
        accelerator = step_fn.accelerator
        files = store.fetch(latest, self.work / "resume" / f"step-{latest.step:06d}")
        if STATE_FILE not in files:
            raise CheckpointMismatchError(f"{store.storage.uri(latest.prefix)} has no {STATE_FILE}")
        state = torch.load(files[STATE_FILE], map_location="cpu", weights_only=True)
        expected = self._fingerprint()
        different = {
            k: (state.get("fingerprint", {}).get(k), v)
            for k, v in expected.items()
            if state.get("fingerprint", {}).get(k) != v
        }
        if different:
            details = ", ".join(f"{k}: checkpoint {old!r}, job {new!r}" for k, (old, new) in different.items())
            raise CheckpointMismatchError(
                f"{store.storage.uri(latest.prefix)} was trained with a different LoRA ({details}); "
                "write this job to a new spec.output.uri, or delete the old checkpoints to start over"
            )
        restore_lora_weights(accelerator.unwrap_model(step_fn.transformer), state["lora"])
        step_fn.optimizer.load_state_dict(state["optimizer"])
        step_fn.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if state.get("grad_scaler") and accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(state["grad_scaler"])
        rng = state["rng"]
        random.setstate(rng["python"])
        torch.set_rng_state(rng["torch"])
        if rng.get("cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        log.info(
            "resuming from %s (step %d)",
            store.storage.uri(latest.prefix),
            latest.step,
            **fields(resumed_from_step=latest.step, checkpoint=store.storage.uri(latest.prefix)),
        )
        return int(state["step"]), state.get("baseline_validation_loss"), state.get("loss_ema")

    def _upload_final(self, ctx: _RunContext, output: Storage) -> str:
        final_dir = self.work / "final"
        final_dir.mkdir(parents=True, exist_ok=True)
        records = self._sorted_records()
        validation = records[-1].validation_loss if records else None
        path = export_lora(
            ctx.accelerator.unwrap_model(ctx.transformer),
            final_dir / f"{self.name}.safetensors",
            TORCH_DTYPES[self.spec.model.dtype],
            self._lora_metadata(ctx.total_steps, ctx.total_steps, validation, ctx.baseline),
        )
        output.put_files([(path, path.name)])
        return output.uri(path.name)


@dataclass
class _Downloaded:
    output: Storage
    pairs: list[TrainingPair]
    train_pairs: list[TrainingPair]
    held_pairs: list[TrainingPair]
    total_steps: int
    store: CheckpointStore
    complete: list[StoredCheckpoint]  # complete checkpoints found under the output URI, oldest first
    model_dir: Path


@dataclass
class _RunContext:
    accelerator: Any
    transformer: torch.nn.Module
    optimizer: Any
    lr_scheduler: Any
    held_out: HeldOutSet
    latent_encoder: Any
    scheduler_config: dict | None
    store: CheckpointStore
    total_steps: int
    start_step: int
    baseline: float | None
    tracker: ProgressTracker
    base_edits: HeldOutEdits | None = None  # the base model's outputs on the held-out controls (once per run)

    def held_out_edits(self, steps: int, seed: int, base: bool = False) -> HeldOutEdits | None:
        """The pipeline's outputs on the held-out controls, with the LoRA (or without: `base`)."""
        if self.scheduler_config is None:
            return None
        run = self.held_out.base_edits if base else self.held_out.edits
        return run(
            self.accelerator.unwrap_model(self.transformer),
            self.latent_encoder.vae,
            FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config),
            self.accelerator,
            steps,
            seed,
        )


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _edit_score_fields(held_out: HeldOutSet, base: HeldOutEdits | None, lora: HeldOutEdits | None) -> dict[str, Any]:
    """validation.json's edit scores: the LoRA's and the base model's, overall and per held-out pair."""
    if lora is None or base is None:
        return {}
    return {
        "editMetric": EDIT_METRIC,
        "editScore": _rounded(lora.score),
        "baseEditScore": _rounded(base.score),
        "editScores": {
            item.pair.stem: {"lora": _rounded(lora_score), "base": _rounded(base_score)}
            for item, lora_score, base_score in zip(held_out.pairs, lora.scores, base.scores, strict=True)
        },
    }


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


class _Discard:
    """A stream for a progress bar that is only ever rendered with str(bar)."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass
