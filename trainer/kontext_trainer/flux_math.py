"""The FLUX.1-Kontext training math, as plain functions of tensors and modules.

Conventions follow diffusers' `FluxKontextPipeline` at inference, so a LoRA trained here sees at training time
exactly the inputs it gets when used:

- VAE latents are normalised with the VAE's `shift_factor`/`scaling_factor` and packed into 2x2 patches:
  (B, C, H, W) -> (B, H/2 * W/2, 4C).
- The transformer's image sequence is [noisy target tokens ; control tokens]; image ids are (index, row, col)
  with index 0 for the target and 1 for the control image. Text ids are zeros.
- Flow matching: x_t = (1 - t) * x0 + t * noise, the model predicts the velocity (noise - x0), t in (0, 1) is
  passed as the timestep (the transformer multiplies it by 1000, as the pipeline's `timestep / 1000` undoes).
- The loss is the MSE on the target tokens only; the control tokens' outputs are discarded.

Nothing here holds state, so benchmarks can call these with any `FluxTransformer2DModel` and any tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_density_for_timestep_sampling

from kontext_lora.api.spec import TimestepSampling

VAE_PATCH = 2  # latents are packed in 2x2 patches


def normalize_latents(latents: torch.Tensor, shift_factor: float | None, scaling_factor: float) -> torch.Tensor:
    """VAE latent -> the distribution the transformer was trained on (as `FluxKontextPipeline._encode_vae_image`)."""
    return (latents - (shift_factor or 0.0)) * scaling_factor


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C), 2x2 patches in row-major order."""
    batch, channels, height, width = latents.shape
    if height % VAE_PATCH or width % VAE_PATCH:
        raise ValueError(f"latent height and width must be even to pack 2x2 patches, got {height}x{width}")
    patches = latents.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(batch, (height // 2) * (width // 2), channels * 4)


def unpack_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of `pack_latents` for latents of `height` x `width` (latent pixels, not image pixels)."""
    batch, _, features = packed.shape
    channels = features // 4
    patches = packed.view(batch, height // 2, width // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(batch, channels, height, width)


def image_ids(
    latent_height: int,
    latent_width: int,
    index: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Position ids (index, row, col) of the packed tokens of one latent image: (H/2 * W/2, 3)."""
    rows = torch.arange(latent_height // 2, device=device, dtype=dtype)
    cols = torch.arange(latent_width // 2, device=device, dtype=dtype)
    grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(-1, 2)
    first = torch.full((grid.shape[0], 1), float(index), device=device, dtype=dtype)
    return torch.cat([first, grid], dim=1)


def kontext_image_ids(
    target_hw: tuple[int, int],
    control_hw: tuple[int, int],
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Ids of the sequence [target tokens ; control tokens]: the control's first id is 1 (Kontext's offset)."""
    return torch.cat(
        [image_ids(*target_hw, index=0, device=device, dtype=dtype), image_ids(*control_hw, 1, device, dtype)], dim=0
    )


def text_ids(sequence_length: int, device: torch.device | str | None = None, dtype=torch.float32) -> torch.Tensor:
    return torch.zeros(sequence_length, 3, device=device, dtype=dtype)


def sample_sigmas(
    batch_size: int,
    sampling: TimestepSampling | str = TimestepSampling.shift,
    shift: float = 3.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Flow-matching times t in (0, 1), one per sample.

    `shift` (default, as ai-toolkit's Flux trainers): a logit-normal draw u pushed towards high noise with
    t = s·u / (1 + (s - 1)·u), the same map the inference scheduler applies to its sigmas with shift s.
    `sigmoid`: plain logit-normal (SD3's recommendation). `uniform`: U(0, 1).
    """
    sampling = TimestepSampling(sampling)
    scheme = "uniform" if sampling is TimestepSampling.uniform else "logit_normal"
    # Draw on the generator's device, then move: CPU generators are portable across machines.
    gen_device = generator.device if generator is not None else device
    u = compute_density_for_timestep_sampling(
        scheme, batch_size, logit_mean=0.0, logit_std=1.0, device=gen_device, generator=generator
    ).to(device)
    if sampling is TimestepSampling.shift:
        u = shift * u / (1 + (shift - 1) * u)
    return u.clamp(1e-4, 1 - 1e-4)


def stratified_sigmas(
    count: int, sampling: TimestepSampling | str = TimestepSampling.shift, shift: float = 3.0
) -> torch.Tensor:
    """`count` fixed times at the mid-quantiles of the training distribution (deterministic validation)."""
    quantiles = (torch.arange(count, dtype=torch.float64) + 0.5) / count
    sampling = TimestepSampling(sampling)
    if sampling is TimestepSampling.uniform:
        return quantiles.float()
    u = torch.sigmoid(torch.special.ndtri(quantiles))
    if sampling is TimestepSampling.shift:
        u = shift * u / (1 + (shift - 1) * u)
    return u.float()


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t noise, with t broadcast over all but the batch dimension."""
    t = sigmas.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1 - t) * x0 + t * noise


def guidance_vector(transformer: torch.nn.Module, scale: float, batch_size: int, device) -> torch.Tensor | None:
    """The guidance-embedding input (None for models without one), as the pipeline builds it. `transformer` may be
    wrapped (DistributedDataParallel keeps the model in `.module`)."""
    model = getattr(transformer, "module", transformer)
    if not getattr(model.config, "guidance_embeds", False):
        return None
    return torch.full((batch_size,), float(scale), device=device, dtype=torch.float32)


@dataclass
class KontextInputs:
    """One batch, ready for the transformer: packed, normalised latents and cached text embeddings."""

    target: torch.Tensor  # x0, packed: (B, N, 4C)
    control: torch.Tensor  # packed control latents: (B, M, 4C)
    prompt_embeds: torch.Tensor  # T5 sequence: (B, L, D)
    pooled_prompt_embeds: torch.Tensor  # CLIP pooled: (B, P)
    img_ids: torch.Tensor  # (N + M, 3)
    txt_ids: torch.Tensor  # (L, 3)

    def to(self, device, dtype: torch.dtype | None = None) -> KontextInputs:
        def move(tensor: torch.Tensor, float_dtype: torch.dtype | None) -> torch.Tensor:
            return tensor.to(device=device, dtype=float_dtype if tensor.is_floating_point() else None)

        return KontextInputs(
            target=move(self.target, dtype),
            control=move(self.control, dtype),
            prompt_embeds=move(self.prompt_embeds, dtype),
            pooled_prompt_embeds=move(self.pooled_prompt_embeds, dtype),
            img_ids=self.img_ids.to(device),
            txt_ids=self.txt_ids.to(device),
        )

    @property
    def batch_size(self) -> int:
        return self.target.shape[0]


def predict_velocity(
    transformer: torch.nn.Module,
    inputs: KontextInputs,
    noisy_target: torch.Tensor,
    sigmas: torch.Tensor,
    guidance: torch.Tensor | None,
) -> torch.Tensor:
    """The transformer's velocity prediction for the target tokens of [x_t ; control]."""
    hidden = torch.cat([noisy_target, inputs.control.to(noisy_target.dtype)], dim=1)
    output = transformer(
        hidden_states=hidden,
        timestep=sigmas.to(noisy_target.dtype),
        guidance=guidance,
        pooled_projections=inputs.pooled_prompt_embeds,
        encoder_hidden_states=inputs.prompt_embeds,
        txt_ids=inputs.txt_ids,
        img_ids=inputs.img_ids,
        return_dict=False,
    )[0]
    return output[:, : noisy_target.shape[1]]


def flow_matching_loss(
    transformer: torch.nn.Module,
    inputs: KontextInputs,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """MSE between the predicted and the true velocity (noise - x0) on the target tokens, in float32."""
    noisy = add_noise(inputs.target, noise, sigmas)
    guidance = guidance_vector(transformer, guidance_scale, inputs.batch_size, inputs.target.device)
    prediction = predict_velocity(transformer, inputs, noisy, sigmas, guidance)
    return F.mse_loss(prediction.float(), (noise - inputs.target).float())
