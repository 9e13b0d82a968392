"""What the stages hand each other: the prepared inputs, and the state of the run once it is set up."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from ..checkpoints import CheckpointStore, StoredCheckpoint
from ..data.dataset import TrainingPair
from ..encoding import EncodingCache
from ..progress import ProgressTracker
from ..storage import Storage
from ..validation import HeldOutEdits, HeldOutSet


@dataclass
class Prepared:
    """The download stage's result: the pairs, the checkpoints found, the model folder, the encoding cache."""

    output: Storage
    pairs: list[TrainingPair]
    train_pairs: list[TrainingPair]
    held_pairs: list[TrainingPair]
    total_steps: int
    store: CheckpointStore
    complete: list[StoredCheckpoint]  # complete checkpoints found under the output URI, oldest first
    model_dir: Path
    encodings: EncodingCache


@dataclass
class RunContext:
    """The set-up stage's result: everything the training loop and the checkpoints need."""

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
