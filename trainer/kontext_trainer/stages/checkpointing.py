"""The run's side of checkpoints: what one holds, the status records of those kept, resuming, the final LoRA.

Where checkpoints live and how they are published and rotated is `checkpoints.py`'s; this module decides what
goes into one (the LoRA, the resumable state, the held-out loss, edit scores and preview) and restores a run from one.
"""

from __future__ import annotations

import json
import logging
import random
import time
from datetime import UTC, datetime
from typing import Any

import torch

from kontext_lora.api.status import CheckpointRecord

from .. import __version__
from ..checkpoints import (
    PREVIEW_FILE,
    STATE_FILE,
    VALIDATION_FILE,
    CheckpointStore,
    StoredCheckpoint,
    lora_file_name,
    step_prefix,
)
from ..errors import CheckpointMismatchError
from ..logs import fields
from ..model.load import TORCH_DTYPES
from ..model.lora import export_lora, lora_weights, restore_lora_weights, target_pattern
from ..storage import Storage
from ..train_step import KontextTrainStep
from ..validation import EDIT_METRIC, HeldOutEdits, HeldOutSet
from .context import RunContext
from .environment import RunEnvironment, fmt

log = logging.getLogger(__name__)

STATE_FORMAT = 1


class Checkpointer:
    """Saves and restores the run's checkpoints and keeps the status records of those kept in storage."""

    def __init__(self, env: RunEnvironment):
        self.env = env
        self.records: dict[int, CheckpointRecord] = {}

    # ---- what a checkpoint must share with this job, and says about itself -----------------------------------
    def _fingerprint(self) -> dict[str, Any]:
        """What a checkpoint must share with this job to be resumable (the LoRA's shape and base)."""
        spec = self.env.spec
        return {
            "base_model": spec.model.base,
            "rank": spec.lora.rank,
            "alpha": spec.lora_alpha,
            "target_modules": target_pattern(spec.lora),
        }

    def _schedule(self, total_steps: int) -> dict[str, Any]:
        """What a resumed run's optimisation must share with the checkpoint's: the world size it was taken at, the
        learning rate that world size gave, and the step count."""
        world = self.env.world.size
        return {
            "world_size": world,
            "learning_rate": self.env.spec.effective_learning_rate(world),
            "total_steps": total_steps,
        }

    def _same_schedule(self, state: dict[str, Any], total_steps: int, where: str) -> None:
        """A checkpoint from another world size resumes when its learning rate and step count are this run's (the
        LoRA, AdamW's moments and the schedule's position do not depend on the world size); otherwise it is refused,
        saying why: the rest of the run would follow another schedule than the steps already taken."""
        saved = state.get("schedule") or {"world_size": 1, "total_steps": state.get("total_steps")}
        now = self._schedule(total_steps)
        if saved.get("world_size", 1) == now["world_size"]:
            return
        saved_lr = saved.get("learning_rate", self.env.spec.effective_learning_rate(saved.get("world_size", 1)))
        if (
            abs(saved_lr - now["learning_rate"]) <= 1e-12 * now["learning_rate"]
            and saved.get("total_steps") == now["total_steps"]
        ):
            log.info(
                "the checkpoint was taken with %d processes, this run has %d: same learning rate and steps, resuming",
                saved["world_size"],
                now["world_size"],
            )
            return
        raise CheckpointMismatchError(
            f"{where} was taken with {saved['world_size']} training processes (learning rate {saved_lr:.3g}, "
            f"{saved.get('total_steps')} steps); this run has {now['world_size']} (learning rate "
            f"{now['learning_rate']:.3g}, {now['total_steps']} steps): resuming would change the schedule mid-run. "
            "Run it with the checkpoint's spec.resources count x nodes again, or set training.learningRateScaling: "
            "none and an explicit training.steps so the world size changes neither"
        )

    def _lora_metadata(self, step: int, total_steps: int, validation: float | None, baseline: float | None) -> dict:
        spec, job = self.env.spec, self.env.job
        return {
            "name": self.env.name,
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
            "job": f"{job.metadata.namespace or 'local'}/{job.metadata.name}",
            "trainer": f"kontext-lora {__version__}",
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }

    # ---- saving ------------------------------------------------------------------------------------------
    def save(self, ctx: RunContext, step: int, stopped_by: str | None = None) -> str:
        """Save, publish and rotate the checkpoint of `step`; its URI. `stopped_by` (a signal's name): the trainer
        is exiting within the pod's grace period, so the held-out loss and the preview are skipped."""
        if not self.env.world.main:  # rank 0 writes the checkpoint; this URI is where it will be
            return ctx.store.storage.uri(step_prefix(step))
        with self.env.stop.deferred("finishing the checkpoint being saved first"):
            return self._write_checkpoint(ctx, step, stopped_by)

    def _write_checkpoint(self, ctx: RunContext, step: int, stopped_by: str | None) -> str:
        env = self.env
        spec, settings, name = env.spec, env.settings, env.name
        began = time.monotonic()
        unwrapped = ctx.accelerator.unwrap_model(ctx.transformer)
        staging = ctx.store.staging_dir(step)
        validation = None
        if stopped_by is None:
            validation = ctx.held_out.loss(unwrapped, ctx.accelerator, spec.training.guidance_scale)
        metadata = self._lora_metadata(step, ctx.total_steps, validation, ctx.baseline)
        export_lora(
            unwrapped,
            staging / lora_file_name(name, step),
            TORCH_DTYPES[spec.model.dtype],
            {**metadata, "stopped_by": stopped_by},
        )
        torch.save(
            {
                "format": STATE_FORMAT,
                "step": step,
                "total_steps": ctx.total_steps,
                "fingerprint": self._fingerprint(),
                "schedule": self._schedule(ctx.total_steps),
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
                title=f"{name} step {step}: before | after | base model | LoRA"
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
            uri=storage.uri(prefix + lora_file_name(name, step)),
            validation_loss=validation,
            edit_score=_rounded(lora_edits.score if lora_edits else None),
            base_edit_score=_rounded(ctx.base_edits.score if lora_edits and ctx.base_edits else None),
            preview_uri=storage.uri(prefix + PREVIEW_FILE) if preview is not None else None,
            time=now,
        )
        kept_steps = {c.step for c in kept}
        self.records = {s: r for s, r in self.records.items() if s in kept_steps}
        env.metrics.checkpoints_saved.inc()
        if validation is not None:
            env.metrics.validation_loss.set(validation)
        if lora_edits is not None:
            env.metrics.edit_score.set(lora_edits.score)
        env.status.update(force=True, **self.status_fields())
        log.info(
            "checkpoint step %d saved to %s (%s, %.1fs)%s",
            step,
            storage.uri(prefix),
            f"on {stopped_by}: no held-out loss or preview"
            if stopped_by
            else f"held-out loss {fmt(validation)}"
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

    # ---- the kept checkpoints, as status reports them -----------------------------------------------------
    def sorted_records(self) -> list[CheckpointRecord]:
        return [self.records[s] for s in sorted(self.records)]

    def best(self) -> str | None:
        """The kept checkpoint with the highest edit score; without edit scores, the lowest held-out loss."""
        edited = [r for r in self.records.values() if r.edit_score is not None]
        if edited:
            return max(edited, key=lambda r: (r.edit_score, r.step)).uri
        scored = [r for r in self.records.values() if r.validation_loss is not None]
        return min(scored, key=lambda r: (r.validation_loss, -r.step)).uri if scored else None

    def status_fields(self) -> dict[str, Any]:
        records = self.sorted_records()
        if not records:
            return {}
        return {"checkpoints": records, "last_checkpoint": records[-1].uri, "best_checkpoint": self.best()}

    # ---- resuming ----------------------------------------------------------------------------------------
    def discover(self, output: Storage) -> tuple[CheckpointStore, list[StoredCheckpoint]]:
        """The checkpoints under the output URI: incomplete ones removed, a surplus over `keep` rotated out; the
        store and the complete ones, oldest first."""
        spec = self.env.spec
        store = CheckpointStore(output, self.env.work / "checkpoints", self.env.name, spec.checkpoints.keep)
        found = store.scan()
        complete = [c for c in found if c.complete]
        if not self.env.world.main:  # only rank 0 deletes; it ran first (World.in_turn)
            return store, complete[-spec.checkpoints.keep :]
        store.discard_incomplete(found)
        if len(complete) > spec.checkpoints.keep:
            # A run killed between publishing a checkpoint and rotating left one too many: keep the newest `keep`.
            complete, _ = store.rotate()
        return store, complete

    def adopt(self, store: CheckpointStore, complete: list[StoredCheckpoint]) -> None:
        """Take over the records of the checkpoints a previous run left (the status lists them all)."""
        self.records = {r.step: r for r in store.records(complete)}

    def resume(
        self, latest: StoredCheckpoint, store: CheckpointStore, step_fn: KontextTrainStep, total_steps: int
    ) -> tuple[int, float | None, float | None]:
        """Restore the newest complete checkpoint; (its step, the "before" held-out loss, the smoothed loss)."""
        accelerator = step_fn.accelerator
        files = store.fetch(latest, self.env.work / "resume" / f"step-{latest.step:06d}")
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
        self._same_schedule(state, total_steps, store.storage.uri(latest.prefix))
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

    # ---- the final LoRA ----------------------------------------------------------------------------------
    def upload_final(self, ctx: RunContext, output: Storage) -> str:
        if not self.env.world.main:  # rank 0 uploads it
            return output.uri(f"{self.env.name}.safetensors")
        final_dir = self.env.work / "final"
        final_dir.mkdir(parents=True, exist_ok=True)
        records = self.sorted_records()
        validation = records[-1].validation_loss if records else None
        path = export_lora(
            ctx.accelerator.unwrap_model(ctx.transformer),
            final_dir / f"{self.env.name}.safetensors",
            TORCH_DTYPES[self.env.spec.model.dtype],
            self._lora_metadata(ctx.total_steps, ctx.total_steps, validation, ctx.baseline),
        )
        output.put_files([(path, path.name)])
        return output.uri(path.name)


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _edit_score_fields(held_out: HeldOutSet, base: HeldOutEdits | None, lora: HeldOutEdits | None) -> dict[str, Any]:
    """validation.json's edit scores: the LoRA's and the base model's, overall and per held-out pair."""
    if lora is None or base is None:
        return {}
    stems = [item.pair.stem for item in held_out.pairs]
    several = len(set(stems)) < len(stems)  # a pair at several resolutions
    return {
        "editMetric": EDIT_METRIC,
        "editScore": _rounded(lora.score),
        "baseEditScore": _rounded(base.score),
        "editScores": {
            _sample_name(item.pair, several): {"lora": _rounded(lora_score), "base": _rounded(base_score)}
            for item, lora_score, base_score in zip(held_out.pairs, lora.scores, base.scores, strict=True)
        },
    }


def _sample_name(pair: Any, several_resolutions: bool) -> str:
    """A held-out pair's name in validation.json: its stem, with its bucket when a job trains at several sizes."""
    return f"{pair.stem}@{pair.bucket[0]}x{pair.bucket[1]}" if several_resolutions else pair.stem
