"""The training loop: optimiser steps with metrics, progress and status, a checkpoint every `saveEvery` steps and
at the last one; a stop signal saves the step reached and ends the run (`Interrupted`, signals.py)."""

from __future__ import annotations

import logging
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import replace

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ..batches import BatchSchedule, micro_batch_generator
from ..distributed import shard_of
from ..encoding import EncodedPair, batch_inputs
from ..errors import InvalidInputError
from ..logs import fields
from ..signals import Interrupted, signal_name
from ..train_step import KontextTrainStep
from .checkpointing import Checkpointer
from .context import RunContext
from .environment import RunEnvironment

log = logging.getLogger(__name__)


def train(
    env: RunEnvironment,
    ctx: RunContext,
    step_fn: KontextTrainStep,
    train_set: list[EncodedPair],
    checkpointer: Checkpointer,
) -> list[float]:
    """Run the steps from `ctx.start_step + 1` to the last; the seconds each step took."""
    spec, settings, metrics = env.spec, env.settings, env.metrics
    accumulation = spec.training.gradient_accumulation
    world = env.world
    # One global batch of world x batchSize pairs per micro-batch; this rank trains on its shard of it.
    schedule = BatchSchedule(
        [p.pair.bucket for p in train_set], spec.training.batch_size * world.size, spec.training.seed
    )
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
            # Caption dropout is drawn for the whole global batch, then each rank takes its share of it.
            global_batches = [ctx.caption_dropout.apply([train_set[i] for i in schedule.batch(m)], m) for m in micro]
            shares = [shard_of(range(len(items)), world.rank, world.size) for items in global_batches]
            batches = [
                batch_inputs([items[p] for p in positions], ctx.latent_encoder)
                for items, (positions, _) in zip(global_batches, shares, strict=True)
            ]
            generators = [micro_batch_generator(spec.training.seed, m) for m in micro]
            began = time.perf_counter()
            result = step_fn(batches, generators, [shard for _, shard in shares])
            # One loss and one stop decision for the job: every rank stops after the same step.
            loss, stop_signal = world.step_report(result.loss, env.stop.signum)
            result = replace(result, loss=loss)
            elapsed = time.perf_counter() - began
            if not math.isfinite(result.loss):
                raise InvalidInputError(
                    f"training diverged: the loss is {result.loss} at step {step}; lower "
                    f"spec.training.learningRate (now {spec.training.learning_rate:g}) or keep maxGradNorm > 0"
                )
            step_seconds.append(elapsed)
            if len(step_seconds) == 1:
                seconds = env.mark("first step")
                log.info(
                    "first training step of this run done %.1f s after the trainer started",
                    seconds,
                    **fields(step=step, time_to_first_step=seconds, timeline=dict(env.timeline)),
                )
            ctx.tracker.update(step, result.loss, result.learning_rate)
            metrics.step.set(step)
            metrics.loss.set(result.loss)
            metrics.loss_ema.set(ctx.tracker.loss)
            metrics.learning_rate.set(result.learning_rate)
            metrics.step_seconds.observe(elapsed)
            metrics.observe_memory()
            bar.update(1)
            bar.set_postfix(loss=f"{ctx.tracker.loss:.4f}", lr=f"{result.learning_rate:.2e}", refresh=False)
            env.status.update(**ctx.tracker.status_fields())
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
            # In a world above 1 a signal arriving during a save is acted on after the next step (agreed by all).
            due = step % spec.checkpoints.save_every == 0 or step == ctx.total_steps
            stopping = stop_signal is not None and step < ctx.total_steps
            if stopping or due:
                stopped_by = signal_name(stop_signal) if stopping else None
                checkpoint = checkpointer.save(ctx, step, stopped_by=stopped_by)
                if not world.distributed:
                    stop_signal = env.stop.signum
                if step < ctx.total_steps and stop_signal is not None:
                    raise Interrupted(stop_signal, step=step, total_steps=ctx.total_steps, checkpoint=checkpoint)
    return step_seconds


class _Discard:
    """A stream for a progress bar that is only ever rendered with str(bar)."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass
