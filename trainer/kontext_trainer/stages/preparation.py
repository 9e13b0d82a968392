"""The preparation stage: storage checks, the validated dataset, the checkpoints to resume from, the model.

Nothing here touches the GPU: every problem with the job's inputs (an unreachable bucket, a bad file, a model
that is missing a part) is found before any weights are loaded.
"""

from __future__ import annotations

import logging
import random

from ..checkpoints import CheckpointStore
from ..data.dataset import TrainingPair, prepare_dataset
from ..logs import fields
from ..model.source import resolve_model_dir
from ..storage import Location, open_storage
from .context import Prepared
from .environment import RunEnvironment

log = logging.getLogger(__name__)


def split_held_out(pairs: list[TrainingPair], wanted: int, seed: int) -> tuple[list[TrainingPair], list[TrainingPair]]:
    """(training pairs, held-out pairs): a seeded choice, never leaving fewer than one pair to train on."""
    count = max(0, min(wanted, len(pairs) - 1))
    held = set(random.Random(seed).sample(range(len(pairs)), count))
    return [p for i, p in enumerate(pairs) if i not in held], [p for i, p in enumerate(pairs) if i in held]


def prepare(env: RunEnvironment) -> Prepared:
    """Storage checks, the validated dataset, existing checkpoints (incomplete ones removed), the model."""
    spec, settings = env.spec, env.settings
    dataset_storage = open_storage(Location.parse(spec.dataset.uri, settings.base_dir), env.s3)
    output = open_storage(Location.parse(spec.output.uri, settings.base_dir), env.s3)
    output.check()
    pairs, _ = prepare_dataset(dataset_storage, spec.dataset, env.work / "dataset", settings.show_progress)
    train_pairs, held_pairs = split_held_out(pairs, spec.dataset.held_out_pairs, spec.training.seed)
    total_steps = spec.total_steps(len(pairs))
    env.metrics.dataset_pairs.set(len(pairs))
    env.metrics.total_steps.set(total_steps)
    log.info(
        "dataset: %d pairs (%d training, %d held out) from %s",
        len(pairs),
        len(train_pairs),
        len(held_pairs),
        dataset_storage.uri(),
        **fields(pairs=len(pairs), held_out=len(held_pairs), total_steps=total_steps),
    )
    env.status.update(dataset_pairs=len(pairs), total_steps=total_steps, step=0)

    store = CheckpointStore(output, env.work / "checkpoints", env.name, spec.checkpoints.keep)
    found = store.scan()
    store.discard_incomplete(found)
    complete = [c for c in found if c.complete]
    if len(complete) > spec.checkpoints.keep:
        # A run killed between publishing a checkpoint and rotating left one too many: keep the newest `keep`.
        complete, _ = store.rotate()
    model_dir = resolve_model_dir(spec.model, env.s3, settings.model_cache, settings.base_dir, settings.show_progress)
    return Prepared(output, pairs, train_pairs, held_pairs, total_steps, store, complete, model_dir)
