"""The download and set-up stages of a training run.

`download`: the checkpoints to resume from, what the encoding cache already holds, and then only what is still
needed — the model's parts (no text encoders when every caption's encoding is cached, which for FLUX.1-Kontext-dev
spares T5-XXL's ~9.5 GB) and the images of the pairs that still need encoding or previews.
`set_up`: encode what is missing (the encoders then leave memory), load the transformer, add the LoRA, build the
optimiser and schedule, then resume from the newest checkpoint or measure the untrained held-out loss.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from accelerate.utils import set_seed

from kontext_lora.api.spec import DType

from ..data.dataset import fetch_pair_images
from ..encoding import DatasetEncoder, EncodedPair, EncodingCache, Fingerprints, remote_cache
from ..logs import fields
from ..model.load import TORCH_DTYPES, load_scheduler, load_transformer
from ..model.lora import add_lora
from ..model.source import TEXT_PARTS, TRAINING_PARTS, fetch_model
from ..progress import ProgressTracker
from ..train_step import KontextTrainStep, build_lr_scheduler, build_optimizer
from ..validation import HeldOutSet
from .checkpointing import Checkpointer
from .context import Prepared, RunContext
from .environment import RunEnvironment
from .preparation import PreparedInputs, split_held_out

log = logging.getLogger(__name__)


def _dtypes(env: RunEnvironment) -> tuple[torch.dtype, torch.dtype]:
    """(weights and text encoders, VAE): the VAE runs in bf16 or fp32, FLUX's VAE is not trustworthy in fp16."""
    dtype = env.spec.model.dtype
    return TORCH_DTYPES[dtype], torch.bfloat16 if dtype is DType.bf16 else torch.float32


def download(env: RunEnvironment, inputs: PreparedInputs, checkpointer: Checkpointer) -> Prepared:
    """Checkpoints found, encodings gathered, then the model parts and pair images still needed."""
    spec, settings = env.spec, env.settings
    pairs = inputs.pairs
    train_pairs, held_pairs = split_held_out(pairs, spec.dataset.held_out_pairs, spec.training.seed)
    total_steps = spec.total_steps(len(pairs), env.world.size)
    env.metrics.total_steps.set(total_steps)
    log.info(
        "dataset: %d pairs (%d training, %d held out)",
        len(pairs),
        len(train_pairs),
        len(held_pairs),
        **fields(pairs=len(pairs), held_out=len(held_pairs), total_steps=total_steps),
    )
    env.status.update(dataset_pairs=len(pairs), total_steps=total_steps, step=0)
    store, complete = checkpointer.discover(inputs.output)

    weight_dtype, vae_dtype = _dtypes(env)
    shared = remote_cache(spec.output.effective_cache_uri(), env.s3, settings.base_dir)
    encodings = EncodingCache(env.work / "cache", Fingerprints.of(inputs.model), weight_dtype, vae_dtype, remote=shared)
    text_keys = [encodings.text_key(caption) for caption in sorted({p.caption for p in pairs})]
    latent_keys = {p.stem: encodings.latent_key(p) for p in pairs} if spec.training.cache_latents else {}
    available = encodings.gather([*text_keys, *latent_keys.values()])
    text_missing = [k for k in text_keys if k not in available]
    parts = TRAINING_PARTS + (TEXT_PARTS if text_missing else ())
    log.info(
        "encodings: %d of %d captions and %d of %d pairs cached (%d from the shared cache %s); model parts: %s",
        len(text_keys) - len(text_missing),
        len(text_keys),
        sum(k in available for k in latent_keys.values()),
        len(latent_keys),
        sum(encodings.report.remote.values()),
        shared.uri(),
        ", ".join(parts),
        **fields(encodings_local=encodings.report.local, encodings_shared=encodings.report.remote),
    )
    env.mark("encodings gathered")
    model_dir = fetch_model(
        inputs.model, env.s3, settings.model_cache, settings.base_dir, parts, settings.show_progress
    )
    env.mark("model downloaded")

    if not inputs.images_local:
        previews = settings.preview_steps > 0 and bool(held_pairs)
        needed = [
            p
            for p in pairs
            if not spec.training.cache_latents or latent_keys[p.stem] not in available or (previews and p in held_pairs)
        ]
        downloaded = fetch_pair_images(inputs.dataset, needed, spec.dataset, env.work / "dataset")
        log.info("pair images: %d of %d pairs needed here, %d files downloaded", len(needed), len(pairs), downloaded)
        env.mark("pair images downloaded")
    return Prepared(inputs.output, pairs, train_pairs, held_pairs, total_steps, store, complete, model_dir, encodings)


def announce_world(env: RunEnvironment) -> None:
    """Log the world size and what it does to the optimisation (once, by rank 0), and export it as a metric."""
    world, spec = env.world, env.spec
    env.metrics.world_size.set(world.size)
    if world.size != spec.resources.world_size:
        log.warning(
            "%d training processes, but spec.resources asks for %d (count %d x nodes %d): steps and the learning "
            "rate follow the %d running",
            world.size,
            spec.resources.world_size,
            spec.resources.count,
            spec.resources.nodes,
            world.size,
        )
    if world.distributed:
        log.info(
            "data-parallel over %d processes: each optimiser step sees %d pairs (%d per process x %d micro-batches), "
            "learning rate %.3g (%s scaling of %.3g)",
            world.size,
            world.size * spec.training.batch_size * spec.training.gradient_accumulation,
            spec.training.batch_size,
            spec.training.gradient_accumulation,
            spec.effective_learning_rate(world.size),
            spec.training.learning_rate_scaling.value,
            spec.training.learning_rate,
            **fields(world_size=world.size, learning_rate=spec.effective_learning_rate(world.size)),
        )


def encode(env: RunEnvironment, data: Prepared) -> tuple[list[EncodedPair], Any]:
    """The dataset's encodings (what is not cached is encoded here; the encoders then leave memory) and the latent
    encoder kept for previews."""
    spec, settings = env.spec, env.settings
    accelerator = env.world.accelerator(spec.model.dtype, spec.training.gradient_accumulation)
    weight_dtype, vae_dtype = _dtypes(env)
    encoder = DatasetEncoder(
        data.model_dir, env.work / "cache", accelerator.device, weight_dtype, vae_dtype, cache=data.encodings
    )
    previews = settings.preview_steps > 0 and bool(data.held_pairs)
    encoded, latent_encoder = encoder.encode(
        data.pairs,
        cache_latents=spec.training.cache_latents,
        keep_vae=previews,
        show_progress=settings.show_progress,
    )
    env.mark("encoded")
    report = data.encodings.report
    log.info(
        "encoded %d captions and %d pairs here; %d captions and %d pairs came from caches",
        report.encoded["text"],
        report.encoded["latents"],
        report.local["text"] + report.remote["text"],
        report.local["latents"] + report.remote["latents"],
        **fields(encoded=report.encoded, uploaded=report.uploaded),
    )
    return encoded, latent_encoder


def set_up(
    env: RunEnvironment, data: Prepared, checkpointer: Checkpointer, encodings: tuple[list[EncodedPair], Any]
) -> tuple[RunContext, KontextTrainStep, list[EncodedPair]]:
    """Build the LoRA and optimiser, then resume or (rank 0) measure the untrained held-out loss."""
    spec, settings, world = env.spec, env.settings, env.world
    accelerator = world.accelerator(spec.model.dtype, spec.training.gradient_accumulation)
    weight_dtype, _ = _dtypes(env)
    encoded, latent_encoder = encodings
    previews = settings.preview_steps > 0 and bool(data.held_pairs)
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
    env.mark("transformer loaded")
    set_seed(spec.training.seed)  # the LoRA's initial A matrices (and any dropout) follow the job's seed
    parameters = add_lora(transformer, spec.lora, spec.lora_alpha)
    if spec.training.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    optimizer = build_optimizer(parameters, spec.training, spec.effective_learning_rate(world.size))
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
        start_step, baseline, loss_ema = checkpointer.resume(data.complete[-1], data.store, step_fn, data.total_steps)
        checkpointer.adopt(data.store, data.complete)
        env.status.update(force=True, step=start_step, **checkpointer.status_fields())
    elif world.main:  # the held-out set is rank 0's, as are the checkpoints that report on it
        baseline = held_out.loss(accelerator.unwrap_model(transformer), accelerator, spec.training.guidance_scale)
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
    context.base_edits = context.held_out_edits(settings.preview_steps, spec.training.seed, base=True)
    if context.base_edits is not None:
        log.info(
            "held-out edit score of the base model: %.2f dB",
            context.base_edits.score,
            **fields(base_edit_score=context.base_edits.score),
        )
    return context, step_fn, [by_stem[p.stem] for p in data.train_pairs]
