"""The training math against diffusers' FluxKontextPipeline: what the transformer sees must match inference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import FluxKontextPipeline
from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS
from kontext_trainer import flux_math
from kontext_trainer.data.images import bucket_for, buckets, to_pixels
from kontext_trainer.data.synthetic import render_pair
from kontext_trainer.encoding import LatentEncoder
from kontext_trainer.model.load import load_transformer, load_vae
from kontext_trainer.model.source import resolve_model_dir
from kontext_trainer.storage import S3Settings

from kontext_lora.api.spec import ModelSpec, TimestepSampling

from .helpers import random_inputs


@pytest.fixture(scope="module")
def pipeline(tiny_model: Path) -> FluxKontextPipeline:
    return FluxKontextPipeline.from_pretrained(tiny_model)


@pytest.mark.parametrize("size", [(592, 448), (512, 512)])
def test_packed_latents_and_ids_equal_what_the_pipeline_builds(
    tiny_model: Path, pipeline: FluxKontextPipeline, size: tuple[int, int]
) -> None:
    """Our VAE encoding + normalisation + 2x2 packing + Kontext image ids, against `prepare_latents`."""
    width, height = size
    control, target, _ = render_pair(7, size=size)
    model_dir = resolve_model_dir(ModelSpec(base=f"file://{tiny_model}"), S3Settings(), Path("/nonexistent"))
    encoder = LatentEncoder(load_vae(model_dir, torch.float32, torch.device("cpu")))

    ours_pixels = to_pixels(control, (width, height))
    processor = pipeline.image_processor  # what __call__ does with an input image at its bucket size
    theirs_pixels = processor.preprocess(processor.resize(control, height, width), height, width)
    torch.testing.assert_close(ours_pixels, theirs_pixels)

    latents = encoder.encode_pixels(ours_pixels)
    ours_control = flux_math.pack_latents(latents)
    ours_target = flux_math.pack_latents(encoder.encode_pixels(to_pixels(target, (width, height))))
    latent_h, latent_w = latents.shape[2:]
    ours_ids = flux_math.kontext_image_ids((latent_h, latent_w), (latent_h, latent_w))

    noise, image_latents, latent_ids, image_ids = pipeline.prepare_latents(
        image=theirs_pixels,
        batch_size=1,
        num_channels_latents=pipeline.transformer.config.in_channels // 4,
        height=height,
        width=width,
        dtype=torch.float32,
        device=torch.device("cpu"),
        generator=torch.Generator().manual_seed(0),
    )
    torch.testing.assert_close(ours_control, image_latents)
    assert ours_target.shape == noise.shape  # the noisy target has the pipeline's latent layout
    assert torch.equal(ours_ids, torch.cat([latent_ids, image_ids]))  # what __call__ passes as img_ids
    assert torch.equal(ours_ids[latent_ids.shape[0] :, 0], torch.ones(image_ids.shape[0]))  # control index 1
    assert torch.equal(flux_math.text_ids(7), torch.zeros(7, 3))

    random = torch.randn(2, 4, latent_h, latent_w)
    packed = flux_math.pack_latents(random)
    torch.testing.assert_close(packed, FluxKontextPipeline._pack_latents(random, 2, 4, latent_h, latent_w))
    torch.testing.assert_close(flux_math.unpack_latents(packed, latent_h, latent_w), random)
    torch.testing.assert_close(
        flux_math.unpack_latents(packed, latent_h, latent_w),
        FluxKontextPipeline._unpack_latents(packed, height, width, pipeline.vae_scale_factor),
    )


def test_loss_is_the_velocity_error_on_target_tokens_only(tiny_model: Path) -> None:
    transformer = load_transformer(tiny_model, torch.float32, torch.device("cpu")).eval()
    generator = torch.Generator().manual_seed(3)
    n_target, n_control, channels = 64, 64, transformer.config.in_channels
    inputs = flux_math.KontextInputs(
        target=torch.randn(1, n_target, channels, generator=generator),
        control=torch.randn(1, n_control, channels, generator=generator),
        prompt_embeds=torch.randn(1, 5, transformer.config.joint_attention_dim, generator=generator),
        pooled_prompt_embeds=torch.randn(1, transformer.config.pooled_projection_dim, generator=generator),
        img_ids=flux_math.kontext_image_ids((16, 16), (16, 16)),
        txt_ids=flux_math.text_ids(5),
    )
    noise = torch.randn(inputs.target.shape, generator=generator)
    sigma = torch.tensor([0.7])
    with torch.no_grad():
        loss = flux_math.flow_matching_loss(transformer, inputs, noise, sigma, guidance_scale=1.0)
        # The pipeline's call: x_t and the control latents along the sequence, t passed as sigma (timestep/1000).
        output = transformer(
            hidden_states=torch.cat([0.3 * inputs.target + 0.7 * noise, inputs.control], dim=1),
            timestep=sigma,
            guidance=torch.full([1], 1.0),
            pooled_projections=inputs.pooled_prompt_embeds,
            encoder_hidden_states=inputs.prompt_embeds,
            txt_ids=inputs.txt_ids,
            img_ids=inputs.img_ids,
            return_dict=False,
        )[0]
    assert output.shape[1] == n_target + n_control
    expected = torch.mean((output[:, :n_target] - (noise - inputs.target)) ** 2)
    torch.testing.assert_close(loss, expected)


def test_timestep_sampling() -> None:
    generator = torch.Generator().manual_seed(0)
    shifted = flux_math.sample_sigmas(20000, TimestepSampling.shift, 3.0, generator=generator)
    plain = flux_math.sample_sigmas(20000, TimestepSampling.sigmoid, 3.0, generator=generator)
    uniform = flux_math.sample_sigmas(20000, TimestepSampling.uniform, 3.0, generator=generator)
    for sample in (shifted, plain, uniform):
        assert float(sample.min()) > 0 and float(sample.max()) < 1
    assert abs(float(plain.median()) - 0.5) < 0.02
    # shift 3 maps the median 0.5 to 3*0.5/(1+2*0.5) = 0.75: training concentrates on high noise.
    assert abs(float(shifted.median()) - 0.75) < 0.02
    assert abs(float(uniform.mean()) - 0.5) < 0.02
    fixed = flux_math.stratified_sigmas(8, TimestepSampling.shift, 3.0)
    assert torch.equal(fixed, flux_math.stratified_sigmas(8, TimestepSampling.shift, 3.0))
    assert torch.all(fixed[1:] > fixed[:-1])
    assert abs(float(fixed.median()) - float(shifted.median())) < 0.03


def test_resolution_buckets_follow_the_pipelines_preferred_resolutions() -> None:
    assert buckets(1024) == tuple(PREFERRED_KONTEXT_RESOLUTIONS)
    for width, height in buckets(512):
        assert width % 16 == 0 and height % 16 == 0
        assert abs(width * height / 512**2 - 1) < 0.08
    assert bucket_for(1000, 1000, 1024) == (1024, 1024)
    assert bucket_for(1600, 1200, 512) == (592, 448)  # 4:3 -> the closest-aspect bucket
    assert bucket_for(1200, 1600, 512) == (448, 592)


@pytest.mark.parametrize(("side", "expected_shift"), [(512, 1.878), (768, 2.332), (1024, 3.158)])
def test_flux_shift_is_the_pipelines_inference_shift_for_the_buckets_token_count(side: int, expected_shift) -> None:
    """FluxKontextPipeline: mu = calculate_shift(target tokens), sigmas = scheduler.time_shift(mu, 1, linspace)."""
    from diffusers.pipelines.flux.pipeline_flux_kontext import calculate_shift, retrieve_timesteps
    from kontext_trainer.model.tiny import kontext_dev_scheduler

    scheduler = kontext_dev_scheduler()
    tokens = (side // 16) ** 2
    config = scheduler.config
    mu = calculate_shift(
        tokens, config.base_image_seq_len, config.max_image_seq_len, config.base_shift, config.max_shift
    )
    assert flux_math.calculate_shift(
        tokens, config.base_image_seq_len, config.max_image_seq_len, config.base_shift, config.max_shift
    ) == pytest.approx(mu)
    dynamic = flux_math.DynamicShift.from_scheduler_config(config)
    shift = flux_math.resolve_shift(TimestepSampling.flux_shift, 3.0, tokens, dynamic)
    assert shift == pytest.approx(expected_shift, abs=1e-3)
    assert flux_math.resolve_shift(TimestepSampling.shift, 3.0, tokens, dynamic) == 3.0
    steps = 28
    linear = torch.linspace(1.0, 1 / steps, steps)
    retrieve_timesteps(scheduler, steps, sigmas=linear.numpy(), mu=mu)  # what the pipeline's __call__ does
    torch.testing.assert_close(flux_math.shift_timesteps(linear, shift), scheduler.sigmas[:-1], rtol=1e-5, atol=1e-6)
    # The training draws: logit-normal, shifted by the same map (musubi-tuner's flux_shift).
    generator = torch.Generator().manual_seed(1)
    draws = flux_math.sample_sigmas(20000, TimestepSampling.flux_shift, shift, generator=generator)
    median = 0.5 * shift / (1 + 0.5 * (shift - 1))
    assert abs(float(draws.median()) - median) < 0.02
    fixed = flux_math.stratified_sigmas(8, TimestepSampling.flux_shift, shift)
    assert abs(float(fixed[3:5].mean()) - median) < 0.03  # the middle pair straddles the median


def test_dynamic_shift_follows_the_scheduler_config() -> None:
    off = flux_math.DynamicShift.from_scheduler_config({"use_dynamic_shifting": False, "shift": 2.0})
    assert off.shift(4096) == 2.0 == off.shift(256)
    linear = flux_math.DynamicShift.from_scheduler_config({"time_shift_type": "linear"})
    assert linear.shift(4096) == pytest.approx(1.15)  # time_shift linear: mu / (mu + 1/t - 1)


def test_weighted_sampling_reproduces_ai_toolkits_weighted_timesteps() -> None:
    """Uniform draws on ai-toolkit's grid t = (1000 - i) / 1000, i in 0..998, loss weights from its curve (a fit of
    toolkit/timestep_weighing/default_weighing_scheme.py): ~20 % of the weight below t = 0.3 (30 % of the draws)."""
    generator = torch.Generator().manual_seed(2)
    draws = flux_math.sample_sigmas(50000, TimestepSampling.weighted, generator=generator)
    grid = torch.round(draws * 1000)
    assert torch.allclose(draws * 1000, grid, atol=0.2) and float(grid.min()) >= 2 and float(grid.max()) <= 1000
    assert abs(float(draws.mean()) - 0.501) < 0.01
    weights = flux_math.timestep_weights(TimestepSampling.weighted, draws)
    assert weights is not None and weights.shape == draws.shape
    assert flux_math.timestep_weights(TimestepSampling.shift, draws) is None
    assert abs(float(weights.mean()) - 1.0) < 0.01
    low = float(weights[draws < 0.3].sum() / weights.sum())
    assert 0.19 < low < 0.215 and 0.29 < float((draws < 0.3).float().mean()) < 0.31
    grid_t = torch.arange(2, 1001) / 1000
    curve = flux_math.timestep_weights(TimestepSampling.weighted, grid_t)
    assert 0.84 < float(grid_t[curve.argmax()]) < 0.9 and 1.45 < float(curve.max()) < 1.6  # its bell near t = 0.87
    assert float(curve[grid_t < 0.01].max()) < 0.6 and 0.85 < float(curve[-1]) < 0.95  # t -> 0 and t = 1
    # Held-out timesteps: quantiles of the weight-tilted grid, whose unweighted mean is the weighted mean.
    fixed = flux_math.stratified_sigmas(1000, TimestepSampling.weighted)
    assert float(fixed.mean()) == pytest.approx(float((grid_t * curve).sum() / curve.sum()), abs=0.005)


def test_weighted_loss_weights_each_samples_mse(tiny_model: Path) -> None:
    transformer = load_transformer(tiny_model, torch.float32, torch.device("cpu")).eval()
    generator = torch.Generator().manual_seed(4)
    inputs = random_inputs(transformer.config, 2, (8, 8), 5, generator)
    noise = torch.randn(inputs.target.shape, generator=generator)
    sigmas = torch.tensor([0.2, 0.9])
    with torch.no_grad():
        plain = flux_math.flow_matching_loss(transformer, inputs, noise, sigmas)
        ones = flux_math.flow_matching_loss(transformer, inputs, noise, sigmas, weights=torch.ones(2))
        first = flux_math.flow_matching_loss(transformer, inputs, noise, sigmas, weights=torch.tensor([2.0, 0.0]))
        alone = flux_math.flow_matching_loss(
            transformer, _first(inputs), noise[:1], sigmas[:1], weights=torch.tensor([1.0])
        )
    torch.testing.assert_close(ones, plain)
    torch.testing.assert_close(first, alone)  # (2 * mse_0 + 0 * mse_1) / 2


def _first(inputs: flux_math.KontextInputs) -> flux_math.KontextInputs:
    return flux_math.KontextInputs(
        inputs.target[:1],
        inputs.control[:1],
        inputs.prompt_embeds[:1],
        inputs.pooled_prompt_embeds[:1],
        inputs.img_ids,
        inputs.txt_ids,
    )
