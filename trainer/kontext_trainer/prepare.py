"""`kontext-lora prepare`: the preparation pod's program, and a check of a job's inputs without training.

In the cluster the operator runs it as `kontext-lora prepare --from-env` in a CPU-only Job before the GPU Job
(docs/architecture.md, "Preparation"): it checks storage and model access, validates the pairs, fills the model
cache volume when asked (`$KONTEXT_LORA_FILL_MODEL_CACHE`) and writes the manifest the training pod starts from
(`stages.preparation`). Failures exit with the trainer's codes (2 invalid input, 3 storage, 4 model access), so the
operator fails the job before any GPU is requested. Locally, `kontext-lora prepare job.yaml` runs the same checks.
"""

from __future__ import annotations

import logging

from kontext_lora.api import KontextLoRAJob, Stage

from .settings import TrainerSettings
from .signals import StopSignals
from .stages.environment import RunEnvironment
from .stages.preparation import PreparedInputs, prepare_inputs

log = logging.getLogger(__name__)

STATUS_FLUSH_SECONDS = 30.0


class PreparationRun:
    def __init__(self, job: KontextLoRAJob, settings: TrainerSettings, stop: StopSignals | None = None):
        self.settings = settings
        self.env = RunEnvironment.create(job, settings, stop)

    def run(self) -> PreparedInputs:
        env = self.env
        try:
            env.stage(Stage.Preparing)
            inputs = prepare_inputs(env, fill_model_cache=self.settings.fill_model_cache)
            log.info(
                "prepared %d pairs and model %s in %.1f s: %s",
                len(inputs.pairs),
                env.spec.model.base,
                env.mark("prepared"),
                inputs.manifest_uri,
            )
            for warning in inputs.warnings:
                log.warning("%s", warning)
            return inputs
        finally:
            env.status.close(STATUS_FLUSH_SECONDS)
