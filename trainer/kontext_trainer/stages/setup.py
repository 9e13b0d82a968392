"""The set-up stage: encode the dataset (the encoders then leave memory), load the transformer, add the LoRA,
build the optimiser and schedule, then resume from the newest checkpoint or measure the untrained held-out loss."""

from __future__ import annotations

import logging

import torch
from accelerate.utils import set_seed

from kontext_lora.api.spec import DType

from ..encoding import DatasetEncoder, EncodedPair
from ..logs import fields
from ..model.load import TORCH_DTYPES, load_scheduler, load_transformer
from ..model.lora import add_lora
from ..progress import ProgressTracker
from ..train_step import KontextTrainStep, build_lr_scheduler, build_optimizer, make_accelerator
from ..validation import HeldOutSet
from .checkpointing import Checkpointer
from .context import Prepared, RunContext
from .environment import RunEnvironment

log = logging.getLogger(__name__)


def set_up(
    env: RunEnvironment, data: Prepared, checkpointer: Checkpointer
) -> tuple[RunContext, KontextTrainStep, list[EncodedPair]]:
    """Encode the dataset, build the LoRA and optimiser, then resume or measure the untrained held-out loss."""
    spec, settings = env.spec, env.settings
    accelerator = make_accelerator(spec.model.dtype, spec.training.gradient_accumulation)
    weight_dtype = TORCH_DTYPES[spec.model.dtype]
    # The VAE runs in bf16 or fp32: FLUX's VAE is not trustworthy in fp16.
    vae_dtype = torch.bfloat16 if spec.model.dtype is DType.bf16 else torch.float32
    encoder = DatasetEncoder(data.model_dir, env.work / "cache", accelerator.device, weight_dtype, vae_dtype)
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
        start_step, baseline, loss_ema = checkpointer.resume(data.complete[-1], data.store, step_fn)
        checkpointer.adopt(data.store, data.complete)
        env.status.update(force=True, step=start_step, **checkpointer.status_fields())
    else:
        baseline = held_out.loss(transformer, accelerator, spec.training.guidance_scale)
        if baseline is not None:
            log.info("held-out loss before training: %.4f", baseline, **fields(validation_loss=baseline))
    tracker = ProgressTracker(data.total_steps, start_step)
    tracker.loss = loss_ema
    context = RunContext(
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
    return context, step_fn, [by_stem[p.stem] for p in data.train_pairs]
