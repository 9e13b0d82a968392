"""The download and set-up stages of a training run.

`download`: the checkpoints to resume from, what the encoding cache already holds, and then only what is still
needed — the model's parts (no text encoders when every caption's encoding is cached, which for FLUX.1-Kontext-dev
spares T5-XXL's ~9.5 GB) and the images of the pairs that still need encoding or previews.
`set_up`: encode what is missing (the encoders then leave memory), load the transformer, add the LoRA, build the
optimiser and schedule, then resume from the newest checkpoint or measure the untrained held-out loss.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import torch
from accelerate.utils import set_seed

from kontext_lora.api.spec import DType

from ..batches import CaptionDropout
from ..data.captions import dropped_caption
from ..data.dataset import fetch_pair_images, training_samples
from ..encoding import DatasetEncoder, EncodedPair, EncodingCache, Fingerprints, TextEmbedding, remote_cache
from ..flux_math import DynamicShift, image_tokens, resolve_shift
from ..logs import fields
from ..memory_check import check_memory
from ..model.load import TORCH_DTYPES, load_scheduler, load_transformer
from ..model.lora import add_lora
from ..model.source import TEXT_PARTS, TRAINING_PARTS, fetch_model
from ..model.speed import configure_speed
from ..progress import ProgressTracker
from ..train_step import KontextTrainStep, build_lr_scheduler, build_optimizer
from ..validation import HeldOutSet
from .checkpointing import Checkpointer
from .context import Prepared, RunContext
from .environment import RunEnvironment
from .preparation import PreparedInputs, split_held_out

log = logging.getLogger(__name__)


class Encodings(NamedTuple):
    """What `encode` hands `set_up`: every training sample encoded, the latent encoder (previews), the dropped
    caption's embedding (None without caption dropout)."""

    pairs: list[EncodedPair]
    latent_encoder: Any
    dropped_caption: TextEmbedding | None


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
    text_keys = [encodings.text_key(caption) for caption in sorted(_captions(env, pairs))]
    samples = training_samples(pairs, spec.dataset.training_resolutions)  # one per pair and resolution
    latent_keys = {p.sample: encodings.latent_key(p) for p in samples} if spec.training.cache_latents else {}
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
        uncached = {p.stem for p in samples if latent_keys.get(p.sample) not in available}
        needed = [
            p for p in pairs if not spec.training.cache_latents or p.stem in uncached or (previews and p in held_pairs)
        ]
        downloaded = fetch_pair_images(inputs.dataset, needed, spec.dataset, env.work / "dataset")
        log.info("pair images: %d of %d pairs needed here, %d files downloaded", len(needed), len(pairs), downloaded)
        env.mark("pair images downloaded")
    return Prepared(inputs.output, pairs, train_pairs, held_pairs, total_steps, store, complete, model_dir, encodings)


def _captions(env: RunEnvironment, pairs: list) -> set[str]:
    """Every caption the run trains with: the pairs', and the dropped one when captions are dropped."""
    captions = {p.caption for p in pairs}
    if env.spec.training.caption_dropout > 0:
        captions.add(dropped_caption(env.spec.dataset.trigger_word))
    return captions


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


def encode(env: RunEnvironment, data: Prepared) -> Encodings:
    """The dataset's encodings (what is not cached is encoded here; the encoders then leave memory), the latent
    encoder kept for previews and the dropped caption's embedding (caption dropout)."""
    spec, settings = env.spec, env.settings
    accelerator = env.world.accelerator(spec.model.dtype, spec.training.gradient_accumulation)
    check_memory(spec, data.model_dir, accelerator.device)  # before encoding: an OOM-bound job fails now
    weight_dtype, vae_dtype = _dtypes(env)
    encoder = DatasetEncoder(
        data.model_dir, env.work / "cache", accelerator.device, weight_dtype, vae_dtype, cache=data.encodings
    )
    previews = settings.preview_steps > 0 and bool(data.held_pairs)
    dropped = dropped_caption(spec.dataset.trigger_word)
    encoded, latent_encoder = encoder.encode(
        training_samples(data.pairs, spec.dataset.training_resolutions),  # one per pair and resolution
        cache_latents=spec.training.cache_latents,
        keep_vae=previews,
        show_progress=settings.show_progress,
        extra_captions=(dropped,) if spec.training.caption_dropout > 0 else (),
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
    return Encodings(encoded, latent_encoder, encoder.texts[dropped] if spec.training.caption_dropout > 0 else None)


def set_up(
    env: RunEnvironment, data: Prepared, checkpointer: Checkpointer, encodings: Encodings
) -> tuple[RunContext, KontextTrainStep, list[EncodedPair]]:
    """Build the LoRA and optimiser, then resume or (rank 0) measure the untrained held-out loss."""
    spec, settings, world = env.spec, env.settings, env.world
    accelerator = world.accelerator(spec.model.dtype, spec.training.gradient_accumulation)
    weight_dtype, _ = _dtypes(env)
    encoded, latent_encoder = encodings.pairs, encodings.latent_encoder
    previews = settings.preview_steps > 0 and bool(data.held_pairs)
    held_stems = {p.stem for p in data.held_pairs}  # a held-out pair at every resolution it trains at
    scheduler_config = dict(load_scheduler(data.model_dir).config)
    dynamic_shift = DynamicShift.from_scheduler_config(scheduler_config)
    held_out = HeldOutSet(
        [e for e in encoded if e.pair.stem in held_stems],
        latent_encoder,
        spec.training.timestep_sampling,
        # flux_shift: the held-out timesteps are those of the primary resolution's square bucket
        resolve_shift(
            spec.training.timestep_sampling,
            spec.training.timestep_shift,
            image_tokens(spec.dataset.resolution, spec.dataset.resolution),
            dynamic_shift,
        ),
        spec.training.seed,
        settings.validation_timesteps,
    )

    transformer = load_transformer(data.model_dir, weight_dtype, accelerator.device)
    env.mark("transformer loaded")
    set_seed(spec.training.seed)  # the LoRA's initial A matrices (and any dropout) follow the job's seed
    parameters = add_lora(transformer, spec.lora, spec.lora_alpha)
    if spec.training.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    configure_speed(transformer, spec.training.attention_backend, spec.training.compile)
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
        dynamic_shift=dynamic_shift,
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
        scheduler_config=scheduler_config if previews else None,
        store=data.store,
        total_steps=data.total_steps,
        start_step=start_step,
        baseline=baseline,
        tracker=tracker,
        caption_dropout=CaptionDropout(
            spec.training.caption_dropout,
            spec.training.seed,
            encodings.dropped_caption,
        ),
    )
    context.base_edits = context.held_out_edits(settings.preview_steps, spec.training.seed, base=True)
    if context.base_edits is not None:
        log.info(
            "held-out edit score of the base model: %.2f dB",
            context.base_edits.score,
            **fields(base_edit_score=context.base_edits.score),
        )
    return context, step_fn, [e for e in encoded if e.pair.stem not in held_stems]
